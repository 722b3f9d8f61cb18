"""Procedural H&E-like texture, evaluated at arbitrary level-0 sample points.

Everything is a deterministic function of (layout, level-0 position), so a tile can be
rendered alone, at any level, and agree with its neighbours and with the other levels:
level pixel i samples level-0 position (i + 0.5) * downsample.

Tissue classes: 0 background, 1 tumor (dense large dark-purple nuclei on purple-pink
cytoplasm), 2 stroma (pink fibres, sparse elongated nuclei), 3 immune (packed small round
very dark nuclei). Region boundaries are ellipses perturbed by smooth value noise.

`Appearance` changes how tumor nuclei look and how many lymphocytes infiltrate the
stroma, so hidden patient states can be made visible; its defaults are the original look
(the default sample slide is byte-identical with or without it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

BACKGROUND_RGB = (243, 243, 243)
MARKER_RGB = (20, 200, 40)
_BASE = {1: (214, 160, 205), 2: (236, 172, 202), 3: (226, 176, 210)}
_FIBRE = (212, 128, 172)
# nucleus: (cell size µm, radius µm along, radius µm across, presence probability, RGB)
_NUCLEI = {
    1: (11.0, 4.6, 3.8, 0.92, (88, 48, 132)),
    2: (26.0, 6.0, 1.6, 0.55, (96, 56, 140)),
    3: (6.5, 2.6, 2.4, 0.85, (52, 28, 100)),
}


@dataclass(frozen=True)
class Appearance:
    """Per-slide look. Tumor: nucleus radius and cell spacing multipliers, presence
    probability, darkness (-1 paler .. 0 default .. +1 darker) and pleomorphism (relative
    spread of nucleus sizes). ``lymph_infiltration``: probability of a lymphocyte per
    immune-cell slot in stroma, gathered into clusters of ``lymph_cluster_um``."""

    tumor_nucleus_scale: float = 1.0
    tumor_cell_scale: float = 1.0
    tumor_presence: float = 0.92
    tumor_darkness: float = 0.0
    tumor_pleomorphism: float = 0.4
    lymph_infiltration: float = 0.0
    lymph_cluster_um: float = 60.0

    def is_default(self) -> bool:
        return self == Appearance()


_DARK_TUMOR, _PALE_TUMOR = (45, 20, 90), (160, 120, 185)


def _tumor_colour(app: Appearance) -> tuple[float, float, float]:
    base, d = np.asarray(_NUCLEI[1][4], np.float64), app.tumor_darkness
    if d == 0:
        return _NUCLEI[1][4]
    other = np.asarray(_DARK_TUMOR if d > 0 else _PALE_TUMOR, np.float64)
    return tuple(base + min(abs(d), 1.0) * (other - base))


def _nucleus_spec(app: Appearance, label: int) -> tuple[float, float, float, float, tuple, float]:
    """(cell µm, radius along, radius across, presence, RGB, pleomorphism) of one class."""
    cell, ra, rb, prob, colour = _NUCLEI[label]
    if label != 1 or app.is_default():
        return cell, ra, rb, prob, colour, 0.4
    s = app.tumor_nucleus_scale
    return cell * app.tumor_cell_scale, ra * s, rb * s, app.tumor_presence, _tumor_colour(app), app.tumor_pleomorphism


@dataclass(frozen=True)
class Layout:
    """Planted regions: rows of (cx, cy, a, b, theta, label) in level-0 pixels, painted in
    order (later rows win); markers are (x, y, size) green squares for alignment checks."""

    ellipses: np.ndarray
    mpp: float
    seed: int
    noise_amp: float = 0.18
    markers: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    appearance: Appearance = field(default_factory=Appearance)


def _hash01(ix: np.ndarray, iy: np.ndarray, seed: int, salt: int) -> np.ndarray:
    """Integer lattice -> uniform [0, 1) (xorshift-multiply hash, vectorised)."""
    h = (ix.astype(np.int64) * 0x1F123BB5 + iy.astype(np.int64) * 0x5F356495 + seed * 0x2545F491 + salt * 0x9E3779B9)
    h = (h & 0xFFFFFFFF).astype(np.uint64)
    h ^= h >> np.uint64(16)
    h = (h * np.uint64(0x7FEB352D)) & np.uint64(0xFFFFFFFF)
    h ^= h >> np.uint64(15)
    h = (h * np.uint64(0x846CA68B)) & np.uint64(0xFFFFFFFF)
    h ^= h >> np.uint64(16)
    return (h.astype(np.float64) / 4294967296.0).astype(np.float32)


def _smooth(t: np.ndarray) -> np.ndarray:
    return t * t * (3 - 2 * t)


def value_noise(x: np.ndarray, y: np.ndarray, *, scale: float, seed: int, salt: int) -> np.ndarray:
    """Smooth noise in [-1, 1] with feature size `scale` (broadcastable x, y).

    A row vector x (1, w) with a column vector y (h, 1) takes a fast path that hashes only
    the few lattice points the grid touches."""
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim == 2 and y.ndim == 2 and x.shape[0] == 1 and y.shape[1] == 1:
        gx, gy = x[0] / scale, y[:, 0] / scale
        ix, iy = np.floor(gx), np.floor(gy)
        fx, fy = _smooth(gx - ix).astype(np.float32), _smooth(gy - iy).astype(np.float32)
        ix0, iy0 = ix.min(), iy.min()
        lattice = _hash01(np.arange(ix0, ix.max() + 2)[None, :], np.arange(iy0, iy.max() + 2)[:, None], seed, salt)
        a, b = (ix - ix0).astype(np.intp), (iy - iy0).astype(np.intp)
        rows = lattice[:, a] + (lattice[:, a + 1] - lattice[:, a]) * fx  # (lattice rows, w)
        out = rows[b] + (rows[b + 1] - rows[b]) * fy[:, None]
        return out * 2 - 1
    gx, gy = x / scale, y / scale
    ix, iy = np.floor(gx), np.floor(gy)
    fx, fy = _smooth(gx - ix), _smooth(gy - iy)
    v00 = _hash01(ix, iy, seed, salt)
    v10 = _hash01(ix + 1, iy, seed, salt)
    v01 = _hash01(ix, iy + 1, seed, salt)
    v11 = _hash01(ix + 1, iy + 1, seed, salt)
    top = v00 + (v10 - v00) * fx
    bottom = v01 + (v11 - v01) * fx
    return (top + (bottom - top) * fy) * 2 - 1


def labels_at(layout: Layout, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Class label at level-0 positions (broadcastable float arrays)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    out = np.zeros(np.broadcast_shapes(x.shape, y.shape), dtype=np.uint8)
    if out.size == 0:
        return out
    xmin, xmax, ymin, ymax = x.min(), x.max(), y.min(), y.max()
    for i, (cx, cy, a, b, theta, label) in enumerate(layout.ellipses):
        reach = max(a, b) * (1 + layout.noise_amp)
        if xmax < cx - reach or xmin > cx + reach or ymax < cy - reach or ymin > cy + reach:
            continue
        c, s = np.cos(theta), np.sin(theta)
        dx, dy = (x - cx).astype(np.float32), (y - cy).astype(np.float32)
        u = dx * np.float32(c / a) + dy * np.float32(s / a)
        v = dy * np.float32(c / b) - dx * np.float32(s / b)
        n = value_noise(x, y, scale=0.4 * min(a, b), seed=layout.seed, salt=i + 1)
        out[u * u + v * v < (1 + layout.noise_amp * n) ** 2] = int(label)
    return out


def touches_content(layout: Layout, x0: float, y0: float, x1: float, y1: float) -> bool:
    """Whether the level-0 box may contain tissue or a marker (else it is pure background)."""
    for cx, cy, a, b, _, _ in layout.ellipses:
        reach = max(a, b) * (1 + layout.noise_amp)
        if x1 >= cx - reach and x0 <= cx + reach and y1 >= cy - reach and y0 <= cy + reach:
            return True
    for mx, my, size in layout.markers:
        if x1 >= mx and x0 <= mx + size and y1 >= my and y0 <= my + size:
            return True
    return False


def _cluster_field(layout: Layout, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Where infiltrating lymphocytes gather: 0 outside clusters, up to 1 inside."""
    scale = layout.appearance.lymph_cluster_um / layout.mpp
    return np.clip(2.0 * value_noise(x, y, scale=scale, seed=layout.seed, salt=200), 0, 1).astype(np.float32)


def _nucleus_coverage(
    layout: Layout, label: int, xs: np.ndarray, ys: np.ndarray, ds: float, *, infiltrate: bool = False
) -> np.ndarray:
    """Per-pixel nucleus coverage in [0, 1] for one class: stamped nuclei when they span a
    few pixels, their mean coverage (density x area) when they are sub-pixel.
    ``infiltrate``: lymphocytes (class 3 nuclei) scattered in clusters over stroma."""
    if infiltrate:
        cell_um, ra_um, rb_um, _, _ = _NUCLEI[3]
        prob, spread, owner, salt = layout.appearance.lymph_infiltration, 0.4, 2, 50
    else:
        cell_um, ra_um, rb_um, prob, _, spread = _nucleus_spec(layout.appearance, label)
        owner, salt = label, 10 * label
    cell, ra, rb = cell_um / layout.mpp, ra_um / layout.mpp, rb_um / layout.mpp
    h, w = len(ys), len(xs)
    if rb / ds < 1.5:
        mean = prob * np.pi * ra * rb / cell**2
        grain = value_noise(xs[None, :], ys[:, None], scale=cell * 1.5, seed=layout.seed, salt=100 + salt // 10)
        if infiltrate:
            grain = grain + 2 * _cluster_field(layout, xs[None, :], ys[:, None]) - 1
        return np.clip(mean * (1 + 0.5 * grain), 0, 1).astype(np.float32)
    cov = np.zeros((h, w), dtype=np.float32)
    margin = ra + cell
    gx = np.arange(np.floor((xs[0] - margin) / cell), np.floor((xs[-1] + margin) / cell) + 1)
    gy = np.arange(np.floor((ys[0] - margin) / cell), np.floor((ys[-1] + margin) / cell) + 1)
    ix, iy = np.meshgrid(gx, gy)
    ix, iy = ix.ravel(), iy.ravel()
    keep = _hash01(ix, iy, layout.seed, salt) < prob
    ix, iy = ix[keep], iy[keep]
    cx = (ix + 0.15 + 0.7 * _hash01(ix, iy, layout.seed, salt + 1)) * cell
    cy = (iy + 0.15 + 0.7 * _hash01(ix, iy, layout.seed, salt + 2)) * cell
    size = (1 - spread / 2) + spread * _hash01(ix, iy, layout.seed, salt + 3)
    if label == 2 and not infiltrate:  # stroma nuclei follow the fibres
        theta = np.pi * value_noise(cx, cy, scale=400 / layout.mpp, seed=layout.seed, salt=7)
    else:
        theta = np.pi * _hash01(ix, iy, layout.seed, salt + 4)
    own = labels_at(layout, cx, cy) == owner
    if infiltrate:
        own &= _hash01(ix, iy, layout.seed, salt + 5) < _cluster_field(layout, cx, cy)
    x0, y0 = xs[0] - 0.5 * ds, ys[0] - 0.5 * ds  # level-0 left/top edge of the pixel grid
    for cxi, cyi, si, ti in zip(cx[own], cy[own], size[own], theta[own], strict=True):
        a_, b_ = ra * si, rb * si
        c0 = max(0, int((cxi - a_ - x0) / ds))
        c1 = min(w, int((cxi + a_ - x0) / ds) + 2)
        r0 = max(0, int((cyi - a_ - y0) / ds))
        r1 = min(h, int((cyi + a_ - y0) / ds) + 2)
        if c1 <= c0 or r1 <= r0:
            continue
        dx = xs[c0:c1][None, :] - cxi
        dy = ys[r0:r1][:, None] - cyi
        c, s = np.cos(ti), np.sin(ti)
        d = np.sqrt(((dx * c + dy * s) / a_) ** 2 + ((dy * c - dx * s) / b_) ** 2)
        edge = np.clip((1 - d) * b_ / ds + 0.5, 0, 1)
        np.maximum(cov[r0:r1, c0:c1], edge, out=cov[r0:r1, c0:c1])
    return cov


def render(layout: Layout, xs: np.ndarray, ys: np.ndarray, *, ds: float, rng: np.random.Generator) -> np.ndarray:
    """RGB uint8 (len(ys), len(xs), 3) sampling level-0 column centres xs and row centres ys."""
    h, w = len(ys), len(xs)
    lab = labels_at(layout, xs[None, :], ys[:, None])
    xs, ys = xs.astype(np.float32), ys.astype(np.float32)
    palette = np.asarray([BACKGROUND_RGB, _BASE[1], _BASE[2], _BASE[3]], dtype=np.float32)
    img = palette[lab]
    present = np.bincount(lab.ravel(), minlength=4) > 0
    if present[1:].any():
        if present[2]:
            period = 9.0 / layout.mpp
            angle = np.pi * value_noise(xs[None, :], ys[:, None], scale=400 / layout.mpp, seed=layout.seed, salt=7)
            phase = (xs[None, :] * np.cos(angle) + ys[:, None] * np.sin(angle)) * np.float32(1 / period)
            warp = value_noise(xs[None, :], ys[:, None], scale=period * 3, seed=layout.seed, salt=8)
            fade = np.float32(0.3 * np.exp(-((ds * 2.0 / period) ** 2)))  # fade what a level cannot resolve
            fibre = fade + fade * np.sin(np.float32(2 * np.pi) * (phase + warp))
            mix = (fibre * (lab == 2))[..., None]
            img += (np.asarray(_FIBRE, np.float32) - img) * mix
        for label in _NUCLEI:
            if not present[label]:
                continue
            colour = _nucleus_spec(layout.appearance, label)[4]
            cov = _nucleus_coverage(layout, label, xs, ys, ds) * (lab == label)
            img += (np.asarray(colour, np.float32) - img) * cov[..., None]
            if label == 2 and layout.appearance.lymph_infiltration > 0:
                cov = _nucleus_coverage(layout, 2, xs, ys, ds, infiltrate=True) * (lab == 2)
                img += (np.asarray(_NUCLEI[3][4], np.float32) - img) * cov[..., None]
        noise = rng.standard_normal(size=(h, w), dtype=np.float32) * 4.0
        img += (noise * (lab > 0))[..., None]
    for mx, my, size in layout.markers:
        cols = (xs >= mx) & (xs < mx + size)
        rows = (ys >= my) & (ys < my + size)
        if cols.any() and rows.any():
            img[np.ix_(rows, cols)] = MARKER_RGB
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
