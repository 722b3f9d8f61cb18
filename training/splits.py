"""Patient-level cross-validation splits, saved as JSON so runs resume and are audited.

Protocol: k stratified folds over *patients* (never slides: two slides of one patient in
train and test would leak); inside each fold's training patients a stratified validation
part picks the epoch and stops early, so the test fold is touched once, at the end.
Classification stratifies on the class, survival on the event indicator.

Determinism: the patients are sorted before splitting, so a split depends only on the set
of patients, their strata and the seed, not on the row order of the cohort CSV.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.model_selection import StratifiedKFold

from napari_dismm.errors import DataError, DismmWarning

if TYPE_CHECKING:
    from training.cohort import Cohort

_FORMAT = "dismm.split"
_VERSION = 1
PARTS = ("train", "val", "test")


def _preview(items: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")


@dataclass(frozen=True)
class Fold:
    """Patient ids of one fold's three parts (each sorted)."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]

    def part(self, name: str) -> tuple[str, ...]:
        if name not in PARTS:
            raise KeyError(name)
        return getattr(self, name)


@dataclass(frozen=True)
class Split:
    """All folds plus the settings that made them (checked when a saved split is reused)."""

    folds: tuple[Fold, ...]
    seed: int
    val_fraction: float
    stratify_by: str

    @property
    def n_folds(self) -> int:
        return len(self.folds)

    @property
    def patients(self) -> tuple[str, ...]:
        return tuple(sorted(p for f in self.folds for p in f.test))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "n_folds": self.n_folds,
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "stratify_by": self.stratify_by,
            "folds": [{name: list(f.part(name)) for name in PARTS} for f in self.folds],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "<split>") -> Split:
        keys = {"format", "version", "n_folds", "seed", "val_fraction", "stratify_by", "folds"}
        if not isinstance(data, Mapping) or set(data) != keys or data.get("format") != _FORMAT:
            raise DataError(f"{source}: not a split file written by dismm (expected keys {sorted(keys)})")
        if data["version"] != _VERSION:
            raise DataError(f"{source}: unsupported split version {data['version']!r}")
        try:
            folds = tuple(Fold(*(tuple(str(p) for p in f[name]) for name in PARTS)) for f in data["folds"])
        except (KeyError, TypeError) as error:
            raise DataError(f"{source}: malformed fold entry ({error})") from None
        split = cls(folds, int(data["seed"]), float(data["val_fraction"]), str(data["stratify_by"]))
        if split.n_folds != data["n_folds"]:
            raise DataError(f"{source}: n_folds is {data['n_folds']} but {split.n_folds} folds are listed")
        check_split(split, source=source)
        return split

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the JSON atomically (temp file then rename), so a kill leaves no half file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Split:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise DataError(f"split file not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise DataError(f"{path}: not a JSON split file ({error})") from None
        return cls.from_dict(data, source=str(path))


def check_split(split: Split, *, source: str = "<split>") -> None:
    """Every patient in exactly one test fold; within a fold no patient in two parts."""
    seen = Counter(p for f in split.folds for p in f.test)
    twice = sorted(p for p, n in seen.items() if n > 1)
    if twice:
        raise DataError(f"{source}: patient(s) in more than one test fold: {_preview(twice)}")
    everyone = set(seen)
    for i, f in enumerate(split.folds):
        parts = [set(f.train), set(f.val), set(f.test)]
        shared = sorted((parts[0] & parts[1]) | (parts[0] & parts[2]) | (parts[1] & parts[2]))
        if shared:
            raise DataError(f"{source}: fold {i}: patient(s) in two parts: {_preview(shared)}")
        union = parts[0] | parts[1] | parts[2]
        if union != everyone:
            odd = sorted(union ^ everyone)
            raise DataError(f"{source}: fold {i} does not cover the cohort's patients: {_preview(odd)}")
        if not f.train or not f.test:
            raise DataError(f"{source}: fold {i} has an empty train or test part")


def _validation(train: list[str], strata: Mapping[str, int], fraction: float, rng: np.random.Generator) -> set[str]:
    """A stratified validation subset of ``train``: class quotas by largest remainder, each
    class keeping at least one training patient; within a class, a seeded random pick."""
    n = len(train)
    n_val = min(n - 1, max(1, int(round(fraction * n))))
    by_class: dict[int, list[str]] = {}
    for p in train:
        by_class.setdefault(strata[p], []).append(p)
    classes = sorted(by_class)
    exact = {c: n_val * len(by_class[c]) / n for c in classes}
    caps = {c: len(by_class[c]) - 1 for c in classes}
    quota = {c: min(int(np.floor(exact[c])), caps[c]) for c in classes}
    # hand out the remaining places by largest remainder, ties to the larger class then lower id
    order = sorted(classes, key=lambda c: (-(exact[c] - np.floor(exact[c])), -len(by_class[c]), c))
    while sum(quota.values()) < n_val:
        open_ = [c for c in order if quota[c] < caps[c]]
        if not open_:
            break
        quota[open_[0]] += 1
        order.remove(open_[0])  # round robin: the next extra place goes to another class
        order.append(open_[0])
    chosen: set[str] = set()
    for c in classes:
        members = by_class[c]
        chosen.update(members[i] for i in rng.permutation(len(members))[: quota[c]])
    if not chosen:  # every class has a single training patient: no stratified pick exists
        chosen.add(train[int(rng.integers(n))])
    return chosen


def make_split(
    *,
    patients: Sequence[str],
    strata: Mapping[str, int],
    n_folds: int,
    val_fraction: float,
    seed: int,
    stratify_by: str = "label",
) -> Split:
    """Stratified patient-level k-fold with a stratified validation part in each training fold.

    ``strata`` maps each patient to its class index (or event indicator). Class counts in
    each test fold differ by at most one between folds (scikit-learn's allocation); the
    validation part takes ``val_fraction`` of the training patients (at least one).
    """
    unique = sorted(set(patients))
    if len(unique) != len(patients):
        raise DataError("make_split: patient ids must be unique")
    if n_folds < 2:
        raise DataError(f"need n_folds >= 2, got {n_folds}")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    absent = [p for p in unique if p not in strata]
    if absent:
        raise DataError(f"make_split: no stratum for patient(s) {_preview(absent)}")
    # a fold needs >= 1 test patient and >= 2 training patients (one kept for validation)
    if len(unique) < max(n_folds, 3):
        raise DataError(f"{len(unique)} patients cannot make {n_folds} folds with a validation part")
    y = np.array([int(strata[p]) for p in unique])
    counts = Counter(y.tolist())
    if max(counts.values()) < n_folds:
        raise DataError(
            f"no {stratify_by} value has {n_folds} patients: too few patients for {n_folds} stratified folds"
        )
    rare = sorted(c for c, n in counts.items() if n < n_folds)
    if rare:
        warnings.warn(
            f"{stratify_by} value(s) {rare} have fewer patients than the {n_folds} folds: "
            "some test folds will lack them (their per-class metrics are undefined there)",
            DismmWarning,
            stacklevel=2,
        )
    kfold = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the rare-class warning is ours, above
        parts = list(kfold.split(np.zeros(len(y)), y))
    for i, (train_idx, test_idx) in enumerate(parts):
        train = [unique[j] for j in train_idx]
        val = _validation(train, dict(zip(unique, y.tolist())), val_fraction, np.random.default_rng([seed, i]))
        folds.append(
            Fold(
                train=tuple(sorted(p for p in train if p not in val)),
                val=tuple(sorted(val)),
                test=tuple(sorted(unique[j] for j in test_idx)),
            )
        )
    split = Split(tuple(folds), int(seed), float(val_fraction), stratify_by)
    check_split(split)
    return split


def split_cohort(cohort: Cohort, *, n_folds: int, val_fraction: float, seed: int) -> Split:
    """``make_split`` on a cohort's patients: by class, or by event for survival."""
    return make_split(
        patients=cohort.patients,
        strata=cohort.strata(),
        n_folds=n_folds,
        val_fraction=val_fraction,
        seed=seed,
        stratify_by="label" if cohort.task == "classification" else "event",
    )


def load_or_make_split(
    path: str | os.PathLike[str], *, cohort: Cohort, n_folds: int, val_fraction: float, seed: int
) -> Split:
    """Reuse the split saved at ``path`` (a resumed run) or make and save a new one.

    A saved split that names other patients or was made with other settings is an error,
    not silently replaced: results of a run must all come from one split.
    """
    path = Path(path)
    if not path.exists():
        split = split_cohort(cohort, n_folds=n_folds, val_fraction=val_fraction, seed=seed)
        split.save(path)
        return split
    split = Split.load(path)
    ours, theirs = set(cohort.patients), set(split.patients)
    if ours != theirs:
        extra, gone = sorted(theirs - ours), sorted(ours - theirs)
        raise DataError(
            f"{path} does not match the cohort: {len(extra)} patient(s) only in the split "
            f"({_preview(extra)}), {len(gone)} only in the cohort ({_preview(gone)}); "
            "use a new output directory or delete the split file"
        )
    wanted = {"n_folds": n_folds, "val_fraction": float(val_fraction), "seed": seed}
    found = {"n_folds": split.n_folds, "val_fraction": split.val_fraction, "seed": split.seed}
    changed = [f"{k} {found[k]} (file) vs {wanted[k]} (config)" for k in wanted if found[k] != wanted[k]]
    if changed:
        raise DataError(f"{path} was made with other settings: {'; '.join(changed)}")
    return split
