"""`extract_slide` on small real TIFF slides: coordinates, features, reuse, kill-and-resume,
and the bad inputs a user can give.

Slides are written here with tifffile (JPEG tiles, a 2-level pyramid, resolution tags in
cm) from a cheap numpy H&E-like picture, so each takes well under a second; the slide
layer's own generator is exercised by its tests.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from napari_dismm.errors import DismmError, DismmWarning, ModelConfigError, SlideError, UnknownMppError
from napari_dismm.features.cache import feature_path
from napari_dismm.features.encoders import get_encoder
from napari_dismm.features.extract import extract_slide
from napari_dismm.features.h5 import read_features
from napari_dismm.slide import open_slide
from napari_dismm.tiling import make_grid, read_patches
from napari_dismm.tissue import TissueParams, detect_tissue

ENCODER = "efficientnet-lite0"
REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- slides


def he_image(width: int, height: int, *, seed: int, blank: bool = False) -> np.ndarray:
    """Glass-white background with a few pink/purple 'tissue' ellipses full of dark dots."""
    rng = np.random.default_rng(seed)
    img = np.empty((height, width, 3), np.uint8)
    img[:] = (243, 243, 241)
    if blank:
        img += rng.integers(0, 3, size=img.shape, dtype=np.uint8)
        return img
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    tissue = np.zeros((height, width), bool)
    for _ in range(3):
        cx, cy = rng.uniform(0.25, 0.75) * width, rng.uniform(0.25, 0.75) * height
        a, b = rng.uniform(0.18, 0.3) * width, rng.uniform(0.18, 0.3) * height
        tissue |= ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1.0
    pink = np.array([222, 160, 200], np.int16) + rng.integers(-18, 18, size=(height, width, 3), dtype=np.int16)
    nuclei = rng.random((height, width)) < 0.02
    pink[nuclei] = (80, 45, 130)
    img[tissue] = np.clip(pink[tissue], 0, 255).astype(np.uint8)
    return img


def write_slide(path: Path, rgb: np.ndarray, *, mpp: float | None = 0.25, tile: int = 256) -> Path:
    """A tiled, JPEG-compressed 2-level pyramid (reduced page with subfiletype=1)."""
    levels = [rgb, rgb[: rgb.shape[0] // 2 * 2, : rgb.shape[1] // 2 * 2].reshape(
        rgb.shape[0] // 2, 2, rgb.shape[1] // 2, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8)]
    with tifffile.TiffWriter(path) as tw:
        for level, arr in enumerate(levels):
            extra = {}
            if mpp is not None:
                res = 1e4 / (mpp * 2**level)
                extra = dict(resolution=(res, res), resolutionunit="CENTIMETER")
            tw.write(
                arr, tile=(tile, tile), compression="jpeg", compressionargs={"level": 90},
                photometric="rgb", subfiletype=1 if level else 0, metadata=None, **extra,
            )
    return path


@pytest.fixture(scope="session")
def slide_dir(tmp_path_factory) -> Path:
    """Two small H&E-like slides (3000 x 2500 px at 0.25 µm/px) plus the bad cases."""
    root = tmp_path_factory.mktemp("slides")
    good = root / "good"
    good.mkdir()
    for seed in (0, 1):
        write_slide(good / f"slide{seed}.tif", he_image(3000, 2500, seed=seed))
    bad = root / "bad"
    bad.mkdir()
    write_slide(bad / "blank.tif", he_image(2000, 1600, seed=2, blank=True))
    write_slide(bad / "tiny.tif", he_image(300, 260, seed=3))
    write_slide(bad / "nores.tif", he_image(1800, 1500, seed=4), mpp=None)
    return root


@pytest.fixture(scope="session")
def encoder():
    return get_encoder(ENCODER, device="cpu")


class CountingEncoder:
    """Wraps an Encoder and counts `encode` calls (the spy for 'no work was done')."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, batch):
        self.calls += 1
        return self.inner.encode(batch)


# ----------------------------------------------------------------------------- tests


def test_extract_slide_coords_match_grid_and_features_are_the_encoders(slide_dir, encoder, tmp_path) -> None:
    slide_path = slide_dir / "good" / "slide0.tif"
    spy = CountingEncoder(encoder)
    result = extract_slide(slide_path=slide_path, out_dir=tmp_path, encoder=spy, batch_size=16, num_workers=2)
    assert not result.skipped and spy.calls > 0
    assert [o.magnification for o in result.outputs] == [10.0, 20.0]
    with open_slide(slide_path) as slide:
        mask = detect_tissue(slide, params=TissueParams())
        for out in result.outputs:
            expected = feature_path(tmp_path, encoder=ENCODER, magnification=out.magnification, slide_stem="slide0")
            assert out.path == expected
            ff = read_features(out.path)
            grid = make_grid(slide, target_mpp=10.0 / out.magnification, patch_size=224, tissue=mask, min_tissue=0.25)
            assert len(grid) > 0 and out.n_patches == len(grid)
            np.testing.assert_array_equal(ff.coords, grid.coords)
            assert ff.features.shape == (len(grid), 1280) and np.isfinite(ff.features).all()
            assert ff.patch_size == 224 and ff.patch_size_level0 == round(224 * (10.0 / out.magnification) / 0.25)
            assert ff.target_magnification == out.magnification and ff.level0_magnification == 40.0
            assert ff.slide_id == slide.info.slide_id and ff.encoder == ENCODER
            assert ff.encoder_weights_hash == encoder.weights_hash and ff.mpp == 0.25
            assert ff.level0_width == 3000 and ff.level0_height == 2500
            # row i is the encoder's output for the patch at coords[i] (order is kept)
            pick = np.array([0, len(grid) - 1])
            direct = encoder.encode(read_patches(slide, grid, pick)).numpy()
            np.testing.assert_allclose(ff.features[pick], direct, rtol=1e-4, atol=1e-4)
    # the two magnifications tile the same tissue: 20x has about 4x the patches of 10x
    n10, n20 = (o.n_patches for o in result.outputs)
    assert 2 * n10 <= n20 <= 6 * n10 + 8


def test_rerun_skips_and_changed_parameters_recompute(slide_dir, encoder, tmp_path) -> None:
    slide_path = slide_dir / "good" / "slide1.tif"
    first = extract_slide(slide_path=slide_path, out_dir=tmp_path, encoder=encoder, magnifications=["10x"])
    stamp = first.outputs[0].path.stat().st_mtime_ns
    spy = CountingEncoder(encoder)
    again = extract_slide(slide_path=slide_path, out_dir=tmp_path, encoder=spy, magnifications=[10])
    assert again.skipped and spy.calls == 0
    assert again.outputs[0].n_patches == first.outputs[0].n_patches
    assert first.outputs[0].path.stat().st_mtime_ns == stamp  # not rewritten
    # other tissue parameters: a different key, so the file is recomputed and replaced
    changed = extract_slide(
        slide_path=slide_path, out_dir=tmp_path, encoder=spy, magnifications=["10x"],
        tissue_params=TissueParams(min_area_um2=40_000.0),
    )
    assert not changed.skipped and spy.calls > 0
    assert read_features(changed.outputs[0].path).tissue_params["min_area_um2"] == 40_000.0


_CHILD = textwrap.dedent(
    """
    import sys
    from napari_dismm.features.cohort import extract_cohort
    summary = extract_cohort(inputs=[sys.argv[1]], out_dir=sys.argv[2], device="cpu",
                             batch_size=8, num_workers=1, threads=2, progress=False)
    sys.exit(summary.exit_code)
    """
)


def _outputs(out: Path) -> dict[str, Path]:
    return {str(p.relative_to(out)): p for p in sorted(out.rglob("*.h5"))}


def test_killed_run_resumes_to_identical_files(slide_dir, tmp_path) -> None:
    """SIGKILL the run once its first file (10x) exists; the re-run writes only 20x, and
    both files equal those of an uninterrupted run in another folder, to the bit."""
    from napari_dismm.features.cohort import extract_cohort

    inputs = slide_dir / "good" / "slide0.tif"
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(inputs), str(killed)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not _outputs(killed) and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        os.killpg(child.pid, signal.SIGKILL)  # no chance to clean up: like a power cut
    finally:
        child.wait(timeout=30)
    at_kill = _outputs(killed)
    assert len(at_kill) == 1, f"the child was not killed mid-run (exit status {child.returncode})"
    for p in at_kill.values():
        read_features(p)  # whatever exists under a final name is a complete file

    common = dict(device="cpu", batch_size=8, threads=2, progress=False)
    resumed = extract_cohort(inputs=[inputs], out_dir=killed, num_workers=1, **common)
    fresh = extract_cohort(inputs=[inputs], out_dir=tmp_path / "fresh", num_workers=2, **common)
    assert resumed.ok and fresh.ok
    assert sum(o.skipped for r in resumed.results for o in r.outputs) == len(at_kill)
    a, b = _outputs(killed), _outputs(tmp_path / "fresh")
    assert sorted(a) == sorted(b) and len(a) == 2
    for name in a:
        fa, fb = read_features(a[name]), read_features(b[name])
        np.testing.assert_array_equal(fa.coords, fb.coords)
        np.testing.assert_array_equal(fa.features, fb.features)
        assert fa.cache_key == fb.cache_key
    assert not [p for p in killed.rglob("*") if p.name.endswith(".tmp")], "stale temp files left behind"


def test_tissue_without_a_full_patch_gives_an_empty_file(encoder, tmp_path) -> None:
    """A 400 px tissue disc holds no 896 px (10x) patch that is 90 % tissue: (0, D), (0, 2)."""
    img = he_image(2400, 2000, seed=7, blank=True)
    yy, xx = np.mgrid[0:2000, 0:2400]
    img[(xx - 1200) ** 2 + (yy - 1000) ** 2 <= 400**2] = (200, 110, 170)
    path = write_slide(tmp_path / "speck.tif", img)
    with pytest.warns(DismmWarning, match="empty feature file"):
        result = extract_slide(
            slide_path=path, out_dir=tmp_path / "out", encoder=encoder, magnifications=["10x"], min_tissue=0.9
        )
    ff = read_features(result.outputs[0].path)
    assert ff.features.shape == (0, 1280) and ff.coords.shape == (0, 2) and result.n_patches == 0


# ----------------------------------------------------------------------------- bad input


def test_no_tissue_is_a_clear_error(slide_dir, encoder, tmp_path) -> None:
    with pytest.raises(SlideError, match="no tissue found"):
        extract_slide(slide_path=slide_dir / "bad" / "blank.tif", out_dir=tmp_path, encoder=encoder)
    assert not list(tmp_path.rglob("*.h5"))


def test_slide_smaller_than_one_patch(slide_dir, encoder, tmp_path) -> None:
    with pytest.raises(SlideError, match="smaller than one 224 px patch at 20x"):
        extract_slide(
            slide_path=slide_dir / "bad" / "tiny.tif", out_dir=tmp_path, encoder=encoder, magnifications=["20x"]
        )


def test_unknown_mpp_needs_an_override(slide_dir, encoder, tmp_path) -> None:
    path = slide_dir / "bad" / "nores.tif"
    with pytest.raises(UnknownMppError, match="microns per pixel unknown"):
        extract_slide(slide_path=path, out_dir=tmp_path, encoder=encoder)
    result = extract_slide(slide_path=path, out_dir=tmp_path, encoder=encoder, magnifications=["10x"], mpp=0.25)
    ff = read_features(result.outputs[0].path)
    assert ff.mpp == 0.25 and ff.n_patches == result.outputs[0].n_patches > 0


def test_unknown_encoder_name(slide_dir, tmp_path) -> None:
    with pytest.raises(DismmError, match="unknown encoder 'resnet-9000'.*efficientnet-lite0"):
        extract_slide(slide_path=slide_dir / "good" / "slide0.tif", out_dir=tmp_path, encoder="resnet-9000")


def test_weight_file_of_the_wrong_architecture(slide_dir, tmp_path) -> None:
    from safetensors.torch import save_file

    wrong = tmp_path / "wrong.safetensors"
    save_file(torch.nn.Linear(8, 4).state_dict(), str(wrong))
    with pytest.raises(ModelConfigError, match="wrong.safetensors"):
        extract_slide(
            slide_path=slide_dir / "good" / "slide0.tif", out_dir=tmp_path, encoder=ENCODER, weights=wrong,
            device="cpu",
        )


def test_bad_magnification_and_batch_size(slide_dir, encoder, tmp_path) -> None:
    path = slide_dir / "good" / "slide0.tif"
    with pytest.raises(DismmError, match="magnification"):
        extract_slide(slide_path=path, out_dir=tmp_path, encoder=encoder, magnifications=["high"])
    with pytest.raises(DismmError, match="batch size"):
        extract_slide(slide_path=path, out_dir=tmp_path, encoder=encoder, batch_size=0)
