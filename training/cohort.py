"""A training cohort: the cohort CSV, checked once, joined to gene sets and expression.

Why all the checks live here: a cohort with one bad row (a missing feature file, a label
typed as NaN, a patient the expression table does not know) would otherwise fail hours
into a cross-validation run, or worse, train on the wrong thing silently. Every problem
is one :class:`~napari_dismm.errors.DataError` line naming the rows or ids concerned.

The CSV holds one row per slide: ``patient_id, slide_id, features_10x, features_20x`` and
``label`` (classification) or ``time, event`` (survival). Feature paths are relative to the
CSV's folder (or ``base_dir``). Several slides per patient are allowed; everything above
the slide (labels, splits, expression, metrics) is per patient. TCGA barcodes are reduced
to the patient (first 12 characters), so a sample barcode in ``patient_id`` is matched to
the expression table's patient.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from napari_dismm.errors import DataError, DismmWarning, FeatureFileError
from napari_dismm.features.h5 import scan_features
from napari_dismm.omics import ExpressionTable, GeneSets, load_gene_sets, load_omics, read_expression
from napari_dismm.omics.expression import warn_report
from napari_dismm.omics.patients import patient_id as to_patient_id

Task = Literal["classification", "survival"]
TASKS: tuple[str, ...] = ("classification", "survival")
DEFAULT_MAGNIFICATIONS: tuple[str, ...] = ("10x", "20x")


def preview(items: Sequence[object], n: int = 5) -> str:
    """The first ``n`` items and how many there are in all (for one-line errors)."""
    shown = ", ".join(str(i) for i in items[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")


@dataclass(frozen=True)
class SlideRecord:
    """One slide: its patient, feature file per magnification and the patient's target."""

    patient_id: str
    slide_id: str
    features: dict[str, Path]
    label: str | None = None
    class_index: int | None = None
    time: float | None = None
    event: int | None = None


@dataclass(frozen=True, eq=False)
class Cohort:
    """A validated cohort. ``patients`` are unique ids in first-seen CSV order."""

    table: pd.DataFrame
    task: str
    class_names: tuple[str, ...]
    patients: tuple[str, ...]
    slides: tuple[SlideRecord, ...]
    magnifications: tuple[str, ...]
    gene_sets: GeneSets | None = None
    expression: ExpressionTable | None = None
    source: str = "<cohort>"

    def slides_of(self, patients: Iterable[str]) -> list[SlideRecord]:
        """The slides of these patients, in CSV order."""
        wanted = set(patients)
        unknown = sorted(wanted - set(self.patients))
        if unknown:
            raise DataError(f"{self.source}: unknown patient(s): {preview(unknown)}")
        return [s for s in self.slides if s.patient_id in wanted]

    def _first_slide(self) -> dict[str, SlideRecord]:
        first: dict[str, SlideRecord] = {}
        for s in self.slides:
            first.setdefault(s.patient_id, s)
        return first

    def strata(self) -> dict[str, int]:
        """Per patient, what splits stratify on: the class index, or the event (survival)."""
        first = self._first_slide()
        if self.task == "classification":
            return {p: int(first[p].class_index) for p in self.patients}  # type: ignore[arg-type]
        return {p: int(first[p].event) for p in self.patients}  # type: ignore[arg-type]

    def survival(self, patients: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
        """(times, events) of these patients, one entry per patient."""
        if self.task != "survival":
            raise DataError(f"{self.source}: a {self.task} cohort has no survival times")
        first = self._first_slide()
        chosen = list(patients)
        times = np.array([first[p].time for p in chosen], dtype=float)
        events = np.array([first[p].event for p in chosen], dtype=np.int64)
        return times, events


# -- reading -----------------------------------------------------------------------------


def _read_csv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"cohort CSV not found: {path}")
    try:
        # every column as text: ids like 007 and labels like "2" stay as written
        frame = pd.read_csv(path, dtype=str, keep_default_na=True, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not a readable CSV ({str(error).splitlines()[0]})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    if frame.empty:
        raise DataError(f"{path}: the cohort has no rows")
    return frame


def _check_columns(frame: pd.DataFrame, path: Path, needed: list[str]) -> None:
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(frame.columns)})"
        )


def _check_filled(frame: pd.DataFrame, path: Path, columns: list[str]) -> None:
    """No empty / NaN cell in the columns that matter; name the column and the slides."""
    for col in columns:
        empty = frame[col].isna() | (frame[col].astype(str).str.strip() == "")
        if empty.any():
            where = [_row_name(frame, i) for i in np.flatnonzero(empty.to_numpy())]
            raise DataError(f"{path}: column {col!r} is empty or NaN for {preview(where)}")


def _row_name(frame: pd.DataFrame, i: int) -> str:
    slide = frame["slide_id"].iat[i] if "slide_id" in frame.columns else None
    name = f"slide {slide}" if isinstance(slide, str) and slide.strip() else "a slide"
    return f"{name} (row {i + 2})"  # row 1 is the header


def _numbers(frame: pd.DataFrame, path: Path, col: str) -> np.ndarray:
    values = pd.to_numeric(frame[col].str.strip(), errors="coerce").to_numpy(dtype=float)
    bad = ~np.isfinite(values)
    if bad.any():
        where = [f"{_row_name(frame, i)} = {frame[col].iat[i]!r}" for i in np.flatnonzero(bad)]
        raise DataError(f"{path}: column {col!r} must hold finite numbers: {preview(where)}")
    return values


def _sort_labels(labels: Iterable[str]) -> tuple[str, ...]:
    """Sorted unique labels; numbers sort by value ("2" before "10"), text alphabetically."""
    unique = sorted(set(labels))
    try:
        return tuple(sorted(unique, key=float))
    except ValueError:
        return tuple(unique)


def _feature_paths(
    frame: pd.DataFrame, path: Path, base: Path, magnifications: Sequence[str]
) -> list[dict[str, Path]]:
    out: list[dict[str, Path]] = []
    missing: list[str] = []
    for i in range(len(frame)):
        files = {}
        for mag in magnifications:
            p = Path(str(frame[f"features_{mag}"].iat[i]).strip()).expanduser()
            p = p if p.is_absolute() else base / p
            files[mag] = p
            if not p.is_file():
                missing.append(str(p))
        out.append(files)
    if missing:
        raise DataError(f"{path}: {len(missing)} feature file(s) not found: {preview(missing)}")
    return out


def check_feature_files(files: list[dict[str, Path]], frame: pd.DataFrame, path: Path) -> dict[str, int]:
    """Every feature file readable, finite, with sane coordinates, and one feature width per
    magnification; every slide with at least one patch. Returns ``{magnification: D}``.

    Why before anything else: a broken bag found mid-fold leaves a half-written run. When
    widths disagree, the files of the minority width are the wrong ones and are named. A
    slide with no patch at one magnification trains on the other (its bag there is empty,
    masked) and is reported; one with no patch at all is refused."""
    widths: dict[str, dict[int, list[Path]]] = {}
    partly_empty: list[str] = []
    for i, row in enumerate(files):
        empty = []
        for mag, file in row.items():
            try:
                n, d = scan_features(file)
            except FeatureFileError as error:
                raise DataError(f"{path}: {_row_name(frame, i)}, features_{mag}: {error}") from None
            if n == 0:
                empty.append(mag)
            widths.setdefault(mag, {}).setdefault(d, []).append(file)
        if empty and len(empty) == len(row):
            shown = ", ".join(str(f) for f in row.values())
            raise DataError(f"{path}: {_row_name(frame, i)} has no patch in any feature file ({shown}); "
                            "re-extract it with a lower --min-tissue or leave the slide out")
        if empty:
            partly_empty.append(f"{_row_name(frame, i)} at {', '.join(empty)}")
    if partly_empty:
        warnings.warn(f"{path}: {len(partly_empty)} slide(s) have no patch at one magnification and train on the "
                      f"other(s) there: {preview(partly_empty)}", DismmWarning, stacklevel=3)
    dims = {}
    for mag, by_width in widths.items():
        ranked = sorted(by_width.items(), key=lambda kv: -len(kv[1]))
        if len(ranked) > 1:
            usual, usual_files = ranked[0]
            if len(usual_files) == len(ranked[1][1]):
                shown = ", ".join(f"{d}-d: {preview([str(f) for f in fs], 2)}" for d, fs in ranked)
                raise DataError(f"{path}: the {mag} feature files disagree on the feature width ({shown})")
            wrong = [(d, f) for d, fs in ranked[1:] for f in fs]
            raise DataError(f"{path}: {len(wrong)} {mag} feature file(s) differ from the other "
                            f"{len(usual_files)} ({usual}-d): {preview([f'{f} ({d}-d)' for d, f in wrong])}")
        dims[mag] = ranked[0][0]
    return dims


def _one_value_per_patient(patients: list[str], values: list[object], what: str, path: Path) -> None:
    seen: dict[str, object] = {}
    conflicts: list[str] = []
    for p, v in zip(patients, values):
        if p in seen and seen[p] != v and p not in conflicts:
            conflicts.append(p)
        seen.setdefault(p, v)
    if conflicts:
        raise DataError(f"{path}: slides of one patient disagree on {what}: {preview(conflicts)}")


def _omics(
    expression: str | os.PathLike[str] | ExpressionTable | None,
    gene_sets: str | os.PathLike[str] | GeneSets | None,
    log1p: bool,
) -> tuple[GeneSets | None, ExpressionTable | None]:
    if isinstance(expression, ExpressionTable):
        sets = gene_sets if isinstance(gene_sets, GeneSets) else load_gene_sets(gene_sets)
        return sets, expression
    if expression is None:
        sets = gene_sets if isinstance(gene_sets, GeneSets) or gene_sets is None else load_gene_sets(gene_sets)
        return sets, None
    if isinstance(gene_sets, GeneSets):  # sets built by the caller: read just their genes
        table = read_expression(expression, genes=gene_sets.genes)
        warn_report(table)
        return gene_sets, table
    return load_omics(expression, gene_sets, log1p=log1p)


def load_cohort(
    *,
    cohort_csv: str | os.PathLike[str],
    expression: str | os.PathLike[str] | ExpressionTable | None = None,
    gene_sets: str | os.PathLike[str] | GeneSets | None = None,
    task: str,
    label_column: str = "label",
    base_dir: str | os.PathLike[str] | None = None,
    magnifications: Sequence[str] = DEFAULT_MAGNIFICATIONS,
    log1p: bool = True,
) -> Cohort:
    """Read and validate a cohort; join it to the expression table when one is given.

    ``expression`` / ``gene_sets`` may be paths (read with ``load_omics``; gene sets default
    to the shipped GMT) or already loaded objects. Without ``expression`` the cohort is
    WSI-only (student evaluation, ABMIL). Raises :class:`DataError` with one line on:
    missing columns, empty cells, duplicated slide ids, missing feature files, labels with
    one class, survival with no event or a negative time, slides of one patient that
    disagree on the target, patients absent from the expression table.
    """
    if task not in TASKS:
        raise DataError(f"task must be one of {', '.join(TASKS)}, not {task!r}")
    path = Path(cohort_csv)
    base = Path(base_dir) if base_dir is not None else path.parent
    frame = _read_csv(path)
    feature_cols = [f"features_{m}" for m in magnifications]
    target_cols = [label_column] if task == "classification" else ["time", "event"]
    _check_columns(frame, path, ["patient_id", "slide_id", *feature_cols, *target_cols])
    _check_filled(frame, path, ["patient_id", "slide_id", *target_cols, *feature_cols])

    frame = frame.copy()
    frame["slide_id"] = frame["slide_id"].str.strip()
    frame["patient_id"] = [to_patient_id(p) for p in frame["patient_id"]]
    dupes = frame["slide_id"][frame["slide_id"].duplicated()].unique().tolist()
    if dupes:
        raise DataError(f"{path}: duplicated slide id(s): {preview(dupes)}")
    patients = list(dict.fromkeys(frame["patient_id"]))

    class_names: tuple[str, ...] = ()
    labels: list[str | None] = [None] * len(frame)
    classes: list[int | None] = [None] * len(frame)
    times: list[float | None] = [None] * len(frame)
    events: list[int | None] = [None] * len(frame)
    if task == "classification":
        labels = [str(v).strip() for v in frame[label_column]]
        _one_value_per_patient(frame["patient_id"].tolist(), labels, f"{label_column!r}", path)
        class_names = _sort_labels(labels)
        if len(class_names) < 2:
            raise DataError(
                f"{path}: column {label_column!r} has one class ({class_names[0]!r}); classification needs two or more"
            )
        index = {c: i for i, c in enumerate(class_names)}
        classes = [index[v] for v in labels]
    else:
        t = _numbers(frame, path, "time")
        e = _numbers(frame, path, "event")
        if (t < 0).any():
            where = [f"{_row_name(frame, i)} = {t[i]:g}" for i in np.flatnonzero(t < 0)]
            raise DataError(f"{path}: negative survival time(s): {preview(where)}")
        if not np.isin(e, (0, 1)).all():
            where = [f"{_row_name(frame, i)} = {e[i]:g}" for i in np.flatnonzero(~np.isin(e, (0, 1)))]
            raise DataError(f"{path}: column 'event' must be 0 (censored) or 1 (event): {preview(where)}")
        if not e.any():
            raise DataError(f"{path}: every event is 0 (all censored); survival needs observed events")
        times, events = [float(v) for v in t], [int(v) for v in e]
        _one_value_per_patient(frame["patient_id"].tolist(), list(zip(times, events)), "time/event", path)

    files = _feature_paths(frame, path, base, magnifications)
    check_feature_files(files, frame, path)
    sets, table = _omics(expression, gene_sets, log1p)
    if table is not None:
        known = set(table.patients)
        unknown = [p for p in patients if p not in known]
        if unknown:
            raise DataError(
                f"{path}: {len(unknown)} patient(s) not in the expression table {table.source}: {preview(unknown)}"
            )
    slides = tuple(
        SlideRecord(
            patient_id=frame["patient_id"].iat[i],
            slide_id=frame["slide_id"].iat[i],
            features=files[i],
            label=labels[i],
            class_index=classes[i],
            time=times[i],
            event=events[i],
        )
        for i in range(len(frame))
    )
    return Cohort(
        table=frame,
        task=task,
        class_names=class_names,
        patients=tuple(patients),
        slides=slides,
        magnifications=tuple(magnifications),
        gene_sets=sets,
        expression=table,
        source=str(path),
    )
