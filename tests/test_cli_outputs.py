"""Output and config arguments that name the wrong kind of path: exit 2, one line, nothing written."""

from __future__ import annotations

import pytest

from napari_dismm.cli import main


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("command", ["extract", "train", "synth", "inspect"])
@pytest.mark.parametrize("where", ["file", "inside-file"])
def test_out_naming_a_file(tmp_path, capsys, command, where):
    blocker = tmp_path / "taken.txt"
    blocker.write_text("mine\n")
    out = blocker if where == "file" else blocker / "run"
    (tmp_path / "s.svs").write_bytes(b"x")
    argv = {
        "extract": ["extract", str(tmp_path / "s.svs")],
        "train": ["train", "--cohort", "c.csv", "--expression", "e.tsv", "--task", "classification"],
        "synth": ["synth"],
        "inspect": ["inspect", str(tmp_path), "--cohort", "c.csv"],
    }[command] + ["--out", str(out)]
    assert main(argv) == 2
    line = one_line(capsys)
    assert "--out" in line and "taken.txt" in line and "file" in line
    assert blocker.read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.svs", "taken.txt"]


def test_train_config_directory(tmp_path, capsys):
    (tmp_path / "conf").mkdir()
    out = tmp_path / "run"
    code = main(["train", "--cohort", "c.csv", "--expression", "e.tsv", "--task", "classification",
                 "--out", str(out), "--config", str(tmp_path / "conf")])
    assert code == 2
    assert "is a directory" in one_line(capsys)
    assert not out.exists()
