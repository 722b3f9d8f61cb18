"""Shared test configuration: paths to the real test data beside the repository."""

from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CMU_SLIDE = SHARED / "testdata" / "CMU-1-Small-Region.svs"
GENESETS = SHARED / "genesets"


@pytest.fixture(scope="session")
def cmu_slide_path() -> Path:
    if not CMU_SLIDE.exists():
        pytest.skip(f"real test slide not found at {CMU_SLIDE}")
    return CMU_SLIDE


@pytest.fixture(scope="module")
def one_torch_thread():
    """Training tests run on one torch thread: reproducible, and fair to the other core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _no_triton_after_mesa(request):
    """After a GUI test has loaded Mesa's LLVM (software OpenGL under Xvfb), a later import of
    torchvision would load triton and segfault the test process: mark triton missing, as the
    widgets do (`napari_dismm.viewer.triton_guard`)."""
    yield
    if request.node.get_closest_marker("gui") is not None:
        from napari_dismm.viewer.triton_guard import keep_triton_out_if_llvm_loaded

        keep_triton_out_if_llvm_loaded()
