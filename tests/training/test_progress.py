"""What `dismm train` prints while it runs: a bar per model and fold (epochs, losses, ETA),
"resuming fold k at epoch e" after an interruption, and why a validation metric is NaN."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from napari_dismm.cli import main

TINY = """
[model]
d = 16
dropout = 0.0
[data]
batch_size = 4
[teacher]
epochs = 3
patience = 0
[cv]
folds = 2
"""

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_train_shows_bars_resumes_and_explains_nan(tmp_path, capsys, monkeypatch):
    import training.engine as engine

    c = tmp_path / "c"
    assert main(["synth", "--out", str(c), "--patients", "12", "--tumor-genes", "4", "--tme-genes", "4"]) == 0
    (tmp_path / "cfg.toml").write_text(TINY)
    argv = ["train", "--cohort", str(c / "cohort.csv"), "--expression", str(c / "expression.tsv"),
            "--gene-sets", str(c / "sets.gmt"), "--task", "classification", "--out", str(tmp_path / "run"),
            "--config", str(tmp_path / "cfg.toml"), "--models", "teacher", "--threads", "1"]
    capsys.readouterr()

    real = engine.write_history
    calls = []

    def interrupted_after_first_epoch(history, path):
        real(history, path)
        calls.append(path)
        if len(calls) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(engine, "write_history", interrupted_after_first_epoch)
    assert main(argv) == 130  # killed after epoch 1 of fold 0 (its checkpoint is written)
    monkeypatch.setattr(engine, "write_history", real)
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "teacher: resuming fold 0 at epoch 2" in err
    final = [line for line in re.split(r"[\r\n]", err) if "teacher fold 1" in line and "3/3" in line]
    assert final, err
    assert re.search(r"3/3 \[\d\d:\d\d<00:00", final[-1])  # elapsed < remaining (the ETA)
    assert "loss " in final[-1] and "val_loss " in final[-1] and "val_auc " in final[-1]
    # 12 patients, 2 folds, 20 % validation: one validation patient, so AUC is undefined
    history = pd.read_csv(tmp_path / "run" / "teacher" / "fold_1" / "history.csv")
    assert history["val_auc"].isna().all()
    assert "val_auc is undefined (the validation part has one class); history.csv writes NaN" in err
