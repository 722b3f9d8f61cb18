"""Planted synthetic cohorts, in memory: patch bags at real coordinates with known signal.

Each patient has one slide. Its tissue is an ellipse of 10x patches; inside lie a *tumor*
region and a disjoint *TME* region (disks). The label depends on two hidden states:
`tumor_state` (carried by tumor-region patches and by a subset of tumor genes) and
`tme_state` (carried by TME-region patches and a subset of TME genes). All other patches
are uninformative, so a model that attends to the right patches is the only way to read
the states from the slide, and the planted regions are the ground truth for attention.

``decoy_signal`` (opt-in, 0 by default) makes the last point strict: every "other" patch
gets a shift of that size along both state directions, with an independent random sign
per patch and direction. The decoys carry no state but swamp the mean of the bag, so
mean-pooling can no longer read the states; a model has to *find* the planted patches
(they carry the type directions). Left at 0 the random stream is untouched, so default
cohorts are bit-identical to those generated before the option existed.

Real scale (issue 14), both opt-in and leaving default cohorts bit-identical:
``patches_20x`` gives each slide about that many 20x patches (each within ``size_spread``,
20 % by default; the 10x bag is a quarter, on the same tissue), drawn in float32 so 48
slides of 9k patches take seconds. ``scanner_mix`` scans that share of the slides
at ``mpp_level0`` (0.25 µm/px) and the rest at twice it (0.5 µm/px): a 0.25 µm/px slide's
patches cover twice as many level-0 pixels, so its footprints (``patch_size_level0``) and
coordinate lattice are doubled, as in a real TRIDENT file. Scanners are drawn from a side
stream, balanced within each (tumor, TME) state pair, so the scanner tells nothing of the
label; features do not depend on the scanner.

``label_from = "tumor"`` makes the label the tumor state alone (two classes; for survival
the hazard follows the tumor state alone): the TME state still varies, in the TME patches
and genes, independently of the label. ``patch_signal = 0`` or ``gene_signal = 0`` takes
the state out of the slides or out of the genes (the regimes of ``training.synth.REGIMES``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

REGION_OTHER, REGION_TUMOR, REGION_TME = 0, 1, 2
REGION_NAMES = ("other", "tumor", "tme")
LABEL_SOURCES = ("both", "tumor")
SIZE_SPREAD = 0.2           # real-scale bags: 20x size uniform in patches_20x * (1 -/+ SIZE_SPREAD) by default
MAX_PATCHES_20X = 400_000   # beyond any real slide; keeps a typo from filling the disk
SCANNER_STREAM = 14         # key of the side random stream that picks each slide's scanner


@dataclass(frozen=True)
class SynthConfig:
    task: str = "classification"          # "classification" | "survival"
    n_patients: int = 96
    feature_dim: int = 128
    grid_min: int = 10                    # tissue ellipse axes, in 10x patches
    grid_max: int = 18
    region_fraction: float = 0.12         # of tissue patches, per planted region
    patch_signal: float = 1.0             # strength of the state signal in planted patches
    type_signal: float = 1.5              # how distinct tumor / TME tissue looks
    gene_signal: float = 1.5              # shift of informative genes, in z units
    informative_gene_fraction: float = 0.2
    mpp_level0: float = 0.25              # µm per level-0 pixel (40x-like)
    patch_size: int = 224
    censor_fraction: float = 0.15
    decoy_signal: float = 0.0             # opt-in: random-sign state shifts on "other" patches
    label_from: str = "both"              # "both": 4 classes of (tumor, TME) state; "tumor": 2 classes
    seed: int = 0
    patches_20x: int | None = None        # real scale: mean 20x patches per slide (None: grid_min..grid_max ellipses)
    scanner_mix: float = 1.0              # share of slides at mpp_level0; the rest at 2 * mpp_level0
    size_spread: float = SIZE_SPREAD      # real scale: each slide's 20x bag in patches_20x * (1 -/+ size_spread)

    def __post_init__(self) -> None:
        if self.task not in ("classification", "survival"):
            raise ValueError(f"task must be 'classification' or 'survival', not {self.task!r}")
        if self.n_patients < 8:
            raise ValueError("n_patients must be >= 8")
        if not 2 <= self.grid_min <= self.grid_max:
            raise ValueError("need 2 <= grid_min <= grid_max")
        if self.decoy_signal < 0:
            raise ValueError("decoy_signal must be >= 0")
        if self.label_from not in LABEL_SOURCES:
            raise ValueError(f"label_from must be one of {', '.join(LABEL_SOURCES)}, not {self.label_from!r}")
        if self.patch_signal < 0 or self.gene_signal < 0 or not 0 < self.region_fraction < 0.5:
            raise ValueError("need patch_signal >= 0, gene_signal >= 0 and 0 < region_fraction < 0.5")
        if self.patches_20x is not None and not 64 <= self.patches_20x <= MAX_PATCHES_20X:
            raise ValueError(f"patches_20x must be 64..{MAX_PATCHES_20X}, got {self.patches_20x}")
        if not 0.0 <= self.scanner_mix <= 1.0:
            raise ValueError(f"scanner_mix must be in [0, 1], got {self.scanner_mix}")
        if not 0.0 <= self.size_spread < 1.0:
            raise ValueError(f"size_spread must be in [0, 1), got {self.size_spread}")
        if self.feature_dim < 4:
            raise ValueError(f"feature_dim must be >= 4 (four planted directions), got {self.feature_dim}")

    def step_level0(self, mpp: float, *, mpp_level0: float | None = None) -> int:
        """Level-0 pixels per patch at a target mpp (224 px at 1.0 µm/px -> 896 px at 0.25);
        ``mpp_level0``: the slide's scanner (default: the config's)."""
        return int(round(self.patch_size * mpp / (mpp_level0 or self.mpp_level0)))


MAGNIFICATION_MPP = {"10x": 1.0, "20x": 0.5}

#: Planted log hazard ratios of the survival variant: a high tumor state raises the hazard,
#: an immune-hot TME lowers it. Strong enough that the true hazard reaches a C-index of
#: ~0.81 on 64 patients with 15 % censoring (four risk groups cap it: ties within a group).
SURVIVAL_TUMOR_LOG_HR = 3.0
SURVIVAL_TME_LOG_HR = -2.0


@dataclass
class SynthPatient:
    patient_id: str
    tumor_state: int
    tme_state: int
    label: int | None
    time: float | None
    event: int | None
    coords: dict[str, np.ndarray] = field(default_factory=dict)     # mag -> (N, 2) int64 level-0 x, y
    features: dict[str, np.ndarray] = field(default_factory=dict)   # mag -> (N, D) float32
    regions: dict[str, np.ndarray] = field(default_factory=dict)    # mag -> (N,) int8 REGION_*
    mpp_level0: float = 0.25                                          # the slide's scanner, µm per level-0 px


@dataclass
class SynthCohort:
    config: SynthConfig
    patients: list[SynthPatient]
    tumor_genes: tuple[str, ...]
    tme_genes: tuple[str, ...]
    expression: np.ndarray            # (n_patients, G) raw counts-like, positive
    genes: tuple[str, ...]            # column order of `expression`
    class_names: tuple[str, ...]


def class_of(tumor_state: int, tme_state: int, label_from: str = "both") -> int:
    return tumor_state if label_from == "tumor" else 2 * tumor_state + tme_state


CLASS_NAMES = ("tumor-low/TME-cold", "tumor-low/TME-hot", "tumor-high/TME-cold", "tumor-high/TME-hot")
TUMOR_CLASS_NAMES = ("tumor-low", "tumor-high")


def _layout(rng: np.random.Generator, cfg: SynthConfig) -> tuple[np.ndarray, np.ndarray]:
    """Tissue cells of a 10x grid (rows, cols) and their region labels."""
    if cfg.patches_20x is not None:
        return _real_layout(rng, cfg)
    a, b = rng.integers(cfg.grid_min, cfg.grid_max + 1, size=2)
    rows, cols = np.mgrid[0:2 * a, 0:2 * b]
    inside = ((rows + 0.5 - a) / a) ** 2 + ((cols + 0.5 - b) / b) ** 2 <= 1.0
    return _plant_regions(rng, cfg, np.argwhere(inside))


def _real_layout(rng: np.random.Generator, cfg: SynthConfig) -> tuple[np.ndarray, np.ndarray]:
    """An ellipse of exactly n10 cells (about patches_20x / 4, within size_spread): the cells of
    smallest elliptic radius, in row-major order."""
    n10 = max(16, int(round(cfg.patches_20x / 4 * rng.uniform(1 - cfg.size_spread, 1 + cfg.size_spread))))
    aspect = rng.uniform(0.6, 1.0)
    a = np.sqrt(n10 / (np.pi * aspect))   # semi-axes in cells: pi a b = n10
    b = aspect * a
    half_r, half_c = int(np.ceil(a)) + 1, int(np.ceil(b)) + 1
    rows, cols = np.mgrid[0:2 * half_r, 0:2 * half_c]
    radius = ((rows + 0.5 - half_r) / a) ** 2 + ((cols + 0.5 - half_c) / b) ** 2
    flat = np.sort(np.argsort(radius.ravel(), kind="stable")[:n10])
    cells = np.column_stack(np.unravel_index(flat, radius.shape))
    return _plant_regions(rng, cfg, cells)


def _plant_regions(rng: np.random.Generator, cfg: SynthConfig, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint disks of region_fraction of the tissue each: tumor, then TME."""
    n = len(cells)
    region = np.full(n, REGION_OTHER, np.int8)
    target = max(3, int(round(cfg.region_fraction * n)))
    centres = cells[rng.choice(n, size=2, replace=False)]
    # grow each region as the `target` cells nearest its centre, tumor first, TME disjoint
    for label, centre in ((REGION_TUMOR, centres[0]), (REGION_TME, centres[1])):
        free = np.flatnonzero(region == REGION_OTHER)
        distance = np.linalg.norm(cells[free] - centre, axis=1)
        region[free[np.argsort(distance, kind="stable")[:target]]] = label
    return cells, region


def _bag(rng, cfg, cells, region, directions, mag, states,
         mpp_level0=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coordinates, features and regions of one magnification's bag on a slide scanned at
    ``mpp_level0`` (default: the config's)."""
    step10 = cfg.step_level0(MAGNIFICATION_MPP["10x"], mpp_level0=mpp_level0)
    if mag == "10x":
        coords = cells[:, ::-1] * step10
        regions = region
    else:  # each 10x cell splits into 2 x 2 20x patches, which inherit its region
        sub = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])
        step = cfg.step_level0(MAGNIFICATION_MPP[mag], mpp_level0=mpp_level0)
        coords = (cells[:, None, ::-1] * step10 + sub[None, :, ::-1] * step).reshape(-1, 2)
        regions = np.repeat(region, 4)
    n = len(coords)
    d = directions[mag]
    tumor_state, tme_state = states
    if cfg.patches_20x is None:  # the small cohorts keep their float64 stream (bit-identical)
        x = rng.standard_normal((n, cfg.feature_dim)).astype(np.float32)
    else:
        x = rng.standard_normal((n, cfg.feature_dim), dtype=np.float32)
    is_tumor, is_tme = regions == REGION_TUMOR, regions == REGION_TME
    x[is_tumor] += cfg.type_signal * d["tumor_type"] + cfg.patch_signal * (2 * tumor_state - 1) * d["tumor_state"]
    x[is_tme] += cfg.type_signal * d["tme_type"] + cfg.patch_signal * (2 * tme_state - 1) * d["tme_state"]
    if cfg.decoy_signal:  # drawn only when asked, so default cohorts keep their random stream
        other = np.flatnonzero(~is_tumor & ~is_tme)
        signs = rng.choice([-1.0, 1.0], size=(len(other), 2))
        x[other] += cfg.decoy_signal * (signs[:, :1] * d["tumor_state"] + signs[:, 1:] * d["tme_state"])
    return coords.astype(np.int64, copy=False), x.astype(np.float32, copy=False), regions.astype(np.int8, copy=False)


def _unit_directions(rng, dim: int) -> dict[str, np.ndarray]:
    """Four orthonormal directions: tissue type and hidden state, for tumor and TME."""
    q, _ = np.linalg.qr(rng.standard_normal((dim, 4)))
    names = ("tumor_type", "tme_type", "tumor_state", "tme_state")
    return {name: q[:, i].astype(np.float32) for i, name in enumerate(names)}


def _survival(rng, cfg, tumor_state: np.ndarray, tme_state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exponential times whose hazard rises with tumor state and falls with an immune-hot TME."""
    tme_log_hr = 0.0 if cfg.label_from == "tumor" else SURVIVAL_TME_LOG_HR
    log_hazard = (SURVIVAL_TUMOR_LOG_HR * tumor_state + tme_log_hr * tme_state
                  + 0.15 * rng.standard_normal(len(tumor_state)))
    times = rng.exponential(24.0 * np.exp(-log_hazard))
    censored = rng.random(len(times)) < cfg.censor_fraction
    observed = np.where(censored, times * rng.uniform(0.2, 1.0, len(times)), times)
    return np.round(observed + 0.1, 2), (~censored).astype(np.int64)


def scanner_mpps(cfg: SynthConfig, states: np.ndarray) -> np.ndarray:
    """Level-0 mpp per patient: ``scanner_mix`` of each (tumor, TME) state pair at
    ``mpp_level0``, the rest at twice it; from a side stream, so the main one is untouched."""
    mpp = np.full(len(states), 2.0 * cfg.mpp_level0)
    rng = np.random.default_rng([cfg.seed, SCANNER_STREAM])
    groups = 2 * states[:, 0] + states[:, 1]
    for group in np.unique(groups):
        members = rng.permutation(np.flatnonzero(groups == group))
        mpp[members[:int(np.floor(cfg.scanner_mix * len(members) + 0.5))]] = cfg.mpp_level0
    return mpp


def generate_cohort(cfg: SynthConfig, *, tumor_genes: tuple[str, ...], tme_genes: tuple[str, ...],
                    on_patient: Callable[[SynthPatient], None] | None = None,
                    keep_features: bool = True) -> SynthCohort:
    """The planted cohort, deterministic given `cfg.seed`. Patients are made one at a time:
    ``on_patient`` sees each as soon as it is complete (to write it), and with
    ``keep_features=False`` its features are dropped after that (coordinates and regions
    stay), so a real-scale cohort never sits in memory whole."""
    rng = np.random.default_rng(cfg.seed)
    directions = {mag: _unit_directions(rng, cfg.feature_dim) for mag in MAGNIFICATION_MPP}
    n = cfg.n_patients
    # balanced states: every (tumor, tme) combination equally often
    states = np.array([(i // 2 % 2, i % 2) for i in range(n)])
    states = states[rng.permutation(n)]
    times, events = (None, None)
    if cfg.task == "survival":
        times, events = _survival(rng, cfg, states[:, 0], states[:, 1])
    scanners = scanner_mpps(cfg, states)
    patients = []
    for i in range(n):
        t, e = int(states[i, 0]), int(states[i, 1])
        patient = SynthPatient(
            patient_id=f"TCGA-SY-{i + 1:04d}", tumor_state=t, tme_state=e,
            label=class_of(t, e, cfg.label_from) if cfg.task == "classification" else None,
            time=float(times[i]) if times is not None else None,
            event=int(events[i]) if events is not None else None,
            mpp_level0=float(scanners[i]),
        )
        cells, region = _layout(rng, cfg)
        for mag in MAGNIFICATION_MPP:
            patient.coords[mag], patient.features[mag], patient.regions[mag] = _bag(
                rng, cfg, cells, region, directions, mag, (t, e), patient.mpp_level0)
        if on_patient is not None:
            on_patient(patient)
        if not keep_features:
            patient.features = {}
        patients.append(patient)
    genes = tuple(tumor_genes) + tuple(tme_genes)
    expression = _expression(rng, cfg, states, len(tumor_genes), len(tme_genes))
    return SynthCohort(cfg, patients, tuple(tumor_genes), tuple(tme_genes), expression, genes, class_names(cfg))


def class_names(cfg: SynthConfig) -> tuple[str, ...]:
    """The label's class names (none for survival)."""
    if cfg.task != "classification":
        return ()
    return TUMOR_CLASS_NAMES if cfg.label_from == "tumor" else CLASS_NAMES


def _expression(rng, cfg, states: np.ndarray, n_tumor: int, n_tme: int) -> np.ndarray:
    """Counts-like expression: log1p of it is ~ baseline + z, informative genes shifted by state."""
    n = len(states)
    z = rng.standard_normal((n, n_tumor + n_tme))
    k_t = max(1, int(cfg.informative_gene_fraction * n_tumor))
    k_e = max(1, int(cfg.informative_gene_fraction * n_tme))
    informative_t = rng.choice(n_tumor, k_t, replace=False)
    informative_e = n_tumor + rng.choice(n_tme, k_e, replace=False)
    z[:, informative_t] += cfg.gene_signal * (2 * states[:, :1] - 1)
    z[:, informative_e] += cfg.gene_signal * (2 * states[:, 1:] - 1)
    baseline = rng.uniform(2.0, 6.0, size=n_tumor + n_tme)
    return np.expm1(np.clip(baseline + 0.6 * z, 0.0, None)).astype(np.float32)
