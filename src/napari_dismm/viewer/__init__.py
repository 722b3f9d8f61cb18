"""The napari side of napari-dismm: reader, sample data, layers and widgets.

The only package that imports napari, magicgui or Qt."""
