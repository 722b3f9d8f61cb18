"""Whole-slide images: open any OpenSlide/TIFF slide as a lazy zarr-3 pyramid with
metadata (mpp chain, slide id), plus a procedural H&E sample-slide generator."""

from .detect import is_slide_path
from .info import SlideInfo
from .synthetic import SampleSlide, load_sample_slide, sample_slide_path, write_sample_slide
from .wsi import Slide, open_slide

__all__ = [
    "SampleSlide",
    "Slide",
    "SlideInfo",
    "is_slide_path",
    "load_sample_slide",
    "open_slide",
    "sample_slide_path",
    "write_sample_slide",
]
