"""The Inspect dock: a trained run's subspaces on the slide (``widget``), the layer data it
adds (``layers``) and its Qt views, the scatter and the patch gallery (``views``)."""
