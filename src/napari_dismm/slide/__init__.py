"""Whole-slide images: open any OpenSlide/TIFF slide as a lazy multiscale pyramid with
metadata (mpp chain, slide id), plus a procedural H&E sample-slide generator.

The sample-slide names load on first use (PEP 562), so opening a slide for the viewer
does not import the generator."""

from .detect import is_slide_path
from .info import SlideInfo
from .wsi import Slide, open_slide

_SYNTHETIC = ("SampleSlide", "load_sample_slide", "sample_slide_path", "write_sample_slide")

__all__ = ["Slide", "SlideInfo", "is_slide_path", "open_slide", *_SYNTHETIC]


def __getattr__(name: str):
    if name in _SYNTHETIC:
        from . import synthetic

        return getattr(synthetic, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
