"""A cohort mixing scanners trains and predicts (issue 14): half the slides rewritten as a
0.5 um/px scanner would tile them (coordinates and footprints halved), a teacher trained on
the mix with DEV and spatial context on geometry-keeping subsets, then the same slide
predicted from both scans gives the same prediction and maps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from napari_dismm.features.h5 import read_features, write_features
from napari_dismm.model.grid import grid_index_20x_to_10x
from napari_dismm.predict import predict_features
from tests.training.synth_files import write_cohort
from training.cohort import load_cohort
from training.config import DEV_WEIGHT_ON, config_from_dict
from training.splits import split_cohort
from training.stages.supervised import prepare_fold, train_supervised_fold

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rescan(src, dst, factor: float) -> None:
    """The same bag as a scanner of ``factor`` x the pixel size would tile it."""
    ff = read_features(src)
    ff.coords = (ff.coords / factor).astype(np.int64)
    ff.patch_size_level0 = int(ff.patch_size_level0 / factor)
    ff.level0_width = ff.level0_height = None
    if ff.mpp:
        ff.mpp = ff.mpp * factor
    write_features(dst, ff)


def test_a_mixed_scanner_cohort_trains_and_predicts_the_same_slide_alike(tmp_path):
    files = write_cohort(tmp_path / "cohort", n_patients=16, feature_dim=8)
    cohort = load_cohort(cohort_csv=files.csv, expression=files.expression, gene_sets=files.gmt,
                         task="classification")
    halved = set()
    for i, slide in enumerate(cohort.slides_of(cohort.patients)):
        if i % 2:  # every other slide: a 0.5 um/px scan (footprints 448 / 224 instead of 896 / 448)
            for path in slide.features.values():
                rescan(path, path, 2.0)
            halved.add(slide.slide_id)
    cohort = load_cohort(cohort_csv=files.csv, expression=files.expression, gene_sets=files.gmt,
                         task="classification")
    cfg = config_from_dict({"model": {"d": 16, "dropout": 0.0},
                            "data": {"batch_size": 4, "max_patches": 24, "block_cells": 2},
                            "teacher": {"epochs": 3, "dev_weight": DEV_WEIGHT_ON, "dev_warmup": 0, "patience": 0}})
    fold = split_cohort(cohort, n_folds=2, val_fraction=0.25, seed=0).folds[0]
    setup = prepare_fold(cohort, fold, 0, cfg, use_genes=True)
    footprints = {setup.data.train.cache.footprint(s.features["10x"]) for s in setup.data.train.slides}
    assert footprints == {448.0, 896.0}
    # the training subsets (through the dataset, reseeded per epoch) keep every 20x patch's parent
    subset_seen = False
    for epoch in (0, 1):
        setup.data.train.set_epoch(epoch)
        for i in range(len(setup.data.train)):
            item = setup.data.train[i]
            whole = setup.data.val.cache.get(setup.data.train.slides[i].features["20x"])[1]
            subset_seen |= len(item.coords["20x"]) < len(whole)
            index = grid_index_20x_to_10x(item.coords["10x"][None], item.coords["20x"][None], None, None,
                                          patch_size_10x_level0=item.footprints["10x"],
                                          patch_size_20x_level0=item.footprints["20x"])
            assert bool((index >= 0).all())
    assert subset_seen
    setup.data.train.set_epoch(0)
    outcome = train_supervised_fold(kind="teacher", name="teacher", setup=setup, out_dir=tmp_path / "teacher")
    devs = [row["train_dev"] for row in outcome.history if "train_dev" in row]
    assert devs and all(math.isfinite(v) and 0 <= v <= 4 for v in devs)
    # one test slide from both scanners: the same prediction and the same maps
    slide = setup.data.test.slides[0]
    factor = 2.0 if slide.slide_id not in halved else 0.5
    other = {}
    for mag, path in slide.features.items():
        other[mag] = tmp_path / f"other_{mag}.h5"
        rescan(path, other[mag], factor)
    genes = {"tumor": np.zeros(len(setup.data.normaliser.groups_["tumor"])),
             "tme": np.zeros(len(setup.data.normaliser.groups_["tme"]))}
    model_dir = tmp_path / "teacher" / "best"
    a = predict_features(features={float(m[:-1]): p for m, p in slide.features.items()}, model_dir=model_dir,
                         device="cpu", genes=genes)
    b = predict_features(features={float(m[:-1]): p for m, p in other.items()}, model_dir=model_dir,
                         device="cpu", genes=genes)
    np.testing.assert_allclose(a.probabilities, b.probabilities, rtol=1e-5, atol=1e-6)
    for column in ("tumor_attention", "tme_attention"):
        np.testing.assert_allclose(a.patches[column].to_numpy(), b.patches[column].to_numpy(), rtol=1e-4, atol=1e-7)
    assert set(b.patches["width"]) == {w * factor for w in set(a.patches["width"])} or factor < 1
    # the inspection tools read each bag's own footprint too: gene attributions of the slide
    # from either scan agree (a teacher with spatial context finds the same neighbours)
    from napari_dismm.inspect.attribution import integrated_gradients
    from napari_dismm.model.checkpoint import load_model
    from training.inspect import _footprints

    assert _footprints(setup.data.test, slide.slide_id) == {m: setup.data.test.cache.footprint(p)
                                                            for m, p in slide.features.items()}
    teacher, _ = load_model(model_dir)
    gene_batch = {g: torch.zeros(1, len(v), dtype=torch.float32) + 0.5 for g, v in genes.items()}

    def attribution(paths, *, own_footprints: bool):
        files = {m: read_features(p) for m, p in paths.items()}
        bags = {m: torch.from_numpy(f.features)[None] for m, f in files.items()}
        coords = {m: torch.from_numpy(f.coords)[None] for m, f in files.items()}
        sizes = {m: torch.tensor([float(f.patch_size_level0)]) for m, f in files.items()} if own_footprints else None
        ig = integrated_gradients(teacher, bags, masks=None, genes=gene_batch, target=torch.tensor([0]), steps=2,
                                  coords=coords, footprints=sizes)
        return torch.cat([v.flatten() for per in ig.values() for v in per.values()])

    first, second = attribution(slide.features, own_footprints=True), attribution(other, own_footprints=True)
    torch.testing.assert_close(first, second, rtol=1e-4, atol=1e-6)
    # the scan whose footprint is not the model's configured one: without its own, other neighbours
    configured = teacher.config.patch_size_10x_level0
    foreign = next(paths for paths in (slide.features, other) if read_features(paths["10x"]).patch_size_level0 != configured)
    same = (first - second).abs().max()
    wrong = (attribution(foreign, own_footprints=False) - first).abs().max()
    print(f"attribution from the other scan: own footprints {same:.2e}, the configured one {wrong:.2e}")
    assert wrong > 10 * same
