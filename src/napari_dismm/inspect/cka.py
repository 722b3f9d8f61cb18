"""How similar are two sets of features of the same samples? Linear CKA and cosine.

Linear CKA (Kornblith et al. 2019) compares two representations X (n, p) and Y (n, q) of
the same n samples, invariant to rotation and isotropic scaling of either:

    CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F),   Xc, Yc column-centred.

1 means the two subspaces carry the same information up to a rotation; near 0 means
they vary independently over the samples. It needs no matching of dimensions, which is
why it (and not the per-sample cosine) answers "did the subspaces disentangle?".
The cosine here is the mean over samples of cos(x_i, y_i): it asks whether the two
vectors of one sample point the same way, which depends on the basis.
"""

from __future__ import annotations

import numpy as np

from napari_dismm.errors import DataError


def _pair(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2:
        raise DataError(f"features must be (samples, width), got {x.shape} and {y.shape}")
    if x.shape[0] != y.shape[0]:
        raise DataError(f"features disagree on the number of samples: {x.shape[0]} vs {y.shape[0]}")
    if x.shape[0] < 2:
        raise DataError(f"CKA needs at least 2 samples, got {x.shape[0]}")
    return x, y


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of (n, p) and (n, q) features of the same n samples, in [0, 1].

    Computed in feature space (p x q cross-covariance), so it costs O(n (p + q)^2) and
    never forms the n x n Gram matrices. NaN when either side is constant over samples."""
    x, y = _pair(x, y)
    xc = x - x.mean(axis=0)
    yc = y - y.mean(axis=0)
    cross = np.linalg.norm(yc.T @ xc) ** 2
    norm = np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc)
    if norm <= 0 or not np.isfinite(norm):
        return float("nan")
    return float(cross / norm)


def mean_cosine(x: np.ndarray, y: np.ndarray) -> float:
    """Mean over samples of the cosine between x_i and y_i (same width required)."""
    x, y = _pair(x, y)
    if x.shape[1] != y.shape[1]:
        raise DataError(f"cosine needs features of the same width, got {x.shape[1]} and {y.shape[1]}")
    nx = np.linalg.norm(x, axis=1)
    ny = np.linalg.norm(y, axis=1)
    keep = (nx > 0) & (ny > 0)
    if not keep.any():
        return float("nan")
    return float(np.mean(np.sum(x[keep] * y[keep], axis=1) / (nx[keep] * ny[keep])))


def subspace_similarity(tumor: np.ndarray, tme: np.ndarray) -> dict[str, float]:
    """{"cka": linear CKA, "cosine": mean per-sample cosine} of tumor vs TME features."""
    return {"cka": linear_cka(tumor, tme), "cosine": mean_cosine(tumor, tme), "n": int(np.asarray(tumor).shape[0])}
