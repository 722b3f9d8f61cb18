"""Two `dismm extract` processes on one output share the work: each slide is extracted
once (per-slide flock), every file is intact, and a lock left by a killed process does not
block its slide."""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from napari_dismm.features.cohort import extract_cohort
from napari_dismm.features.h5 import read_features
from tests.features.test_extract import he_image, write_slide

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO / 'src'}:{REPO}"}


def _slides(root: Path, n: int) -> Path:
    folder = root / "slides"
    folder.mkdir()
    for seed in range(n):
        write_slide(folder / f"s{seed}.tif", he_image(1400, 1200, seed=seed))
    return folder


def _extract(folder: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "napari_dismm.cli", "extract", str(folder), "--out", str(out),
         "--magnifications", "20", "--device", "cpu", "--batch-size", "16"],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_two_processes_extract_each_slide_once(tmp_path):
    folder, out = _slides(tmp_path, 4), tmp_path / "out"
    procs = [_extract(folder, out), _extract(folder, out)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1][-2000:] for r in results]
    extracted = []
    for stdout, _ in results:
        totals = re.search(r"(\d+) slides: (\d+) extracted, (\d+) already done, (\d+) failed", stdout)
        assert totals, stdout
        assert int(totals.group(1)) == 4 and int(totals.group(4)) == 0
        extracted.append(int(totals.group(2)))
    assert sum(extracted) == 4  # every slide once, by one of the two
    files = sorted(out.rglob("*.h5"))
    assert [f.name for f in files] == ["s0.h5", "s1.h5", "s2.h5", "s3.h5"]
    for f in files:
        ff = read_features(f)
        assert ff.n_patches > 0 and np.isfinite(ff.features).all()
    assert not [p for p in out.rglob("*.tmp")]
    rows = list(csv.DictReader((out / "manifest.csv").open()))
    assert sorted(r["slide"] for r in rows) == ["s0", "s1", "s2", "s3"]


LOCKER = """
import sys, time
from pathlib import Path
from napari_dismm.features.cohort import slide_lock
with slide_lock(Path(sys.argv[1]), sys.argv[2]) as held:
    print("held" if held else "busy", flush=True)
    time.sleep(600)
"""


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    folder, out = _slides(tmp_path, 1), tmp_path / "out"
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(out), "s0"], env=ENV, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert locker.stdout.readline().strip() == "held"
        from napari_dismm.features.cohort import slide_lock

        with slide_lock(out, "s0", wait=False) as held:
            assert held is False  # a live holder is respected
    finally:
        locker.send_signal(signal.SIGKILL)
        locker.wait()
    assert (out / ".locks" / "s0.lock").exists()  # left behind by the killed process
    started = time.perf_counter()
    summary = extract_cohort(inputs=[folder], out_dir=out, magnifications=["20"], device="cpu", progress=False)
    assert summary.ok and [r.skipped for r in summary.results] == [False]
    assert time.perf_counter() - started < 120
