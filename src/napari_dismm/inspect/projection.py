"""A 2-D view of slide features: PCA (sklearn), no UMAP, so the axes mean something
(the directions of largest variance, with their explained share)."""

from __future__ import annotations

import numpy as np

from napari_dismm.errors import DataError


def pca_2d(features: np.ndarray, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """((n, 2) coordinates, (2,) explained variance ratio) of standardised features."""
    from sklearn.decomposition import PCA

    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 3:
        raise DataError(f"PCA needs (samples >= 3, width) features, got {x.shape}")
    sd = x.std(axis=0)
    x = (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    n_components = min(2, x.shape[1], x.shape[0])
    pca = PCA(n_components=n_components, random_state=seed)
    coords = pca.fit_transform(x)
    ratio = pca.explained_variance_ratio_
    if n_components < 2:
        coords = np.pad(coords, ((0, 0), (0, 2 - n_components)))
        ratio = np.pad(ratio, (0, 2 - n_components))
    return coords, ratio
