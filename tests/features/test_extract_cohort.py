"""`extract_cohort`: folders and lists, per-slide failures, the manifest, and a local dask
`distributed` cluster giving the same files as the local run."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from napari_dismm.errors import DismmError
from napari_dismm.features.cohort import collect_slides, extract_cohort
from napari_dismm.features.h5 import read_features
from tests.features.test_extract import encoder, he_image, slide_dir, write_slide  # noqa: F401 - fixtures

MAGS = ["10x"]


def _features(out: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    found = {}
    for p in sorted(out.rglob("*.h5")):
        ff = read_features(p)
        found[str(p.relative_to(out))] = (ff.coords, ff.features)
    return found


@pytest.fixture(scope="module")
def local_run(slide_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    summary = extract_cohort(
        inputs=[slide_dir / "good"], out_dir=out, magnifications=MAGS, device="cpu", threads=1, progress=False
    )
    return out, summary


def test_folder_cohort_writes_files_and_manifest(local_run) -> None:
    out, summary = local_run
    assert summary.ok and summary.exit_code == 0 and not summary.failed
    assert [r.slide.name for r in summary.results] == ["slide0.tif", "slide1.tif"]
    assert sorted(_features(out)) == ["efficientnet-lite0/10x/slide0.h5", "efficientnet-lite0/10x/slide1.h5"]
    rows = list(csv.DictReader(summary.manifest.open()))
    assert [(r["slide"], r["magnification"], r["status"]) for r in rows] == [
        ("slide0", "10x", "done"), ("slide1", "10x", "done"),
    ]
    for row in rows:  # paths relative to OUT
        assert not Path(row["path"]).is_absolute() and not Path(row["slide_path"]).is_absolute()
        assert int(row["n_patches"]) == read_features(out / row["path"]).n_patches > 0
        assert (out / row["slide_path"]).is_file()


def test_one_bad_slide_is_reported_and_skipped(slide_dir, local_run, tmp_path, capsys) -> None:
    out, _ = local_run
    broken = tmp_path / "broken.svs"
    broken.write_text("this is not a slide")
    summary = extract_cohort(
        inputs=[slide_dir / "good", broken, slide_dir / "bad" / "blank.tif"],
        out_dir=out, magnifications=MAGS, device="cpu", progress=True,
    )
    assert summary.ok is False and summary.exit_code == 1
    assert [f.slide.name for f in summary.failed] == ["blank.tif", "broken.svs"]
    assert "no tissue found" in summary.failed[0].error
    assert "broken.svs" in summary.failed[1].error
    assert all(r.skipped for r in summary.results) and len(summary.results) == 2  # done before: no work
    table = summary.table()
    assert "FAILED" in table and "2 already done, 2 failed" in table
    assert "broken.svs" in capsys.readouterr().err  # reported as it happens, not only at the end
    rows = list(csv.DictReader(summary.manifest.open()))  # this run's rows replaced the first run's
    assert [(r["slide"], r["status"]) for r in rows] == [
        ("blank", "failed"), ("broken", "failed"), ("slide0", "skipped"), ("slide1", "skipped"),
    ]


def test_manifest_accumulates_over_runs(slide_dir, tmp_path) -> None:
    out = tmp_path / "out"
    extract_cohort(inputs=[slide_dir / "good" / "slide0.tif"], out_dir=out, magnifications=MAGS, device="cpu",
                   progress=False)
    summary = extract_cohort(inputs=[slide_dir / "good" / "slide1.tif"], out_dir=out, magnifications=MAGS,
                             device="cpu", progress=False)
    rows = list(csv.DictReader(summary.manifest.open()))
    assert [(r["slide"], r["status"], r["path"]) for r in rows] == [
        ("slide0", "done", "efficientnet-lite0/10x/slide0.h5"), ("slide1", "done", "efficientnet-lite0/10x/slide1.h5"),
    ]


def test_collect_slides(slide_dir, tmp_path) -> None:
    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    write_slide(folder / "sub" / "a.tif", he_image(300, 300, seed=5))
    (folder / "notes.txt").write_text("not a slide")
    (folder / ".hidden.tif").write_bytes(b"II*\x00")
    assert [p.name for p in collect_slides([folder])] == ["a.tif"]
    with pytest.raises(DismmError, match="no such slide file or folder"):
        collect_slides([tmp_path / "missing"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DismmError, match="no slide files found"):
        collect_slides([empty])
    write_slide(folder / "a.tif", he_image(300, 300, seed=6))
    with pytest.raises(DismmError, match="same feature file a.h5"):
        collect_slides([folder])


def test_unknown_encoder_fails_before_any_slide(slide_dir, tmp_path) -> None:
    with pytest.raises(DismmError, match="unknown encoder"):
        extract_cohort(inputs=[slide_dir / "good"], out_dir=tmp_path, encoder="nope", progress=False)
    assert not list(tmp_path.rglob("*.h5"))


def test_distributed_cluster_gives_the_same_files(slide_dir, local_run, tmp_path) -> None:
    """Two worker processes, one slide task each, given by address; a bad slide fails
    alone. Features equal the local run's bit for bit (both encode with one torch thread)."""
    distributed = pytest.importorskip("distributed")
    local_out, _ = local_run
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, host="127.0.0.1"
    ) as cluster:
        summary = extract_cohort(
            inputs=[slide_dir / "good", slide_dir / "bad" / "tiny.tif"], out_dir=tmp_path,
            magnifications=MAGS, device="cpu", threads=1, scheduler=cluster.scheduler_address, progress=False,
        )
    assert [f.slide.name for f in summary.failed] == ["tiny.tif"]
    assert "smaller than one" in summary.failed[0].error
    assert len(summary.results) == 2 and not any(r.skipped for r in summary.results)
    remote, local = _features(tmp_path), _features(local_out)
    assert sorted(remote) == sorted(local)
    for name in local:
        np.testing.assert_array_equal(remote[name][0], local[name][0])
        np.testing.assert_array_equal(remote[name][1], local[name][1])
