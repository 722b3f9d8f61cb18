"""Headless disentanglement analysis: CKA against a direct computation, consistency,
teacher/student agreement, integrated gradients (completeness), PCA."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from napari_dismm.errors import DataError, ModelConfigError
from napari_dismm.inspect.agreement import attention_agreement, matched_patches, rank_difference
from napari_dismm.inspect.attribution import integrated_gradients, subspace_scores, top_genes
from napari_dismm.inspect.cka import linear_cka, mean_cosine, subspace_similarity
from napari_dismm.inspect.consistency import bundle_consistency, pooled_20x_on_10x, slide_consistency
from napari_dismm.inspect.projection import pca_2d
from napari_dismm.model.registry import build_model


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cka_by_gram(x: np.ndarray, y: np.ndarray) -> float:
    """The textbook form: HSIC of the linear Gram matrices with the centring matrix H."""
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
    return float(np.sum(k * l) / np.sqrt(np.sum(k * k) * np.sum(l * l)))


@pytest.mark.parametrize("n,p,q", [(10, 3, 7), (40, 16, 16), (25, 64, 8)])
def test_linear_cka_equals_the_gram_matrix_computation(n, p, q):
    rng = np.random.default_rng(n * p + q)
    x = rng.normal(size=(n, p))
    y = x[:, :1] @ rng.normal(size=(1, q)) + 0.5 * rng.normal(size=(n, q))
    assert linear_cka(x, y) == pytest.approx(cka_by_gram(x, y), rel=1e-10)


def test_linear_cka_invariances_and_extremes():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 8))
    rotation, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    assert linear_cka(x, 3.0 * x @ rotation + 5.0) == pytest.approx(1.0)
    independent = [linear_cka(rng.normal(size=(2000, 4)), rng.normal(size=(2000, 4))) for _ in range(3)]
    assert max(independent) < 0.02
    assert np.isnan(linear_cka(np.ones((5, 3)), x[:5]))


def test_mean_cosine_and_errors():
    x = np.array([[1.0, 0.0], [0.0, 2.0]])
    assert mean_cosine(x, x) == pytest.approx(1.0)
    assert mean_cosine(x, -x) == pytest.approx(-1.0)
    assert mean_cosine(x, x[:, ::-1]) == pytest.approx(0.0)
    with pytest.raises(DataError, match="number of samples"):
        linear_cka(x, x[:1])
    with pytest.raises(DataError, match="same width"):
        mean_cosine(x, np.ones((2, 3)))
    assert subspace_similarity(x, x)["n"] == 2


def _grid(n: int, size: int) -> np.ndarray:
    return np.array([(i * size, j * size) for j in range(n) for i in range(n)], dtype=float)


def test_20x_pooling_and_consistency_on_the_10x_grid():
    c10 = _grid(3, 448)  # 9 patches of 448 level-0 px
    c20 = _grid(6, 224)  # 36 patches, 4 inside each 10x patch
    a20 = np.arange(36, dtype=float)
    pooled, covered = pooled_20x_on_10x(c10, c20, a20, patch_size_10x_level0=448)
    assert covered.all()
    # the 10x patch at (0, 0) holds the 20x patches (0,0), (224,0), (0,224), (224,224): rows 0, 1, 6, 7
    assert pooled[0] == a20[[0, 1, 6, 7]].sum()
    assert pooled.sum() == a20.sum()
    same = slide_consistency({"10x": c10, "20x": c20}, {"10x": {"tumor": pooled}, "20x": {"tumor": a20}},
                             patch_size_10x_level0=448)
    assert same["tumor"]["spearman"] == pytest.approx(1.0) and same["tumor"]["cosine"] == pytest.approx(1.0)
    reverse = slide_consistency({"10x": c10, "20x": c20}, {"10x": {"tumor": -pooled}, "20x": {"tumor": a20}},
                                patch_size_10x_level0=448)
    assert reverse["tumor"]["spearman"] == pytest.approx(-1.0)


def _patches(coords: np.ndarray, size: int, mag: str, tumor, tme) -> pd.DataFrame:
    return pd.DataFrame({"x": coords[:, 0].astype(int), "y": coords[:, 1].astype(int), "width": size, "height": size,
                         "magnification": mag, "tumor_attention": tumor, "tme_attention": tme,
                         "ita_cluster": -1, "ita_centre": False})


def test_consistency_from_a_bundle_patch_table():
    c10, c20 = _grid(3, 448), _grid(6, 224)
    a20 = np.linspace(0, 1, 36)
    pooled, _ = pooled_20x_on_10x(c10, c20, a20, patch_size_10x_level0=448)
    table = pd.concat([_patches(c10, 448, "10x", pooled, pooled[::-1]), _patches(c20, 224, "20x", a20, a20)])
    result = bundle_consistency(table)
    assert result["tumor"]["spearman"] == pytest.approx(1.0)
    assert result["tme"]["spearman"] < 0
    with pytest.raises(DataError, match="needs 10x and 20x"):
        bundle_consistency(table[table.magnification == "10x"])


def test_teacher_student_agreement_matches_patches_by_position():
    rng = np.random.default_rng(1)
    c = _grid(5, 224)
    tumor, tme = rng.random(25), rng.random(25)
    student = _patches(c, 224, "20x", tumor, tme)
    teacher = _patches(c, 224, "20x", tumor ** 2, 1 - tme).sample(frac=1.0, random_state=0)  # shuffled rows
    result = attention_agreement(student, teacher)
    assert result["20x"]["tumor"]["spearman"] == pytest.approx(1.0)  # monotone: same ranks
    assert result["20x"]["tme"]["spearman"] == pytest.approx(-1.0)
    assert result["20x"]["tumor"]["n"] == 25
    merged = matched_patches(student, teacher)
    assert np.allclose(rank_difference(merged, "tumor"), 0.0)
    with pytest.raises(DataError, match="share no patch"):
        attention_agreement(student, _patches(c + 10_000, 224, "20x", tumor, tme))


def _teacher(split: bool):
    torch.manual_seed(0)
    return build_model({"kind": "teacher", "task": "classification", "n_outputs": 3, "d_in": 12, "d": 16,
                        "n_tumor_genes": 5, "n_tme_genes": 7, "dropout": 0.0, "subspace_split": split,
                        "gene_gate": False}).eval()  # ungated: a fresh gated teacher ignores its genes


def _inputs(batch: int = 3):
    g = torch.Generator().manual_seed(1)
    bags = {m: torch.randn(batch, 9, 12, generator=g) for m in ("10x", "20x")}
    genes = {"tumor": torch.randn(batch, 5, generator=g), "tme": torch.randn(batch, 7, generator=g)}
    return bags, genes


def _coords(batch: int = 3):
    """A 3 x 3 patch lattice per slide (10x patches 448 level-0 px, 20x 224: the teacher's default)."""
    cells = torch.stack(torch.meshgrid(torch.arange(3), torch.arange(3), indexing="xy"), -1).reshape(9, 2)
    return {m: (cells * step).expand(batch, 9, 2) for m, step in (("10x", 448), ("20x", 224))}


@pytest.mark.parametrize("split", [True, False])
def test_integrated_gradients_completeness(split):
    model = _teacher(split)
    bags, genes = _inputs()
    target = torch.tensor([0, 2, 1])
    coords = _coords()
    ig = integrated_gradients(model, bags, masks=None, genes=genes, target=target, steps=32, coords=coords)
    with torch.no_grad():
        full = subspace_scores(model, bags, masks=None, genes=genes, target=target, coords=coords)
        base = subspace_scores(model, bags, masks=None, genes={k: torch.zeros_like(v) for k, v in genes.items()},
                               target=target, coords=coords)
    for u in ("tumor", "tme"):
        total = sum(v.sum(-1) for v in ig[u].values())
        assert torch.allclose(total, full[u] - base[u], atol=2e-3 + 0.02 * float((full[u] - base[u]).abs().max()))
    if split:  # the tumor subspace cannot read TME genes, nor the TME subspace tumor genes
        assert torch.count_nonzero(ig["tumor"]["tme"]) == 0 and torch.count_nonzero(ig["tme"]["tumor"]) == 0
    else:
        assert torch.count_nonzero(ig["tumor"]["tme"]) > 0


def test_top_genes_ranks_by_mean_absolute_attribution():
    attributions = {"tumor": {"tumor": np.array([[1.0, -3.0], [1.0, 1.0]]), "tme": np.array([[0.0], [-2.0]])}}
    top = top_genes(attributions, {"tumor": ["A", "B"], "tme": ["C"]}, k=2)
    assert [r["gene"] for r in top["tumor"]["top"]] == ["B", "A"]
    assert top["tumor"]["share_by_group"]["tme"] == pytest.approx(1.0 / 4.0)


def test_attribution_refuses_a_model_without_genes():
    student = build_model({"kind": "abmil", "task": "classification", "n_outputs": 2, "d_in": 12, "d": 16})
    bags, genes = _inputs()
    with pytest.raises(ModelConfigError, match="teacher"):
        subspace_scores(student, bags, masks=None, genes=genes, target=None)


def test_pca_2d_finds_the_main_direction():
    rng = np.random.default_rng(0)
    t = rng.normal(size=100)
    x = np.stack([t, t + 0.01 * rng.normal(size=100), 0.01 * rng.normal(size=100)], 1)
    coords, ratio = pca_2d(x)
    assert coords.shape == (100, 2) and ratio[0] > 0.6
    assert abs(np.corrcoef(coords[:, 0], t)[0, 1]) > 0.99
    with pytest.raises(DataError):
        pca_2d(x[:2])
