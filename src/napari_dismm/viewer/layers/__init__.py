"""The layers the plugin adds: the slide pyramid (``slide``), a prediction's overlays built
as layer-data tuples (``prediction``), shown in a viewer (``display``) and refilled in place
on a re-run (``refill``)."""
