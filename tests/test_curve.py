"""Learning curves (`testbed train --val-every K`): points every K epochs and after the last, files, determinism."""

from __future__ import annotations

import csv
import json

import pytest

from testbed.cli import main
from testbed.training.loop import TrainConfig, train


def test_curve_points_match_the_scorer_and_survive_resume(badnets_line_path, tmp_path):
    cfg = TrainConfig(model="deeplabv3_tiny", epochs=3, batch_size=16, seed=0, device="cpu", val_every=2)
    run = train(badnets_line_path, tmp_path / "run", cfg, progress=False)
    rows = list(csv.DictReader((run / "curve.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [2, 3]  # every 2nd epoch and the last
    assert {r["val_split"] for r in rows} == {"test"}  # the file has no /val split: the curve says which it used
    metrics = json.loads((run / "metrics.json").read_text())
    last = json.loads((run / "curve.json").read_text())["points"][-1]
    # the last point measures the final model: the scorer's whole-test-set mIoU and ASR, computed independently
    assert last["val_mIoU"] == pytest.approx(metrics["mIoU-B-all"], abs=1e-6)
    assert last["ASR"] == pytest.approx(metrics["ASR"], abs=1e-6)
    assert (run / "curve.png").stat().st_size > 1000

    # same seed ⇒ the same curve, byte for byte (the points are measured in eval mode and change no weight)
    again = train(badnets_line_path, tmp_path / "again", cfg, progress=False)
    assert (again / "curve.csv").read_text() == (run / "curve.csv").read_text()


def test_curve_every_epoch_via_cli_and_bad_value(badnets_line_path, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["-q", "train", str(badnets_line_path), "--model", "deeplabv3_tiny", "--epochs", "1", "--batch-size", "16",
                 "--val-every", "1", "--no-score", "--out", str(out)]) == 0
    assert len(list(csv.DictReader((out / "curve.csv").open()))) == 1
    capsys.readouterr()
    assert main(["-q", "train", str(badnets_line_path), "--model", "deeplabv3_tiny", "--val-every", "-1",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "--val-every" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
