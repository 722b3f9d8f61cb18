"""Rendered synthetic cohort: hidden states are visible in the pixels, the planted truth is
recorded per patch, and the default sample slide is untouched by the appearance knobs."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest

from napari_dismm.errors import DataError, SlideError
from napari_dismm.slide import open_slide
from napari_dismm.slide.synthetic import Appearance, load_sample_slide, sidecar_path, state_appearance, write_sample_slide
from training.synth.rendered import patch_regions, render_cohort

SIZE = dict(width=1536, height=1152, mpp=0.5, tile=256, compression="zlib")


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _core_pixels(sample, label: int) -> np.ndarray:
    """Level-0 RGB of cells of ``label`` away from its boundary (label map resolution)."""
    with open_slide(sample.path) as slide:
        img = slide.pyramid[0][:].astype(np.float64)
    ds = sample.label_downsample
    mask = sample.region_mask(label, ds)
    core = mask.copy()
    core[1:] &= mask[:-1]
    core[:-1] &= mask[1:]
    core[:, 1:] &= mask[:, :-1]
    core[:, :-1] &= mask[:, 1:]
    full = np.repeat(np.repeat(core, ds, axis=0), ds, axis=1)[: img.shape[0], : img.shape[1]]
    return img[full]


def test_default_appearance_is_byte_identical(tmp_path):
    """Passing the default look explicitly changes nothing, sidecar included (cached samples stay valid)."""
    a = write_sample_slide(tmp_path / "a.tif", seed=3, **SIZE)
    b = write_sample_slide(tmp_path / "b.tif", seed=3, appearance=Appearance(), tumor_size=1.0,
                           immune_clusters=(2, 4), immune_size=1.0, **SIZE)
    assert _digest(a.path) == _digest(b.path)
    assert _digest(sidecar_path(a.path)) == _digest(sidecar_path(b.path))
    with np.load(sidecar_path(a.path)) as z:
        assert not [k for k in z.files if k.startswith("appearance_")]


def test_state_appearance_is_recorded_and_reloaded(tmp_path):
    look = state_appearance(tumor_state=1, tme_state=1, strength=0.8)
    sample = write_sample_slide(tmp_path / "s.tif", seed=5, **look, **SIZE)
    again = load_sample_slide(sample.path)
    assert again.layout.appearance == look["appearance"] != Appearance()
    np.testing.assert_array_equal(again.label_map, sample.label_map)
    with pytest.raises(SlideError, match="states must be 0 or 1"):
        state_appearance(tumor_state=2, tme_state=0)
    with pytest.raises(SlideError, match="bad layout knobs"):
        write_sample_slide(tmp_path / "x.tif", immune_clusters=(3, 1), **SIZE)


def test_hidden_states_show_in_the_pixels(tmp_path):
    """High tumor state: darker tumor; hot TME: darker (lymphocyte-infiltrated) stroma and
    more immune area; the same seed keeps the tissue outline comparable."""
    slides = {
        (t, e): write_sample_slide(tmp_path / f"s{t}{e}.tif", seed=11, **state_appearance(tumor_state=t, tme_state=e),
                                   **SIZE)
        for t in (0, 1) for e in (0, 1)
    }
    tumor_brightness = {k: _core_pixels(s, 1).mean() for k, s in slides.items()}
    stroma_dark = {k: (_core_pixels(s, 2).mean(axis=1) < 120).mean() for k, s in slides.items()}
    immune_area = {k: (s.label_map == 3).mean() for k, s in slides.items()}
    for e in (0, 1):
        assert tumor_brightness[(1, e)] < tumor_brightness[(0, e)] - 25
    for t in (0, 1):
        assert stroma_dark[(t, 1)] > stroma_dark[(t, 0)] + 0.01
        assert immune_area[(t, 1)] > 2 * immune_area[(t, 0)]
    # the tumor nests are larger in the high state
    assert (slides[(1, 0)].label_map == 1).mean() > (slides[(0, 0)].label_map == 1).mean()


def test_patch_regions_uses_patch_centres(tmp_path):
    sample = write_sample_slide(tmp_path / "p.tif", seed=2, **SIZE)
    ys, xs = np.nonzero(sample.label_map == 1)
    ds = sample.label_downsample
    centre = np.array([[xs[0] * ds + ds / 2, ys[0] * ds + ds / 2]])
    coords = np.vstack([centre - 112, [[0, 0]]]).astype(np.int64)  # a tumor-centred patch, a corner one
    got = patch_regions(sample, coords, 224)
    assert got.tolist() == [1, 0]
    np.testing.assert_array_equal(patch_regions(sample, coords, 0), sample.labels_at(coords[:, 0], coords[:, 1]))


def test_render_cohort_rejects_bad_input(tmp_path):
    with pytest.raises(DataError, match="at least 8"):
        render_cohort(out_dir=tmp_path, n_patients=4)
    with pytest.raises(DataError, match="mpp"):
        render_cohort(out_dir=tmp_path, mpp=1.0)
    with pytest.raises(DataError, match="task"):
        render_cohort(out_dir=tmp_path, task="grading")


@pytest.mark.slow
def test_render_cohort_files_agree(tmp_path):
    """8 small slides through the real encoder: the cohort loads, states are balanced,
    every extracted patch has its planted label, expression covers the default gene sets."""
    from napari_dismm.features.h5 import read_features
    from napari_dismm.omics import load_gene_sets
    from training.cohort import load_cohort

    csv = render_cohort(out_dir=tmp_path, n_patients=8, width=1400, height=1100, threads=2, progress=False, log=None)
    cohort = load_cohort(cohort_csv=csv, expression=tmp_path / "expression.tsv", gene_sets=tmp_path / "sets.gmt",
                         task="classification")
    assert len(cohort.patients) == 8
    truth = pd.read_csv(tmp_path / "truth.csv")
    assert truth.groupby(["tumor_state", "tme_state"]).size().tolist() == [2, 2, 2, 2]
    table = pd.read_csv(csv)
    labels = dict(zip(table["patient_id"], table["label"], strict=True))
    for _, row in truth.iterrows():
        tumor = "tumor-high" if row["tumor_state"] else "tumor-low"
        expected = tumor + ("/TME-hot" if row["tme_state"] else "/TME-cold")
        assert labels[row["patient_id"]] == expected
    row = table.iloc[0]
    planted = pd.read_csv(tmp_path / "planted" / f"{row['slide_id']}.csv")
    sample = load_sample_slide(tmp_path / "slides" / f"{row['slide_id']}.tif")
    for mag in ("10x", "20x"):
        ff = read_features(tmp_path / row[f"features_{mag}"])
        part = planted[planted["magnification"] == mag]
        np.testing.assert_array_equal(part[["x", "y"]].to_numpy(), ff.coords)
        np.testing.assert_array_equal(part["label"].to_numpy(), patch_regions(sample, ff.coords, ff.patch_size_level0))
        assert ff.encoder == "efficientnet-lite0"
    expr = pd.read_csv(tmp_path / "expression.tsv", sep="\t")
    sets = load_gene_sets()
    assert set(sets.tumor) | set(sets.tme) <= set(expr.columns)
    # a second call reuses everything (nothing rendered or encoded again)
    stamp = (tmp_path / "slides" / f"{row['slide_id']}.tif").stat().st_mtime_ns
    render_cohort(out_dir=tmp_path, n_patients=8, width=1400, height=1100, progress=False, log=None)
    assert (tmp_path / "slides" / f"{row['slide_id']}.tif").stat().st_mtime_ns == stamp
