"""napari sample-data contribution: the generated H&E-like slide with planted regions."""

from __future__ import annotations


def sample_slide() -> list:
    from napari_dismm.slide import open_slide
    from napari_dismm.slide.synthetic import sample_slide_path
    from napari_dismm.viewer.layers.slide import slide_layer_data

    slide = open_slide(sample_slide_path())
    return [slide_layer_data(slide, name="sample slide")]
