"""`dismm extract` over a cohort: folders and lists of slides, here or on a dask cluster.

Why: one broken slide must not stop a thousand others. Each slide's error is caught,
reported as it happens and summarised at the end; ``CohortSummary.ok`` is False (and
``exit_code`` 1) when any failed. With a scheduler address (or a ``distributed.Client``)
each slide is one task on the cluster and the workers build their own encoder once per
process; the files are the same as a local run's (bit for bit with the same torch thread
count: dask workers default to one). ``OUT/manifest.csv`` lists every slide, magnification
and file ever extracted into OUT (a run replaces the rows of its own slides; paths are
relative to OUT), and can seed a cohort CSV.

Several `dismm extract` processes may share one OUT (on one machine or a shared file
system): each slide is extracted under an exclusive lock (``OUT/.locks/<stem>.lock``,
``flock``), so one process does a slide and the others move on, coming back to it at the
end to report the finished files. The kernel releases the lock of a killed process, so a
stale lock never blocks a slide.
"""

from __future__ import annotations

import csv
import fcntl
import io
import os
import socket
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napari_dismm.errors import DismmError
from napari_dismm.features.cache import magnification_label
from napari_dismm.features.extract import SlideResult, check_options, extract_slide, resolve_encoder
from napari_dismm.features.h5 import atomic_path


@dataclass(frozen=True)
class SlideFailure:
    """A slide that could not be extracted, with the one-line reason."""

    slide: Path
    error: str
    seconds: float = 0.0


@dataclass
class CohortSummary:
    """Every slide's outcome; ``ok`` / ``exit_code`` for the command line, ``table()`` to print."""

    results: list[SlideResult] = field(default_factory=list)
    failed: list[SlideFailure] = field(default_factory=list)
    manifest: Path | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def exit_code(self) -> int:
        """0 when every slide succeeded, 1 when any failed (2 is kept for bad input)."""
        return 0 if self.ok else 1

    def table(self) -> str:
        """The end-of-run summary: one line per slide, failures last, then totals."""
        lines = [f"{'slide':<40} {'status':<8} {'patches':>8} {'seconds':>8}  detail"]
        for r in self.results:
            status = "skipped" if r.skipped else "done"
            mags = ", ".join(f"{magnification_label(o.magnification)}: {o.n_patches}" for o in r.outputs)
            lines.append(f"{r.slide.name:<40} {status:<8} {r.n_patches:>8} {r.seconds:>8.1f}  {mags}")
        for f in self.failed:
            lines.append(f"{f.slide.name:<40} {'FAILED':<8} {'-':>8} {f.seconds:>8.1f}  {f.error}")
        done = sum(not r.skipped for r in self.results)
        skipped = len(self.results) - done
        lines.append(
            f"{len(self.results) + len(self.failed)} slides: {done} extracted, {skipped} already done, "
            f"{len(self.failed)} failed ({self.seconds:.1f} s)"
        )
        return "\n".join(lines)


def collect_slides(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given; folders scanned (recursively, sorted) for slide files."""
    from napari_dismm.slide import is_slide_path

    slides: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = (p for p in path.rglob("*") if not p.name.startswith(".") and is_slide_path(p))
            slides.extend(sorted(found))
        elif path.exists():
            slides.append(path)
        else:
            raise DismmError(f"no such slide file or folder: {path}")
    if not slides:
        raise DismmError("no slide files found in " + ", ".join(str(i) for i in inputs))
    unique = list(dict.fromkeys(p.resolve() for p in slides))
    stems: dict[str, Path] = {}
    for p in unique:
        if p.stem in stems:
            raise DismmError(f"two slides would write the same feature file {p.stem}.h5: {stems[p.stem]} and {p}")
        stems[p.stem] = p
    return unique


def extract_cohort(
    *,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    encoder: str = "efficientnet-lite0",
    weights: str | Path | None = None,
    scheduler: Any = None,
    progress: bool = True,
    **options: Any,
) -> CohortSummary:
    """Extract every slide of ``inputs`` (files or folders); per-slide errors are caught and
    summarised. ``scheduler`` is a dask address (``"tcp://host:8786"``) or a Client; None
    runs here. ``options`` are `extract_slide`'s (magnifications, patch_size, tissue_params,
    min_tissue, batch_size, num_workers, mpp, device, overlap, threads). Dask workers run
    torch with one thread each unless ``threads`` says otherwise (dask's default); slide
    and output paths must be visible to them (one machine or a shared file system).
    Writes ``out_dir/manifest.csv``.
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    unknown = set(options) - _SLIDE_OPTIONS
    if unknown:
        raise DismmError(f"unknown extraction option(s): {', '.join(sorted(unknown))}")
    check_options(**options)
    slides = collect_slides([inputs] if isinstance(inputs, (str, Path)) else inputs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = options.pop("device", "auto")
    # Bad encoder names and wrong weight files are the user's error for the whole run:
    # fail once, here, before any slide (the cluster's workers build their own copy).
    local_encoder = resolve_encoder(encoder, weights=weights, device=device)
    summary = CohortSummary()
    bar = tqdm(total=len(slides), unit="slide", desc="extract", disable=not progress)
    with bar:
        if scheduler is None:
            busy = []
            for path in slides:
                outcome = _run_one(path, out_dir, local_encoder, None, device, options, progress, wait=False)
                if outcome is None:  # another process holds it: do the others first
                    busy.append(path)
                    continue
                _record(summary, outcome, bar)
            for path in busy:
                bar.write(f"dismm extract: {path.name}: another process is extracting it; waiting", file=sys.stderr)
                _record(summary, _run_one(path, out_dir, local_encoder, None, device, options, progress), bar)
        else:
            _run_distributed(summary, slides, out_dir, encoder, weights, device, options, scheduler, bar)
    summary.results.sort(key=lambda r: r.slide.name)
    summary.failed.sort(key=lambda f: f.slide.name)
    summary.seconds = time.perf_counter() - started
    summary.manifest = write_manifest(out_dir / "manifest.csv", summary)
    return summary


_SLIDE_OPTIONS = {
    "magnifications", "patch_size", "overlap", "tissue_params", "min_tissue",
    "batch_size", "num_workers", "mpp", "device", "threads",
}


@contextmanager
def slide_lock(out_dir: Path, stem: str, *, wait: bool = True) -> Iterator[bool]:
    """Hold ``OUT/.locks/<stem>.lock`` exclusively; yields False (without waiting) when
    another process holds it and ``wait`` is False. The file stays (removing it would race
    with a process that has just opened it); it names the holder's host and pid."""
    locks = out_dir / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    fd = os.open(locks / f"{stem}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        yield True
    finally:
        os.close(fd)  # releases the lock


def _run_one(
    path: Path, out_dir: Path, encoder: Any, weights: Any, device: str, options: dict, progress: bool,
    wait: bool = True,
) -> SlideResult | SlideFailure | None:
    """One slide, its error turned into a SlideFailure (runs locally or on a dask worker);
    None when another process holds the slide's lock and ``wait`` is False.

    Any exception from one slide is caught on purpose: a corrupt file deep in a cohort must
    not cost the other slides; the failure is reported with its type and message.
    """
    t0 = time.perf_counter()
    try:
        with slide_lock(out_dir, path.stem, wait=wait) as held:
            if not held:
                return None
            return extract_slide(
                slide_path=path, out_dir=out_dir, encoder=encoder, weights=weights, device=device,
                progress=progress, **options,
            )
    except DismmError as error:
        return SlideFailure(path, _one_line(error), time.perf_counter() - t0)
    except Exception as error:  # noqa: BLE001 - reported per slide, see docstring
        return SlideFailure(path, f"{type(error).__name__}: {_one_line(error)}", time.perf_counter() - t0)


def _run_distributed(
    summary: CohortSummary, slides: list[Path], out_dir: Path, encoder: str, weights: Any,
    device: str, options: dict, scheduler: Any, bar: Any,
) -> None:
    from distributed import Client, as_completed

    own = isinstance(scheduler, str)
    try:
        client = Client(scheduler, set_as_default=False, timeout=20) if own else scheduler
    except (OSError, TimeoutError) as error:
        raise DismmError(f"cannot reach the dask scheduler at {scheduler}: {_one_line(error)}") from None
    try:
        futures = {
            client.submit(_run_one, path, out_dir, encoder, weights, device, options, False, pure=False): path
            for path in slides
        }
        for future in as_completed(list(futures), loop=client.loop):
            try:
                outcome = future.result()
            except Exception as error:  # noqa: BLE001 - a lost worker fails its slide, not the run
                outcome = SlideFailure(futures[future], f"worker failed: {_one_line(error)}")
            _record(summary, outcome, bar)
    finally:
        if own:
            client.close()


def _record(summary: CohortSummary, outcome: SlideResult | SlideFailure, bar: Any) -> None:
    if isinstance(outcome, SlideFailure):
        summary.failed.append(outcome)
        name = outcome.slide.name
        detail = outcome.error if outcome.error.startswith(name) else f"{name}: {outcome.error}"
        bar.write(f"dismm extract: {detail}", file=sys.stderr)
    else:
        summary.results.append(outcome)
    bar.update(1)


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


MANIFEST_COLUMNS = (
    "slide", "slide_path", "slide_id", "magnification", "path", "n_patches", "status", "seconds", "error",
)


def write_manifest(path: Path, summary: CohortSummary) -> Path:
    """Merge this run's rows into ``path`` (one row per slide and magnification, one per
    failed slide): rows of the run's slides replace their earlier rows, other slides' rows
    stay. Paths are relative to the manifest's folder (OUT), so OUT can be moved or shared.
    Atomic, and serialised between processes by a lock beside it."""
    root = path.parent.resolve()

    def rel(p: Path) -> str:
        return os.path.relpath(Path(p).resolve(), root)

    rows: list[list[Any]] = []
    for r in summary.results:
        for o in r.outputs:
            rows.append([
                r.slide.stem, rel(r.slide), r.slide_id, magnification_label(o.magnification), rel(o.path),
                o.n_patches, "skipped" if o.skipped else "done", f"{o.seconds:.2f}", "",
            ])
    for f in summary.failed:
        rows.append([f.slide.stem, rel(f.slide), "", "", "", 0, "failed", f"{f.seconds:.2f}", f.error])
    ours = {row[0] for row in rows}
    with _file_lock(path.with_name(f".{path.name}.lock")):
        kept = [row for row in _read_manifest(path) if row[0] not in ours]
        merged = sorted(kept + rows, key=lambda row: (str(row[0]), str(row[3])))
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(MANIFEST_COLUMNS)
        writer.writerows(merged)
        with atomic_path(path) as tmp:
            tmp.write_text(buffer.getvalue(), encoding="utf-8")
    return path


def _read_manifest(path: Path) -> list[list[str]]:
    """Rows of an existing manifest with our columns; anything else is not ours to keep."""
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            if next(reader, None) != list(MANIFEST_COLUMNS):
                return []
            return [row for row in reader if len(row) == len(MANIFEST_COLUMNS)]
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
