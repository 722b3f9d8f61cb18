"""Slides as torch samples: feature bags per magnification, gene vectors and the target.

Why a byte-bounded cache: an epoch reads every bag, and re-reading h5 files each epoch
costs more than the model on CPU; a cohort's bags usually fit in memory (the default
budget, 2 GB, holds ~500 slides of 1024-d features at 1000 patches), so they are read once.
Larger cohorts fall back to least-recently-used eviction under the same budget.

What is fitted on a training fold (expression statistics, survival bin edges) is passed
in, never computed here: a validation or test dataset must use the training fold's.

Geometry (issue 14): every bag carries its own patch footprint (its file's
``patch_size_level0``, else its lattice step; ``bag_footprint``), because a cohort mixes
scanners. A training-time subset of a large bag is a set of spatial blocks of 10x cells,
the same blocks at every magnification (``geometric_subset``): a kept 20x patch keeps its
10x parent and most of its lattice neighbours, so the DEV loss and the spatial context see
in training what they see on whole bags at prediction.
"""

from __future__ import annotations

import math
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from napari_dismm.errors import DataError, FeatureFileError
from napari_dismm.features.h5 import bag_footprint, read_features
from napari_dismm.model.context import magnification_number
from napari_dismm.model.losses import survival_bins_from_times, time_to_bin
from napari_dismm.omics import ExpressionNormaliser
from training.cohort import Cohort, SlideRecord
from training.splits import Fold

DEFAULT_CACHE_BYTES = 2 * 1024**3

#: side of a training block in cells of the coarsest magnification (12 x 12 10x cells: 144 10x
#: and 576 20x patches of full tissue, ~7 blocks under the default cap of 4096)
BLOCK_CELLS = 12


# -- cache ----------------------------------------------------------------------------------


class BagCache:
    """Loaded (features, coords) per file, least recently used dropped beyond ``max_bytes``."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[Path, tuple[Tensor, Tensor]] = OrderedDict()
        self._footprints: dict[Path, float | None] = {}  # tiny: kept for every file ever read

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, path: Path) -> bool:
        return Path(path) in self._items

    def get(self, path: str | Path) -> tuple[Tensor, Tensor]:
        """(N, D) float32 features and (N, 2) int64 coords of one feature file."""
        path = Path(path)
        if path in self._items:
            self.hits += 1
            self._items.move_to_end(path)
            return self._items[path]
        self.misses += 1
        ff = read_features(path)
        self._footprints[path] = bag_footprint(ff, where=str(path))
        item = (torch.from_numpy(ff.features), torch.from_numpy(ff.coords))
        size = item[0].nbytes + item[1].nbytes
        if size <= self.max_bytes:
            self._items[path] = item
            self.nbytes += size
            while self.nbytes > self.max_bytes:
                _, (f, c) = self._items.popitem(last=False)
                self.nbytes -= f.nbytes + c.nbytes
        return item

    def footprint(self, path: str | Path) -> float | None:
        """The bag's patch side in level-0 px (``bag_footprint``; None if unknown), read once."""
        path = Path(path)
        if path not in self._footprints:
            self.get(path)
        return self._footprints[path]


def feature_bytes(paths: Sequence[str | Path]) -> int:
    """Bytes the features and coords of these files take once loaded (shapes only, no data read)."""
    total = 0
    for path in paths:
        try:
            with h5py.File(path, "r") as h5:
                n, d = h5["features"].shape
        except (OSError, KeyError, ValueError) as error:
            raise FeatureFileError(f"cannot read the feature shape of {path}: {error}") from None
        total += n * d * 4 + n * 2 * 8
    return total


# -- samples and batches -----------------------------------------------------------------------


@dataclass
class SlideItem:
    """One slide. ``target``: class index, or the time bin (survival, with ``event``, ``time``)."""

    slide_id: str
    patient_id: str
    bags: dict[str, Tensor]  # mag -> (N, D) float32
    coords: dict[str, Tensor]  # mag -> (N, 2) int64 level-0 x, y
    genes: dict[str, Tensor] | None  # "tumor" -> (G_T,), "tme" -> (G_E,)
    target: Tensor  # () int64
    event: Tensor | None = None  # () float32, 1 = event observed
    time: Tensor | None = None  # () float32
    footprints: dict[str, float | None] = field(default_factory=dict)  # mag -> level-0 patch side


@dataclass
class Batch:
    """Padded slides; masks are True on real patches. ``model_kwargs`` feeds ``forward``."""

    slide_ids: list[str]
    patient_ids: list[str]
    bags: dict[str, Tensor]  # mag -> (B, N, D)
    coords: dict[str, Tensor]  # mag -> (B, N, 2)
    masks: dict[str, Tensor]  # mag -> (B, N) bool
    genes: dict[str, Tensor] | None  # name -> (B, G)
    target: Tensor  # (B,) int64
    event: Tensor | None = None  # (B,)
    time: Tensor | None = None  # (B,)
    extras: dict[str, object] = field(default_factory=dict)
    footprints: dict[str, Tensor] | None = None  # mag -> (B,) float64 level-0 patch side, NaN = unknown

    def __len__(self) -> int:
        return len(self.slide_ids)

    def model_kwargs(self) -> dict[str, object]:
        """Keyword arguments of the models' ``forward(bags, *, coords, masks, genes, footprints)``."""
        return {"coords": self.coords, "masks": self.masks, "genes": self.genes, "footprints": self.footprints}

    def to(self, device: torch.device | str) -> Batch:
        def move(d: dict[str, Tensor] | None) -> dict[str, Tensor] | None:
            return None if d is None else {k: v.to(device) for k, v in d.items()}

        return replace(
            self,
            bags=move(self.bags),
            coords=move(self.coords),
            masks=move(self.masks),
            genes=move(self.genes),
            footprints=move(self.footprints),
            target=self.target.to(device),
            event=None if self.event is None else self.event.to(device),
            time=None if self.time is None else self.time.to(device),
        )


def collate_bags(items: Sequence[SlideItem]) -> Batch:
    """Stack slides, zero-padding each magnification to the batch's largest bag (at least 1)."""
    if not items:
        raise DataError("collate_bags got an empty batch")
    mags = list(items[0].bags)
    bags, coords, masks = {}, {}, {}
    for mag in mags:
        sizes = [it.bags[mag].shape[0] for it in items]
        n, dim = max(max(sizes), 1), items[0].bags[mag].shape[1]
        bags[mag] = torch.zeros(len(items), n, dim, dtype=torch.float32)
        coords[mag] = torch.zeros(len(items), n, 2, dtype=torch.int64)
        masks[mag] = torch.zeros(len(items), n, dtype=torch.bool)
        for i, (it, size) in enumerate(zip(items, sizes)):
            if it.bags[mag].shape[1] != dim:
                raise FeatureFileError(
                    f"slide {it.slide_id}: {mag} features are {it.bags[mag].shape[1]}-d, others {dim}-d"
                )
            bags[mag][i, :size] = it.bags[mag]
            coords[mag][i, :size] = it.coords[mag]
            masks[mag][i, :size] = True
    genes = None
    if items[0].genes is not None:
        genes = {k: torch.stack([it.genes[k] for it in items]) for k in items[0].genes}  # type: ignore[index]
    survival = items[0].event is not None
    footprints = {
        mag: torch.tensor([math.nan if it.footprints.get(mag) is None else float(it.footprints[mag]) for it in items],
                          dtype=torch.float64)
        for mag in mags
    }
    return Batch(
        slide_ids=[it.slide_id for it in items],
        patient_ids=[it.patient_id for it in items],
        bags=bags,
        coords=coords,
        masks=masks,
        genes=genes,
        target=torch.stack([it.target for it in items]),
        event=torch.stack([it.event for it in items]) if survival else None,  # type: ignore[misc]
        time=torch.stack([it.time for it in items]) if survival else None,  # type: ignore[misc]
        footprints=footprints,
    )


# -- dataset ---------------------------------------------------------------------------------


class SlideDataset(Dataset):
    """The slides of some patients of a cohort (all patients when ``patients`` is None).

    ``normaliser``: the training fold's fitted expression normaliser (None: no gene vectors,
    for WSI-only models). ``bin_edges``: the training fold's survival bin edges (required for
    survival). ``max_patches``: cap per bag; a larger slide is trained on spatial blocks of
    its lattice, the same blocks at every magnification (``geometric_subset``), redrawn by
    ``set_epoch`` (use it for training only; evaluation sees whole bags).
    """

    def __init__(
        self,
        *,
        cohort: Cohort,
        patients: Sequence[str] | None = None,
        normaliser: ExpressionNormaliser | None = None,
        bin_edges: np.ndarray | None = None,
        max_patches: int | None = None,
        seed: int = 0,
        cache: BagCache | None = None,
        block_cells: int = BLOCK_CELLS,
    ) -> None:
        if max_patches is not None and max_patches < 1:
            raise DataError(f"max_patches must be >= 1, got {max_patches}")
        self.cohort = cohort
        self.slides: list[SlideRecord] = cohort.slides_of(cohort.patients if patients is None else patients)
        self.magnifications = cohort.magnifications
        self.max_patches = max_patches
        self.block_cells = int(block_cells)
        self.seed = int(seed)
        self.epoch = 0
        self.cache = cache if cache is not None else BagCache()
        self._dims: dict[str, int] = {}
        self._genes = self._gene_vectors(normaliser)
        self.bin_edges = bin_edges
        self._targets = self._make_targets(bin_edges)

    def _gene_vectors(self, normaliser: ExpressionNormaliser | None) -> dict[str, dict[str, Tensor]] | None:
        if normaliser is None:
            return None
        if self.cohort.expression is None:
            raise DataError(f"{self.cohort.source}: a normaliser was given but the cohort has no expression table")
        patients = list(dict.fromkeys(s.patient_id for s in self.slides))
        vectors = self.cohort.expression.vectors(patients, normaliser)
        return {
            p: {name: torch.from_numpy(np.ascontiguousarray(v[i])) for name, v in vectors.items()}
            for i, p in enumerate(patients)
        }

    def _make_targets(self, bin_edges: np.ndarray | None) -> list[tuple[Tensor, Tensor | None, Tensor | None]]:
        if self.cohort.task == "classification":
            return [(torch.tensor(s.class_index, dtype=torch.int64), None, None) for s in self.slides]
        if bin_edges is None:
            raise DataError("a survival dataset needs bin_edges fitted on the training fold (fit_bin_edges)")
        times = np.array([s.time for s in self.slides], dtype=float)
        bins = time_to_bin(times, bin_edges)
        return [
            (
                torch.tensor(int(b), dtype=torch.int64),
                torch.tensor(float(s.event), dtype=torch.float32),
                torch.tensor(float(s.time), dtype=torch.float32),
            )
            for b, s in zip(bins, self.slides)
        ]

    def set_epoch(self, epoch: int) -> None:
        """Reseed the patch subsampling (call at the start of every training epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.slides)

    @property
    def feature_dims(self) -> dict[str, int]:
        """Feature width per magnification (read from the first slide when not yet loaded)."""
        for mag in self.magnifications:
            if mag not in self._dims and self.slides:
                self._dims[mag] = int(self.cache.get(self.slides[0].features[mag])[0].shape[1])
        return dict(self._dims)

    def preload(self) -> int:
        """Read every bag now if they all fit in the cache; returns the bytes they take."""
        paths = [s.features[m] for s in self.slides for m in self.magnifications]
        total = feature_bytes(paths)
        if total <= self.cache.max_bytes:
            for path in paths:
                self.cache.get(path)
        return total

    def _subsets(self, slide_id: str, coords: dict[str, Tensor],
                 footprints: dict[str, float | None]) -> dict[str, Tensor | None]:
        """Per magnification the rows kept this epoch (None: the whole bag)."""
        if self.max_patches is None or all(len(c) <= self.max_patches for c in coords.values()):
            return {mag: None for mag in coords}
        rng = np.random.default_rng([self.seed, self.epoch, zlib.crc32(slide_id.encode())])
        keep = geometric_subset({m: c.numpy() for m, c in coords.items()}, footprints,
                                max_patches=self.max_patches, rng=rng, block_cells=self.block_cells)
        return {mag: None if k is None else torch.from_numpy(k) for mag, k in keep.items()}

    def __getitem__(self, index: int) -> SlideItem:
        slide = self.slides[index]
        bags, coords, footprints = {}, {}, {}
        for mag in self.magnifications:
            features, xy = self.cache.get(slide.features[mag])
            dim = self._dims.setdefault(mag, int(features.shape[1]))
            if features.shape[1] != dim:
                raise FeatureFileError(
                    f"{slide.features[mag]}: {features.shape[1]}-d features, other {mag} slides have {dim}-d"
                )
            bags[mag], coords[mag] = features, xy
            footprints[mag] = self.cache.footprint(slide.features[mag])
        for mag, keep in self._subsets(slide.slide_id, coords, footprints).items():
            if keep is not None:
                bags[mag], coords[mag] = bags[mag].index_select(0, keep), coords[mag].index_select(0, keep)
        target, event, time = self._targets[index]
        return SlideItem(
            slide_id=slide.slide_id,
            patient_id=slide.patient_id,
            bags=bags,
            coords=coords,
            genes=None if self._genes is None else self._genes[slide.patient_id],
            target=target,
            event=event,
            time=time,
            footprints=footprints,
        )


# -- training-time subsets that keep geometry ------------------------------------------------


def geometric_subset(
    coords: dict[str, np.ndarray],
    footprints: dict[str, float | None],
    *,
    max_patches: int,
    rng: np.random.Generator,
    block_cells: int = BLOCK_CELLS,
) -> dict[str, np.ndarray | None]:
    """Rows to keep per magnification (sorted; None = the whole bag, when every bag fits).

    The slide is cut into square blocks of ``block_cells`` x ``block_cells`` cells of the
    coarsest magnification's lattice (its footprint), at a random offset; blocks are taken in
    random order while every magnification stays within ``max_patches``. A patch belongs to
    the block holding its centre, so a 20x patch is in its 10x parent's block (the parent's
    square contains the child's centre and block edges fall on the parent lattice): parents
    are kept with their children, and a patch inside a block keeps all its neighbours.
    Why not independent random subsets: on a 141 x 141 lattice capped at 4096 they kept
    the 10x parent of only 20 % of the 20x patches and 1.4 / 2.7 of a patch's 8.9 lattice
    neighbours (issue 14). Blocks shrink (halving) until at least four fit; if even one
    coarse cell with its children exceeds the cap, each bag falls back to a random subset."""
    mags = [m for m in coords if len(coords[m])]
    if all(len(c) <= max_patches for c in coords.values()):
        return {m: None for m in coords}
    try:
        coarse = min(mags, key=magnification_number)
    except ValueError:  # magnifications not named like "20x": no way to relate their lattices
        return _random_subset(coords, max_patches, rng)
    known = {m: f for m, f in footprints.items() if m in mags and f is not None and f > 0}
    if not known:  # fewer than two positions everywhere and no attribute: nothing spatial to keep
        return _random_subset(coords, max_patches, rng)
    fp_coarse = known.get(coarse)
    if fp_coarse is None:  # scale another magnification's footprint to the coarse one
        m, f = next(iter(known.items()))
        fp_coarse = f * magnification_number(m) / magnification_number(coarse)
    low = coords[coarse].min(axis=0).astype(np.float64)
    cells = max(1, int(block_cells))
    while True:
        offset = rng.integers(0, cells, size=2) * fp_coarse
        origin, side = low - offset, cells * fp_coarse
        block_ids = {}  # mag -> (n, 2) block of each patch's centre
        for m in mags:
            fp = known.get(m, fp_coarse * magnification_number(coarse) / magnification_number(m))
            block_ids[m] = np.floor((coords[m] + fp / 2.0 - origin) / side).astype(np.int64)
        every = np.concatenate([block_ids[m] for m in mags])
        lo = every.min(axis=0)
        span = int(every[:, 0].max() - lo[0]) + 1
        keys = {m: (b[:, 1] - lo[1]) * span + (b[:, 0] - lo[0]) for m, b in block_ids.items()}
        blocks, inverse = np.unique(np.concatenate(list(keys.values())), return_inverse=True)
        counts, start = {}, 0
        for m in mags:
            counts[m] = np.bincount(inverse[start:start + len(keys[m])], minlength=len(blocks))
            start += len(keys[m])
        biggest = max(int(c.max()) for c in counts.values())
        if cells == 1 or biggest * 4 <= max_patches:
            break
        cells = max(1, cells // 2)
    if biggest > max_patches:
        return _random_subset(coords, max_patches, rng)
    chosen = np.zeros(len(blocks), dtype=bool)
    used = dict.fromkeys(mags, 0)
    for block in rng.permutation(len(blocks)):
        if all(used[m] + counts[m][block] <= max_patches for m in mags):
            chosen[block] = True
            for m in mags:
                used[m] += int(counts[m][block])
    kept = {m: np.flatnonzero(chosen[np.searchsorted(blocks, keys[m])]) for m in mags}
    return {m: kept.get(m, np.zeros(0, dtype=np.int64)) for m in coords}


def _random_subset(coords: dict[str, np.ndarray], max_patches: int,
                   rng: np.random.Generator) -> dict[str, np.ndarray | None]:
    """Independent random rows per magnification (only when no geometry can be kept)."""
    return {m: None if len(c) <= max_patches else np.sort(rng.choice(len(c), size=max_patches, replace=False))
            for m, c in coords.items()}


# -- what a training fold fits ---------------------------------------------------------------


def fit_normaliser(cohort: Cohort, patients: Sequence[str], *, log1p: bool = True) -> ExpressionNormaliser:
    """log1p + z-score statistics of the tumor and TME genes over these (training) patients."""
    if cohort.expression is None or cohort.gene_sets is None:
        raise DataError(f"{cohort.source}: no expression table / gene sets to fit a normaliser on")
    train = cohort.expression.select(list(dict.fromkeys(patients)))
    return ExpressionNormaliser(log1p=log1p).fit(train, cohort.gene_sets)


def saved_bin_edges(document: dict) -> np.ndarray | None:
    """A saved model's survival bin edges (``best/config.json``; strict JSON keeps the open last
    edge as null, read back as infinity), or None for a model without them."""
    edges = document.get("bin_edges")
    return None if edges is None else np.array([np.inf if e is None else e for e in edges], dtype=float)


def fit_bin_edges(cohort: Cohort, patients: Sequence[str], *, n_bins: int = 4) -> np.ndarray:
    """Survival bin edges from the event times of these (training) patients, one per patient."""
    times, events = cohort.survival(list(dict.fromkeys(patients)))
    return survival_bins_from_times(times, events, n_bins=n_bins)


@dataclass
class FoldData:
    """A fold's three datasets and what was fitted on its training part."""

    train: SlideDataset
    val: SlideDataset
    test: SlideDataset
    normaliser: ExpressionNormaliser | None
    bin_edges: np.ndarray | None


def fold_datasets(
    cohort: Cohort,
    fold: Fold,
    *,
    max_patches: int | None = None,
    seed: int = 0,
    n_bins: int = 4,
    log1p: bool = True,
    use_genes: bool = True,
    cache: BagCache | None = None,
    block_cells: int = BLOCK_CELLS,
) -> FoldData:
    """Fit the normaliser and bin edges on ``fold.train``; build train (subsampled), val, test."""
    normaliser = fit_normaliser(cohort, fold.train, log1p=log1p) if use_genes else None
    edges = fit_bin_edges(cohort, fold.train, n_bins=n_bins) if cohort.task == "survival" else None
    cache = cache if cache is not None else BagCache()
    common = {"cohort": cohort, "normaliser": normaliser, "bin_edges": edges, "seed": seed, "cache": cache}
    return FoldData(
        train=SlideDataset(patients=fold.train, max_patches=max_patches, block_cells=block_cells, **common),
        val=SlideDataset(patients=fold.val, **common),
        test=SlideDataset(patients=fold.test, **common),
        normaliser=normaliser,
        bin_edges=edges,
    )
