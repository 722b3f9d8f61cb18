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
