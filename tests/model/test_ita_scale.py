"""ITA at real-slide scale (issue 14): both modes of a bag found at 30k and 100k tokens,
agreement with exact DPC-kNN where the N x N version fits, the same clusters on a
training-size subset as on the whole bag, nothing of size N x N, and saved students of
the former rules loading as trained."""

from __future__ import annotations

import json

import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from napari_dismm.model import ita
from napari_dismm.model.checkpoint import CONFIG, load_model, save_model
from napari_dismm.model.ita import assign_to_centres, dpc_knn_centres
from napari_dismm.model.registry import build_model
from tests.model.model_helpers import tissue_modes

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def modes_of(centres: torch.Tensor, labels: torch.Tensor) -> list[int]:
    return sorted(labels[centres].tolist())


@pytest.mark.parametrize("n", [30_000, 100_000])
def test_both_modes_found_at_real_bag_sizes(n: int) -> None:
    """The former rule (centres among the 1024 densest tokens) lost mode B at these sizes;
    the anchor sample finds both, and every mode token joins its own mode's centre."""
    x, labels = tissue_modes(n)
    old = dpc_knn_centres(x, k=2, n_anchors=1024, n_candidates=1024, candidates="densest")
    assert modes_of(old, labels) == [0, 0]  # the issue, reproduced (so this data can tell the rules apart)
    new = dpc_knn_centres(x, k=2)
    assert modes_of(new, labels) == [0, 1]
    cluster = assign_to_centres(x, new)
    in_mode = labels < 2
    assert torch.equal(cluster[in_mode] == cluster[new[0]], labels[in_mode] == labels[new[0]])


@pytest.mark.parametrize(("n", "seed"), [(3000, 0), (5000, 1)])
def test_partition_agrees_with_exact_dpc_knn(n: int, seed: int) -> None:
    """Exact DPC-kNN (every token an anchor and a candidate; checked against a dense numpy
    reference in test_ita.py) vs the 2048-anchor sample: same modes, the same partition of
    every mode token (adjusted Rand 1.00 measured) and of all tokens >= 0.7 (0.78-1.00
    measured over seeds: the background between the modes goes where the centres fall)."""
    x, labels = tissue_modes(n, seed=seed)
    exact = dpc_knn_centres(x, k=2, n_anchors=n)
    sampled = dpc_knn_centres(x, k=2)
    assert modes_of(exact, labels) == modes_of(sampled, labels) == [0, 1]
    a, b = assign_to_centres(x, exact), assign_to_centres(x, sampled)
    in_mode = labels < 2
    assert adjusted_rand_score(a[in_mode], b[in_mode]) >= 0.99
    assert adjusted_rand_score(a, b) >= 0.7


def test_training_subset_and_whole_bag_cluster_alike() -> None:
    """The student trains on <= 4096 patches of a bag and predicts on the whole bag: the
    clusters of the subset's patches must be the same either way."""
    x, labels = tissue_modes(100_000, seed=2)
    subset = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(7))[:4096]
    whole = assign_to_centres(x, dpc_knn_centres(x, k=2))[subset]
    centres = dpc_knn_centres(x[subset], k=2)
    assert modes_of(centres, labels[subset]) == [0, 1]
    trained = assign_to_centres(x[subset], centres)
    in_mode = labels[subset] < 2
    assert adjusted_rand_score(whole[in_mode], trained[in_mode]) >= 0.99
    assert adjusted_rand_score(whole, trained) >= 0.7


def test_nothing_quadratic_in_the_bag_size(monkeypatch) -> None:
    """Every distance block ITA builds on a 100k bag is at most anchors x anchors or
    chunk x K, and the density pass reads the anchors alone: nothing grows with N^2
    (time and peak memory in benchmarks/bench_ita.py)."""
    largest = []
    original = ita._scaled_sq_dist

    def recording(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        largest.append(a.shape[0] * b.shape[0])
        return original(a, b)

    density_rows = []
    original_density = ita._knn_log_density

    def recording_density(x: torch.Tensor, anchors: torch.Tensor, **kw) -> torch.Tensor:
        density_rows.append(x.shape[0] * anchors.shape[0])
        return original_density(x, anchors, **kw)

    monkeypatch.setattr(ita, "_scaled_sq_dist", recording)
    monkeypatch.setattr(ita, "_knn_log_density", recording_density)
    x, _ = tissue_modes(100_000, d=16, seed=3)
    module = ita.InformativeTokenAggregation(16, k=2)
    with torch.no_grad():
        bag = module.aggregate(x, prototypes=ita.default_prototypes(16))
    assert bag.cluster.shape == (100_000,) and int(bag.is_centre.sum()) == 2
    assert max(largest) <= max(2048 * 2048, 65536 * 2)
    assert density_rows == [2048 * 2048]  # the density is measured among the anchors only


def test_prediction_is_reproducible_and_order_free() -> None:
    """No random generator is involved: the anchors are a function of the bag's content."""
    x, _ = tissue_modes(20_000, d=16, seed=4)
    module = ita.InformativeTokenAggregation(16, k=2)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        first = module.aggregate(x, prototypes=ita.default_prototypes(16))
        again = module.aggregate(x, prototypes=ita.default_prototypes(16))
        moved = module.aggregate(x[perm], prototypes=ita.default_prototypes(16))
    assert torch.equal(first.cluster, again.cluster) and torch.equal(first.merged, again.merged)
    assert torch.equal(moved.cluster, first.cluster[perm]) and torch.equal(moved.merged, first.merged)


def test_format_3_students_load_with_the_rules_they_were_trained_with(tmp_path) -> None:
    """Format 4 changed the centre candidates and added a membership unit; a format-3
    config.json has neither key, its student chose centres among the densest tokens and
    scaled memberships by the spread, and must give the same outputs as before."""
    torch.manual_seed(0)
    config = {"kind": "student", "d_in": 12, "d": 8, "n_heads": 2, "n_anchors": 64, "n_candidates": 32,
              "temperature": 2.0, "candidates": "densest", "membership_scale": "spread"}
    model = build_model(config).eval()
    save_model(model, tmp_path / "old")
    doc = json.loads((tmp_path / "old" / CONFIG).read_text())
    del doc["model"]["candidates"], doc["model"]["membership_scale"]
    doc["format_version"] = 3
    (tmp_path / "old" / CONFIG).write_text(json.dumps(doc))
    loaded, _ = load_model(tmp_path / "old")
    assert (loaded.config.candidates, loaded.config.membership_scale) == ("densest", "spread")
    gen = torch.Generator().manual_seed(1)
    bags = {m: torch.randn(1, 400, 12, generator=gen) for m in ("10x", "20x")}
    with torch.no_grad():
        before, after = model(bags).logits, loaded(bags).logits
        current = build_model({**config, "candidates": "anchors", "membership_scale": "width"})
        current.load_state_dict(model.state_dict())
        changed = current.eval()(bags).logits
    torch.testing.assert_close(before, after, atol=0, rtol=0)
    assert not torch.equal(changed, before)  # the new rules do change this model's outputs
