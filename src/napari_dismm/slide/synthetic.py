"""Generated H&E-like pyramidal TIFF slides with a recorded ground-truth layout.

`write_sample_slide` writes levels as successive pages (reduced ones with subfiletype=1,
so OpenSlide sees the pyramid) with resolution tags in centimetres (so OpenSlide and we
read the mpp). Tiles are rendered one at a time from a procedural function of level-0
position (see `_render`), so slides of any size are written in bounded memory; tiles
that can only hold background are encoded once and the bytes reused, which makes a
100 000 x 80 000 px slide a matter of a minute or two.

The planted layout is saved beside the slide as ``<path>.regions.npz`` and returned as a
`SampleSlide`: a low-resolution label map (0 background, 1 tumor, 2 stroma, 3 immune) at a
known downsample plus exact `labels_at` / `region_mask` helpers.

Optional appearance knobs (`Appearance`, tumor nest size, immune cluster count and size)
let hidden patient states show in the pixels (`state_appearance`): the rendered synthetic
cohort of `training.synth.rendered` is built on them. Left at their defaults, the output is
byte-identical to the generator's first version, so cached samples stay valid.
"""

from __future__ import annotations

import math
import os
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from ..errors import SlideError
from ._render import BACKGROUND_RGB, Appearance, Layout, labels_at, render, touches_content

#: Bump when the rendering or layout changes, so cached samples are regenerated.
GENERATOR_VERSION = 1
CLASS_NAMES = ("background", "tumor", "stroma", "immune")
DEFAULT_SIZE = (8192, 6144)


@dataclass(frozen=True)
class SampleSlide:
    """A generated slide and the ground truth planted in it (level-0 pixel units)."""

    path: Path
    mpp: float
    dimensions: tuple[int, int]  # (width, height)
    level_dimensions: tuple[tuple[int, int], ...]
    label_map: np.ndarray = field(repr=False)  # uint8 (H / ds, W / ds)
    label_downsample: int
    class_names: tuple[str, ...]
    markers: tuple[tuple[int, int, int], ...]  # (x, y, size) green squares
    layout: Layout = field(repr=False)

    def labels_at(self, x0, y0) -> np.ndarray:
        """Exact class label(s) at level-0 position(s) (scalars or broadcastable arrays)."""
        return labels_at(self.layout, np.asarray(x0, dtype=np.float64), np.asarray(y0, dtype=np.float64))

    def region_mask(self, label: int | str, downsample: float) -> np.ndarray:
        """Boolean mask of one class on a grid of `downsample` level-0 px per cell
        (cell centres sampled exactly), shape (ceil(H / ds), ceil(W / ds))."""
        if isinstance(label, str):
            if label not in self.class_names:
                raise SlideError(f"unknown class {label!r}; expected one of {self.class_names}")
            label = self.class_names.index(label)
        if downsample <= 0:
            raise SlideError(f"downsample must be positive, got {downsample}")
        w, h = self.dimensions
        xs = (np.arange(math.ceil(w / downsample)) + 0.5) * downsample
        ys = (np.arange(math.ceil(h / downsample)) + 0.5) * downsample
        return labels_at(self.layout, xs[None, :], ys[:, None]) == label


def state_appearance(*, tumor_state: int, tme_state: int, strength: float = 1.0) -> dict:
    """`write_sample_slide` keyword arguments that make two hidden states visible.

    Tumor high: larger nests of larger, darker, crowded, pleomorphic nuclei; low: smaller
    nests of small, pale, sparse nuclei. TME hot: many larger immune clusters and lymphocyte
    clusters infiltrating the stroma; cold: one or two small clusters, no infiltration.
    ``strength`` in (0, 1] moves from the default look (0) to the full contrast (1): the
    default sample slide lies between the states, inside the range a cohort spans."""
    if tumor_state not in (0, 1) or tme_state not in (0, 1):
        raise SlideError(f"states must be 0 or 1, got tumor {tumor_state}, TME {tme_state}")
    if not 0 <= strength <= 1:
        raise SlideError(f"strength must be in [0, 1], got {strength}")
    t, e = strength * (2 * tumor_state - 1), strength * (2 * tme_state - 1)
    look = Appearance(
        tumor_nucleus_scale=1.0 + 0.25 * t,
        tumor_cell_scale=1.0 - 0.18 * t,
        tumor_presence=0.92 + (0.06 * t if t > 0 else 0.25 * t),
        tumor_darkness=0.7 * t,
        tumor_pleomorphism=0.4 + 0.3 * t,
        lymph_infiltration=0.55 * max(e, 0.0),
    )
    return {
        "appearance": look,
        "tumor_size": 1.0 + 0.3 * t,
        "immune_clusters": (4, 6) if e > 0 else (1, 2) if e < 0 else (2, 4),
        "immune_size": 1.0 + 0.6 * e,
    }


def sidecar_path(path: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(path)}.regions.npz")


def make_layout(
    *, width: int, height: int, mpp: float, seed: int, tissue_fraction: float, markers=(),
    tumor_size: float = 1.0, immune_clusters: tuple[int, int] = (2, 4), immune_size: float = 1.0,
    appearance: Appearance | None = None,
) -> Layout:
    """Random tissue pieces (stroma) holding tumor nests and immune clusters.

    ``tumor_size`` scales the nests' axes, ``immune_clusters`` is the inclusive range of
    immune clusters per piece and ``immune_size`` scales their radius."""
    rng = np.random.default_rng(seed)
    n_pieces = 1 if tissue_fraction > 0.3 else int(rng.integers(2, 4))
    total = tissue_fraction * width * height
    rows = []
    for k in range(n_pieces):
        area = total / n_pieces
        ratio = rng.uniform(0.65, 0.95)
        a = math.sqrt(area / (math.pi * ratio))
        b = a * ratio
        a, b = min(a, 0.45 * width), min(b, 0.45 * height)
        if n_pieces == 1:
            cx, cy = width / 2 + rng.uniform(-0.05, 0.05) * width, height / 2 + rng.uniform(-0.05, 0.05) * height
        else:
            cx = (k + 0.5) / n_pieces * width
            cy = rng.uniform(max(b, 0.2 * height), min(height - b, 0.8 * height)) if height > 2 * b else height / 2
        theta = rng.uniform(-0.3, 0.3)
        rows.append((cx, cy, a, b, theta, 2))
        for _ in range(int(rng.integers(1, 3))):
            off = rng.uniform(-0.35, 0.35, size=2) * (a, b)
            ta, tb = a * rng.uniform(0.25, 0.4) * tumor_size, b * rng.uniform(0.25, 0.4) * tumor_size
            rows.append((cx + off[0], cy + off[1], ta, tb, rng.uniform(0, np.pi), 1))
        for _ in range(int(rng.integers(immune_clusters[0], immune_clusters[1] + 1))):
            ang = rng.uniform(0, 2 * np.pi)
            rad = rng.uniform(0.45, 0.7)
            r = min(a, b) * rng.uniform(0.07, 0.12) * immune_size
            ix, iy = cx + rad * a * np.cos(ang), cy + rad * b * np.sin(ang)
            rows.append((ix, iy, r, r * rng.uniform(0.7, 1), rng.uniform(0, np.pi), 3))
    marker_arr = np.asarray(markers, dtype=np.float64).reshape(-1, 3)
    return Layout(
        ellipses=np.asarray(rows, dtype=np.float64), mpp=mpp, seed=seed, markers=marker_arr,
        appearance=appearance or Appearance(),
    )


def _level_sizes(width: int, height: int, n_levels: int | None) -> list[tuple[int, int]]:
    """Level k is (W >> k, H >> k): odd sizes give non-integer downsamples such as 2.0004."""
    sizes = [(width, height)]
    while (n_levels is None and max(sizes[-1]) > 1024) or (n_levels is not None and len(sizes) < n_levels):
        w, h = sizes[-1]
        if min(w, h) < 2:
            break
        sizes.append((max(1, width >> len(sizes)), max(1, height >> len(sizes))))
    return sizes


def _encoder(compression: str, quality: int):
    import imagecodecs

    match compression:
        case "jpeg":
            return "jpeg", lambda t: imagecodecs.jpeg8_encode(t, level=quality)
        case "zlib" | "deflate":
            return "zlib", lambda t: zlib.compress(t.tobytes(), 6)
        case "none":
            return None, lambda t: t.tobytes()
    raise SlideError(f"unknown compression {compression!r}; use jpeg, zlib or none")


def _tiles(layout: Layout, *, level_size, base_size, tile: int, encode, level: int) -> Iterator[bytes]:
    w, h = level_size
    dsx, dsy = base_size[0] / w, base_size[1] / h
    blank = encode(np.full((tile, tile, 3), BACKGROUND_RGB, dtype=np.uint8))
    for ty in range(-(-h // tile)):
        ys = (ty * tile + np.arange(tile) + 0.5) * dsy
        for tx in range(-(-w // tile)):
            xs = (tx * tile + np.arange(tile) + 0.5) * dsx
            if not touches_content(layout, xs[0] - dsx, ys[0] - dsy, xs[-1] + dsx, ys[-1] + dsy):
                yield blank
                continue
            rng = np.random.default_rng((layout.seed, level, tx, ty))
            yield encode(render(layout, xs, ys, ds=(dsx + dsy) / 2, rng=rng))


def write_sample_slide(
    path: str | os.PathLike,
    *,
    width: int = DEFAULT_SIZE[0],
    height: int = DEFAULT_SIZE[1],
    mpp: float = 0.25,
    tile: int = 512,
    n_levels: int | None = None,
    seed: int = 0,
    compression: str = "jpeg",
    quality: int = 90,
    tissue_fraction: float = 0.45,
    markers: Sequence[tuple[int, int, int]] = (),
    appearance: Appearance | None = None,
    tumor_size: float = 1.0,
    immune_clusters: tuple[int, int] = (2, 4),
    immune_size: float = 1.0,
) -> SampleSlide:
    """Write a pyramidal H&E-like TIFF and its `.regions.npz` sidecar; returns the truth.

    ``appearance``, ``tumor_size``, ``immune_clusters`` and ``immune_size`` change the look
    and the planted layout (see `make_layout`, `state_appearance`); the label map records
    whatever was planted."""
    import tifffile

    if width < 1 or height < 1 or tile % 16 or tile < 16:
        raise SlideError(f"bad sample slide geometry {width}x{height}, tile {tile} (tile must be a multiple of 16)")
    if not 0 < tissue_fraction <= 0.6:
        raise SlideError(f"tissue_fraction must be in (0, 0.6], got {tissue_fraction}")
    lo, hi = immune_clusters
    if not (0 <= lo <= hi and 0 < tumor_size <= 2.5 and 0 < immune_size <= 4):
        raise SlideError(
            f"bad layout knobs: immune_clusters {immune_clusters} (need 0 <= lo <= hi), "
            f"tumor_size {tumor_size} (0, 2.5], immune_size {immune_size} (0, 4]"
        )
    path = Path(path)
    layout = make_layout(
        width=width, height=height, mpp=mpp, seed=seed, tissue_fraction=tissue_fraction, markers=markers,
        tumor_size=tumor_size, immune_clusters=(int(lo), int(hi)), immune_size=immune_size, appearance=appearance,
    )
    sizes = _level_sizes(width, height, n_levels)
    tiff_compression, encode = _encoder(compression, quality)
    bigtiff = width * height * 3 * 4 // 3 > 2**31
    res = 1e4 / mpp  # pixels per centimetre
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tw:
        for level, size in enumerate(sizes):
            tw.write(
                _tiles(layout, level_size=size, base_size=(width, height), tile=tile, encode=encode, level=level),
                shape=(size[1], size[0], 3),
                dtype=np.uint8,
                tile=(tile, tile),
                compression=tiff_compression,
                photometric="ycbcr" if tiff_compression == "jpeg" else "rgb",
                subsampling=(2, 2) if tiff_compression == "jpeg" else None,
                subfiletype=1 if level else 0,
                resolution=(res * size[0] / width, res * size[1] / height),
                resolutionunit="CENTIMETER",
                description="napari-dismm synthetic H&E" if level == 0 else None,
                metadata=None,
            )
    label_ds = 2 ** max(0, math.ceil(math.log2(max(width, height) / 1024)))
    xs = (np.arange(math.ceil(width / label_ds)) + 0.5) * label_ds
    ys = (np.arange(math.ceil(height / label_ds)) + 0.5) * label_ds
    label_map = labels_at(layout, xs[None, :], ys[:, None])
    extra = {}
    if not layout.appearance.is_default():  # default sidecars stay byte-identical
        extra = {f"appearance_{k}": v for k, v in asdict(layout.appearance).items()}
    np.savez_compressed(
        sidecar_path(path),
        **extra,
        label_map=label_map,
        label_downsample=label_ds,
        class_names=np.asarray(CLASS_NAMES),
        mpp=mpp,
        dimensions=np.asarray((width, height)),
        level_dimensions=np.asarray(sizes),
        ellipses=layout.ellipses,
        markers=layout.markers,
        noise_amp=layout.noise_amp,
        seed=seed,
        generator_version=GENERATOR_VERSION,
    )
    return _sample(path, layout, sizes, label_map, label_ds)


def _sample(path: Path, layout: Layout, sizes, label_map, label_ds: int) -> SampleSlide:
    return SampleSlide(
        path=Path(path),
        mpp=layout.mpp,
        dimensions=tuple(sizes[0]),
        level_dimensions=tuple(tuple(int(v) for v in s) for s in sizes),
        label_map=label_map,
        label_downsample=int(label_ds),
        class_names=CLASS_NAMES,
        markers=tuple(tuple(int(v) for v in m) for m in layout.markers),
        layout=layout,
    )


def load_sample_slide(path: str | os.PathLike) -> SampleSlide:
    """Reload the truth of a slide written by `write_sample_slide` from its sidecar."""
    side = sidecar_path(path)
    if not side.exists():
        raise SlideError(f"no ground-truth sidecar {side.name} beside {Path(path).name}")
    with np.load(side, allow_pickle=False) as z:
        look = {f.name: float(z[f"appearance_{f.name}"]) for f in fields(Appearance) if f"appearance_{f.name}" in z}
        layout = Layout(
            ellipses=z["ellipses"], mpp=float(z["mpp"]), seed=int(z["seed"]),
            noise_amp=float(z["noise_amp"]), markers=z["markers"], appearance=Appearance(**look),
        )
        sizes = [tuple(int(v) for v in s) for s in z["level_dimensions"]]
        return _sample(Path(path), layout, sizes, z["label_map"], int(z["label_downsample"]))


def cache_dir() -> Path:
    """``$NAPARI_DISMM_CACHE``, else ``$XDG_CACHE_HOME/napari-dismm``, else ~/.cache/napari-dismm."""
    env = os.environ.get("NAPARI_DISMM_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "napari-dismm"


def sample_slide_path() -> Path:
    """The default sample slide (8192 x 6144 px, 0.25 µm/px, 4 levels), written once per
    generator version into the user cache; written to a temporary name and renamed, so a
    crash or a concurrent caller never sees half a file."""
    folder = cache_dir()
    target = folder / f"dismm-sample-v{GENERATOR_VERSION}-{DEFAULT_SIZE[0]}x{DEFAULT_SIZE[1]}.tif"
    if target.exists() and sidecar_path(target).exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tif.part")
    os.close(fd)
    try:
        write_sample_slide(tmp)
        os.replace(sidecar_path(tmp), sidecar_path(target))
        os.replace(tmp, target)
    finally:
        for leftover in (Path(tmp), sidecar_path(tmp)):
            leftover.unlink(missing_ok=True)
    return target
