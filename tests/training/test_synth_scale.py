"""`dismm synth` at real scale (issue 14): bag sizes, the scanner mix, parents, regions, seeds.

The cohort is written through the real `dismm` command line and read back through the
feature-file reader, as `dismm train` would read it.
"""

from __future__ import annotations

import dataclasses
import tracemalloc

import numpy as np
import pandas as pd
import pytest

from napari_dismm.cli import main
from napari_dismm.features.h5 import read_features
from training.synth import planted_cohort_config, write_synthetic_cohort
from training.synth.layout import SIZE_SPREAD, generate_cohort

PATIENTS, PATCHES_20X, DIM = 8, 1200, 8
FOOTPRINTS = {0.25: {"10x": 896, "20x": 448}, 0.5: {"10x": 448, "20x": 224}}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A mixed-scanner real-scale cohort written by `dismm synth`; (root, cohort csv, truth, regions)."""
    root = tmp_path_factory.mktemp("scale") / "c"
    code = main(["synth", "--out", str(root), "--patients", str(PATIENTS), "--patches-20x", str(PATCHES_20X),
                 "--scanner-mix", "0.5", "--feature-dim", str(DIM), "--seed", "3"])
    assert code == 0
    return root, pd.read_csv(root / "cohort.csv"), pd.read_csv(root / "truth.csv"), pd.read_csv(root / "regions.csv")


def _bags(root, row):
    return {mag: read_features(root / row[f"features_{mag}"]) for mag in ("10x", "20x")}


def test_bags_have_the_asked_size_with_a_quarter_at_10x(cohort):
    root, rows, _, _ = cohort
    sizes = []
    for _, row in rows.iterrows():
        bags = _bags(root, row)
        n10, n20 = bags["10x"].n_patches, bags["20x"].n_patches
        assert n20 == 4 * n10 and bags["20x"].dim == DIM
        assert (1 - SIZE_SPREAD) * PATCHES_20X - 4 <= n20 <= (1 + SIZE_SPREAD) * PATCHES_20X + 4
        sizes.append(n20)
    assert len(set(sizes)) > 1  # slides differ in size, as real ones do


@pytest.mark.parametrize("patches", [20_000, 100_000])
def test_large_bags_keep_their_size(patches):
    cfg = planted_cohort_config(n_patients=8, patches_20x=patches, feature_dim=4)
    sizes = [len(p.coords["20x"]) for p in generate_cohort(
        cfg, tumor_genes=("A",), tme_genes=("B",), keep_features=False).patients]
    assert abs(np.mean(sizes) / patches - 1) < SIZE_SPREAD / 2
    assert min(sizes) >= (1 - SIZE_SPREAD) * patches - 4 and max(sizes) <= (1 + SIZE_SPREAD) * patches + 4


def test_both_scanners_with_their_footprints_and_lattices(cohort):
    root, rows, truth, _ = cohort
    assert truth["mpp"].value_counts().to_dict() == {0.25: PATIENTS // 2, 0.5: PATIENTS // 2}
    # balanced within each (tumor, TME) state pair: the scanner says nothing of the label
    assert (truth.groupby(["tumor_state", "tme_state"])["mpp"].mean() == 0.375).all()
    for (_, row), mpp in zip(rows.iterrows(), truth["mpp"], strict=True):
        for mag, ff in _bags(root, row).items():
            step = FOOTPRINTS[mpp][mag]
            assert ff.patch_size_level0 == step and ff.patch_size == 224 and ff.mpp == mpp
            assert ff.level0_magnification == 10 / mpp and ff.target_magnification == float(mag[:-1])
            assert (ff.coords % step == 0).all()
            assert (ff.coords + step <= [ff.level0_width, ff.level0_height]).all()
        # the 20x lattice is as fine as the footprint: some 20x patches sit off the 10x lattice
        assert (_bags(root, row)["20x"].coords % FOOTPRINTS[mpp]["10x"] != 0).any()


def test_every_20x_patch_has_its_10x_parent_in_both_scanners(cohort):
    root, rows, truth, regions = cohort
    for (_, row), mpp in zip(rows.iterrows(), truth["mpp"], strict=True):
        bags = _bags(root, row)
        step10, step20 = bags["10x"].patch_size_level0, bags["20x"].patch_size_level0
        assert step10 == 2 * step20
        xy10, xy20 = bags["10x"].coords, bags["20x"].coords
        offset = xy20 % step10
        assert set(np.unique(offset)) == {0, step20}
        parents = xy20 - offset
        index10 = {tuple(p): i for i, p in enumerate(xy10)}
        parent_row = np.array([index10[tuple(p)] for p in parents])  # KeyError: a parent is missing
        assert (np.bincount(parent_row, minlength=len(xy10)) == 4).all()
        # children inherit the parent's planted region
        mine = regions[regions.slide_id == row["slide_id"]]
        r10 = mine[mine.magnification == "10x"]["region"].to_numpy()
        r20 = mine[mine.magnification == "20x"]["region"].to_numpy()
        np.testing.assert_array_equal(r20, r10[parent_row])


def test_regions_are_recorded_per_patch(cohort):
    root, rows, _, regions = cohort
    for _, row in rows.iterrows():
        for mag, ff in _bags(root, row).items():
            mine = regions[(regions.slide_id == row["slide_id"]) & (regions.magnification == mag)]
            np.testing.assert_array_equal(mine[["x", "y"]].to_numpy(), ff.coords)
            share = mine["region"].value_counts(normalize=True)
            assert share["tumor"] == pytest.approx(0.15, abs=0.01) and share["tme"] == pytest.approx(0.15, abs=0.01)


def test_same_seed_same_cohort_and_the_scanner_leaves_features_alone():
    cfg = planted_cohort_config(n_patients=8, patches_20x=800, feature_dim=DIM, scanner_mix=0.5, seed=5)
    kw = {"tumor_genes": ("A", "B"), "tme_genes": ("C", "D")}
    a, b = generate_cohort(cfg, **kw), generate_cohort(cfg, **kw)
    c = generate_cohort(dataclasses.replace(cfg, seed=6), **kw)
    one_scanner = generate_cohort(dataclasses.replace(cfg, scanner_mix=1.0), **kw)
    np.testing.assert_array_equal(a.expression, b.expression)
    for p, q, s in zip(a.patients, b.patients, one_scanner.patients, strict=True):
        assert p.mpp_level0 == q.mpp_level0
        for mag in ("10x", "20x"):
            np.testing.assert_array_equal(p.features[mag], q.features[mag])
            np.testing.assert_array_equal(p.coords[mag], q.coords[mag])
            np.testing.assert_array_equal(p.features[mag], s.features[mag])
            scale = 0.25 / p.mpp_level0  # a 0.5 um/px slide's coordinates are half a 0.25 one's
            np.testing.assert_array_equal(p.coords[mag], s.coords[mag] * scale)
    assert {p.mpp_level0 for p in one_scanner.patients} == {0.25}
    assert not np.array_equal(a.patients[0].features["20x"][:10], c.patients[0].features["20x"][:10])


@pytest.mark.parametrize("signal", [0.0, 0.5])
def test_patch_signal_is_the_planted_state_shift_at_real_size(signal):
    cfg = planted_cohort_config(n_patients=8, patches_20x=4000, feature_dim=16, patch_signal=signal)
    synth = generate_cohort(cfg, tumor_genes=("A",), tme_genes=("B",))

    def mean_of(region: int, state: int) -> np.ndarray:
        rows = [p.features["20x"][p.regions["20x"] == region] for p in synth.patients if p.tumor_state == state]
        return np.concatenate(rows).mean(0)

    # tumor patches of tumor-high minus tumor-low slides: 2 * patch_signal along a unit direction
    assert np.linalg.norm(mean_of(1, 1) - mean_of(1, 0)) == pytest.approx(2 * signal, abs=0.15)
    assert np.linalg.norm(mean_of(0, 1) - mean_of(0, 0)) < 0.15  # "other" patches carry no state


def test_writing_streams_slide_by_slide(tmp_path):
    cfg = planted_cohort_config(n_patients=8, patches_20x=10_000, feature_dim=64)
    one_slide = 1.25 * 10_000 * 64 * 4  # bytes of one slide's two bags at the mean size
    tracemalloc.start()
    try:
        files = write_synthetic_cohort(tmp_path / "c", config=cfg, keep_features=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * one_slide  # the whole cohort would be 8 slides
    assert all(not p.features for p in files.synth.patients)
    assert len(pd.read_csv(files.csv)) == 8


def _exit_code(argv: list[str]) -> int:
    """`dismm ARGV`'s exit status, whether a handler returns it or argparse exits."""
    try:
        return main(argv)
    except SystemExit as stop:
        return int(stop.code)


@pytest.mark.parametrize(("flag", "value", "named"), [
    ("--patches-20x", "10", "--patches-20x"), ("--patches-20x", "abc", "--patches-20x"),
    ("--scanner-mix", "1.5", "--scanner-mix"), ("--scanner-mix", "nan", "--scanner-mix"),
    ("--feature-dim", "2", "--feature-dim"), ("--patch-signal", "-1", "--patch-signal"),
])
def test_bad_values_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, flag, value, named):
    out = tmp_path / "c"
    assert _exit_code(["synth", "--out", str(out), "--patients", "8", flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dismm") and named in err[0]
    assert not out.exists()
