"""The `dismm` command line as a user runs it: exit codes and one clear line on bad input."""

import subprocess
import sys
from pathlib import Path

import pytest


def run_dismm(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "napari_dismm.cli", *args],
        capture_output=True, text=True, timeout=timeout,
    )


def assert_one_clear_line(result: subprocess.CompletedProcess, *, contains: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert contains.lower() in lines[0].lower(), lines[0]


def test_help_is_fast_and_lists_commands():
    result = run_dismm("--help")
    assert result.returncode == 0
    assert "view" in result.stdout and "demo" in result.stdout


def test_unknown_option_is_one_line():
    assert_one_clear_line(run_dismm("view", "--no-such-option", "x.svs"), contains="unrecognized")


def _truncated(tmp_path: Path, cmu: Path) -> Path:
    path = tmp_path / "truncated.svs"
    path.write_bytes(cmu.read_bytes()[:200_000])
    return path


@pytest.mark.parametrize(
    "make, contains",
    [
        (lambda tmp, cmu: tmp / "missing.svs", "missing.svs"),
        (lambda tmp, cmu: tmp, str("")),
        (lambda tmp, cmu: (tmp / "notes.svs").write_text("hello") and tmp / "notes.svs", "notes.svs"),
        (_truncated, "truncated.svs"),
    ],
    ids=["missing", "directory", "not-a-slide", "truncated"],
)
def test_view_bad_input(tmp_path, cmu_slide_path, make, contains):
    path = make(tmp_path, cmu_slide_path)
    assert_one_clear_line(run_dismm("view", str(path)), contains=contains)


def test_extract_bad_input_is_one_line(tmp_path, cmu_slide_path):
    assert_one_clear_line(run_dismm("extract", str(tmp_path / "none.svs"), "--out", str(tmp_path / "o")), contains="none.svs")
    assert_one_clear_line(
        run_dismm("extract", str(cmu_slide_path), "--out", str(tmp_path / "o"), "--encoder", "nope"), contains="unknown encoder"
    )


def test_extract_cohort_reports_failures_and_exits_nonzero(tmp_path, cmu_slide_path):
    import shutil

    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(cmu_slide_path, slides / "good.svs")
    (slides / "broken.svs").write_bytes(cmu_slide_path.read_bytes()[:150_000])
    result = run_dismm("extract", str(slides), "--out", str(tmp_path / "features"), "--magnifications", "10")
    assert result.returncode == 1, result.stderr
    assert "broken.svs" in result.stdout and "FAILED" in result.stdout
    assert (tmp_path / "features" / "efficientnet-lite0" / "10x" / "good.h5").exists()
    assert not (tmp_path / "features" / "efficientnet-lite0" / "10x" / "broken.h5").exists()


def test_predict_bad_input_is_one_line(tmp_path, cmu_slide_path):
    assert_one_clear_line(
        run_dismm("predict", str(cmu_slide_path), "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "b")),
        contains="no-model",
    )
