"""testbed.scoring.scorer and the score/predict CLIs on a small hand-made poisoned-format file.

The model is a fake whose prediction is written into the image (red channel = 20 × class), so every
expected number is computed here, independently, from the prediction maps and the labels.
"""

from __future__ import annotations

import json
import types

import h5py
import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix as sk_confusion_matrix
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from testbed import cli
from testbed.data.h5data import write_dataset
from testbed.training import runs
from testbed.scoring.scorer import (SCORE_KEYS, AttackedPredictions, BenignPredictions, predict, score_model,
                                    score_predictions)

IGN = 255
CLASSES = ["wall", "person", "palm", "sky"]
K = len(CLASSES)
S = 8  # image side


class RedChannelModel(nn.Module):
    """Predicts class ``round(255·red) // 20`` at each pixel, as one-hot logits (torchvision's dict output)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))  # so .to(device) and .eval() behave like a real model

    def forward(self, x):
        cls = torch.div((x[:, 0] * 255).round().long(), 20, rounding_mode="floor").clamp(0, K - 1)
        return {"out": nn.functional.one_hot(cls, K).permute(0, 3, 1, 2).float() * self.scale}


def _images_for(pred: np.ndarray, flag: np.ndarray | None = None) -> np.ndarray:
    """Images that make RedChannelModel predict ``pred``; green channel 255 on flagged images."""
    img = np.zeros(pred.shape + (3,), np.uint8)
    img[..., 0] = pred * 20 + 3
    img[..., 2] = 77
    if flag is not None:
        img[flag, :, :, 1] = 255
    return img


def _reject_green(images: np.ndarray) -> np.ndarray:
    return images[..., 1].mean(axis=(1, 2)) > 128


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    g = np.random.default_rng(7)
    n_test, n_att = 7, 5
    benign_index = np.array([0, 2, 3, 5, 6])
    # benign subset: classes 0..2 only in labels and predictions (class 'sky' = 3 only in test image 1 and 4,
    # which are NOT in the benign subset, so per_class_iou_b['sky'] must be None)
    test_labels = g.integers(0, 3, (n_test, S, S)).astype(np.uint8)
    test_pred = g.integers(0, 3, (n_test, S, S)).astype(np.uint8)
    agree = g.random(test_labels.shape) < 0.6
    test_pred[agree] = test_labels[agree]
    test_labels[g.random(test_labels.shape) < 0.1] = IGN
    test_labels[[1, 4], :2] = 3
    test_pred[[1, 4], 2:4] = 3
    test_flag = np.zeros(n_test, bool)
    test_flag[[2, 5]] = True  # the filter rejects benign images 2 and 5

    gt = g.integers(0, 4, (n_att, S, S)).astype(np.uint8)
    gt[g.random(gt.shape) < 0.1] = IGN
    target = np.where(gt == 1, 2, gt).astype(np.uint8)  # 1-to-1 person → palm
    target[0, 0, :3] = 0  # attacker labels some ignore-gt pixels too
    gt[0, 0, :3] = IGN
    att_pred = g.integers(0, 4, (n_att, S, S)).astype(np.uint8)
    hit = g.random(gt.shape) < 0.7
    att_pred[hit] = target[hit] % 255
    att_pred[target == IGN] = 1
    att_flag = np.zeros(n_att, bool)
    att_flag[[1]] = True

    train_labels = g.integers(0, 4, (4, S, S)).astype(np.uint8)
    arrays = {
        "train/images": _images_for(train_labels),
        "train/labels": train_labels,
        "test/images": _images_for(test_pred, test_flag),
        "test/labels": test_labels,
        "test_attacked/images": _images_for(att_pred, att_flag),
        "test_attacked/labels": target,
        "test_attacked/gt": gt,
        "test_attacked/index": np.arange(n_att, dtype=np.int64),
        "test_benign/index": benign_index,
    }
    d = tmp_path_factory.mktemp("scoring")
    poisoned = write_dataset(d / "poisoned.h5", arrays, CLASSES, source={"test": "hand-made"},
                             attrs={"attack": {"name": "fgba", "params": {}}})
    clean_arrays = {k: v for k, v in arrays.items() if k.split("/")[0] in ("train", "test")}
    clean = write_dataset(d / "clean.h5", clean_arrays, CLASSES, source={"test": "hand-made"})
    return types.SimpleNamespace(**locals())


# -- independent reference computations ----------------------------------------------------------------
def _ref_iou(pred: np.ndarray, label: np.ndarray) -> list[float | None]:
    """Per-class IoU by direct set counting; pred −1 = rejected (matches nothing); None for an empty union."""
    valid = label != IGN
    out = []
    for c in range(K):
        inter = np.sum(valid & (pred == c) & (label == c))
        union = np.sum(valid & ((pred == c) | (label == c)))
        out.append(None if union == 0 else inter / union)
    return out


def _ref_miou(pred, label) -> float:
    vals = [v for v in _ref_iou(pred, label) if v is not None]
    return sum(vals) / len(vals)


def _ref_pa(pred, label) -> float:
    valid = label != IGN
    return np.sum(valid & (pred == label)) / np.sum(valid)


def _ref_asr(pred, target, gt) -> float:
    m = (target != gt) & (target != IGN) & (gt != IGN)
    return np.sum(m & (pred == target)) / np.sum(m)


def _ref_pba(pred, target, gt) -> float:
    m = (target == gt) & (target != IGN)
    return _ref_miou(pred[m], target[m])


def test_score_model_matches_independent_reference(case):
    s = score_model(RedChannelModel(), case.poisoned, device="cpu", batch_size=2)
    bi = case.benign_index
    pb, lb = case.test_pred[bi], case.test_labels[bi]

    # benign vs torchmetrics (mIoU over classes with non-empty union: 'sky' is absent from the subset)
    tp, tl = torch.from_numpy(pb).long(), torch.from_numpy(lb).long()
    macro = float(MulticlassJaccardIndex(num_classes=K, average="macro", ignore_index=IGN)(tp, tl))
    acc = float(MulticlassAccuracy(num_classes=K, average="micro", ignore_index=IGN)(tp, tl))
    assert s["mIoU-B"] == pytest.approx(100 * macro, abs=1e-4)
    assert s["mIoU-B"] == pytest.approx(100 * _ref_miou(pb, lb), abs=1e-9)
    assert s["PA-B"] == pytest.approx(100 * acc, abs=1e-4)
    ref_iou = _ref_iou(pb, lb)
    assert ref_iou[3] is None  # the case really has a class absent from the benign subset
    assert list(s["per_class_iou_b"]) == CLASSES
    for name, ref in zip(CLASSES, ref_iou):
        got = s["per_class_iou_b"][name]
        assert (got is None) == (ref is None)
        if ref is not None:
            assert got == pytest.approx(100 * ref, abs=1e-9)
    valid = lb != IGN
    assert s["confusion_benign"] == sk_confusion_matrix(lb[valid], pb[valid], labels=list(range(K))).tolist()
    assert s["num_images"] == {"benign": len(bi), "attacked": 5}
    assert s["pixels"]["benign"] == int(valid.sum())

    # attacked
    pa, t, gt = case.att_pred, case.target, case.gt
    assert s["mIoU-A"] == pytest.approx(100 * _ref_miou(pa, t), abs=1e-9)
    assert s["PA-A"] == pytest.approx(100 * _ref_pa(pa, t), abs=1e-9)
    assert s["ASR"] == pytest.approx(100 * _ref_asr(pa, t, gt), abs=1e-9)
    assert s["PBA"] == pytest.approx(100 * _ref_pba(pa, t, gt), abs=1e-9)
    m = (t != gt) & (t != IGN) & (gt != IGN)
    assert s["pixels"]["asr"] == int(m.sum()) and s["pixels"]["asr_success"] == int((m & (pa == t)).sum())
    assert 0 < s["ASR"] < 100  # the case is not degenerate
    assert "rejected" not in s
    json.dumps(s, allow_nan=False)  # JSON-ready: no NaN, no tensors


def test_benign_set_is_all_of_test_without_index_and_clean_file_has_none(case):
    s = score_model(RedChannelModel(), case.clean, batch_size=3)
    assert s["mIoU-B"] == pytest.approx(100 * _ref_miou(case.test_pred, case.test_labels), abs=1e-9)
    assert s["PA-B"] == pytest.approx(100 * _ref_pa(case.test_pred, case.test_labels), abs=1e-9)
    assert s["per_class_iou_b"]["sky"] is not None  # images 1 and 4 are in the benign set now
    for key in ("mIoU-A", "PA-A", "ASR", "PBA"):
        assert key in s and s[key] is None
    assert s["num_images"]["benign"] == 7


def test_input_filter_counts_rejected_inputs_as_defended(case):
    s = score_model(RedChannelModel(), case.poisoned, batch_size=4, input_filter=_reject_green)
    bi = case.benign_index
    # rejected inputs predict no class: −1 never equals a label
    pb = np.where(case.test_flag[bi, None, None], -1, case.test_pred[bi].astype(np.int64))
    lb = case.test_labels[bi]
    pa = np.where(case.att_flag[:, None, None], -1, case.att_pred.astype(np.int64))
    t, gt = case.target, case.gt
    assert s["mIoU-B"] == pytest.approx(100 * _ref_miou(pb, lb), abs=1e-9)
    assert s["PA-B"] == pytest.approx(100 * _ref_pa(pb, lb), abs=1e-9)
    assert s["ASR"] == pytest.approx(100 * _ref_asr(pa, t, gt), abs=1e-9)  # over ALL attacked inputs
    assert s["PBA"] == pytest.approx(100 * _ref_pba(pa, t, gt), abs=1e-9)
    assert s["mIoU-A"] == pytest.approx(100 * _ref_miou(pa, t), abs=1e-9)
    unfiltered = score_model(RedChannelModel(), case.poisoned, batch_size=4)
    assert s["ASR"] < unfiltered["ASR"] and s["PA-B"] < unfiltered["PA-B"]
    assert s["rejected"]["benign"] == 2 and s["rejected"]["benign_total"] == 5
    assert s["rejected"]["attacked"] == 1 and s["rejected"]["attacked_total"] == 5
    rej_pixels = [int(np.sum((lb == c) & case.test_flag[bi, None, None])) for c in range(K)]
    assert s["rejected"]["benign_pixels_per_class"] == rej_pixels


def test_score_predictions_is_the_same_code_path(case):
    in_set = np.isin(np.arange(len(case.test_pred)), case.benign_index)  # the whole /test, benign ones marked
    benign = BenignPredictions(case.test_pred, case.test_labels, rejected=case.test_flag, in_set=in_set)
    attacked = AttackedPredictions(case.att_pred, case.target, case.gt, rejected=case.att_flag)
    a = score_predictions(CLASSES, benign, attacked, batch_size=2)
    b = score_model(RedChannelModel(), case.poisoned, batch_size=3, input_filter=_reject_green)
    assert a == b
    c = score_predictions(CLASSES, BenignPredictions(case.test_pred, case.test_labels))
    assert c["ASR"] is None and c["mIoU-B"] == pytest.approx(100 * _ref_miou(case.test_pred, case.test_labels))


def test_predict_numpy_and_h5py(case):
    model = RedChannelModel().train()
    out = predict(model, case.arrays["test/images"], "cpu", batch_size=3)
    assert out.dtype == np.uint8 and np.array_equal(out, case.test_pred)
    assert model.training  # the caller's mode is restored
    with h5py.File(case.poisoned, "r") as f:
        assert np.array_equal(predict(model, f["test_attacked/images"], "cpu", batch_size=2), case.att_pred)


def test_model_with_wrong_class_count_is_a_user_error(case):
    from testbed.core.errors import UserError

    class Wrong(RedChannelModel):
        def forward(self, x):
            return {"out": super().forward(x)["out"][:, :3]}

    with pytest.raises(UserError, match="3 classes but the data has 4"):
        score_model(Wrong(), case.poisoned)


# -- CLI ----------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_runs(monkeypatch, tmp_path):
    """A stand-in `testbed.training.runs` whose load_run returns the fake model (the CLI logic is under test here)."""
    loaded = []

    def load_run(run_dir, device="cpu"):
        loaded.append(run_dir)
        return RedChannelModel().to(device).eval(), {"model": "red", "classes": CLASSES}

    monkeypatch.setattr(runs, "load_run", load_run)  # the real module keeps the rest (the CLI imports train's too)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    return run_dir, loaded


def test_score_cli_json_keys(case, fake_runs, capsys, tmp_path):
    run_dir, loaded = fake_runs
    out_json = tmp_path / "metrics.json"
    rc = cli.main(["score", str(run_dir), "--data", str(case.poisoned), "--json", "--device", "cpu",
                   "--out", str(out_json)])
    assert rc == 0 and loaded == [run_dir]
    text = capsys.readouterr().out
    assert text.count("\n") == 1  # ONE JSON object on one line
    obj = json.loads(text)
    for key in SCORE_KEYS:
        assert isinstance(obj[key], float) and 0 <= obj[key] <= 100
    assert set(obj["per_class_iou_b"]) == set(CLASSES)
    ref = score_model(RedChannelModel(), case.poisoned)
    for key in SCORE_KEYS:
        assert obj[key] == pytest.approx(ref[key], abs=1e-12)
    assert json.loads(out_json.read_text()) == obj

    # --before adds DER_seg = [max(0, ΔASR) − max(0, ΔmIoU-B) + 1]/2 (fractions)
    before = tmp_path / "before.json"
    before.write_text(json.dumps({"ASR": 100.0, "mIoU-B": obj["mIoU-B"] + 4.0}))
    assert cli.main(["score", str(run_dir), "--data", str(case.poisoned), "--json", "--before", str(before)]) == 0
    obj2 = json.loads(capsys.readouterr().out)
    expected = (max(0, (100.0 - obj["ASR"]) / 100) - 0.04 + 1) / 2
    assert obj2["DER_seg"] == pytest.approx(expected, abs=1e-9)

    # the table mentions every key
    assert cli.main(["score", str(run_dir), "--data", str(case.poisoned)]) == 0
    table = capsys.readouterr().out
    for key in SCORE_KEYS + ("person",):
        assert key in table


def test_score_cli_user_errors_exit_2(case, fake_runs, capsys, tmp_path):
    run_dir, loaded = fake_runs
    assert cli.main(["score", str(tmp_path / "nope"), "--data", str(case.poisoned)]) == 2
    assert "no such run directory" in capsys.readouterr().err
    assert cli.main(["score", str(run_dir), "--data", str(tmp_path / "missing.h5")]) == 2
    assert "missing.h5: no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert cli.main(["score", str(run_dir), "--data", str(case.poisoned), "--before", str(bad)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    before = tmp_path / "before.json"
    before.write_text(json.dumps({"ASR": 90.0, "mIoU-B": 50.0}))
    assert cli.main(["score", str(run_dir), "--data", str(case.clean), "--before", str(before)]) == 2
    assert "no attacked test set" in capsys.readouterr().err
    out = tmp_path / "m.json"
    assert cli.main(["score", str(run_dir), "--data", str(case.clean), "--before", str(before), "--out", str(out)]) == 2
    assert not out.exists()  # no partial output
    assert loaded == []  # the inputs are checked before the model is loaded


def test_predict_cli_writes_split_order_and_pngs(case, fake_runs, capsys, tmp_path):
    from PIL import Image

    from testbed.core.palette import colorize

    run_dir, _ = fake_runs
    out = tmp_path / "pred.h5"
    png = tmp_path / "png"
    rc = cli.main(["predict", str(run_dir), "--data", str(case.poisoned), "--split", "test_attacked",
                   "--out", str(out), "--png", str(png), "--batch-size", "2"])
    assert rc == 0
    with h5py.File(out, "r") as f:
        assert np.array_equal(f["pred"][()], case.att_pred)
        assert f.attrs["split"] == "test_attacked" and json.loads(f.attrs["classes"]) == CLASSES
    files = sorted(p.name for p in png.iterdir())
    assert files == [f"{i:05d}.png" for i in range(5)]
    im = np.asarray(Image.open(png / "00003.png"))
    assert im.shape == (S, 2 * S, 3)
    assert np.array_equal(im[:, :S], case.arrays["test_attacked/images"][3])
    assert np.array_equal(im[:, S:], colorize(case.att_pred[3]))

    # a clean file has no test_attacked split: exit 2, nothing written
    out2 = tmp_path / "pred2.h5"
    assert cli.main(["predict", str(run_dir), "--data", str(case.clean), "--split", "test_attacked",
                     "--out", str(out2)]) == 2
    assert "no /test_attacked split" in capsys.readouterr().err and not out2.exists()
    assert cli.main(["predict", str(tmp_path / "nope"), "--data", str(case.clean), "--out", str(out2)]) == 2
    assert not out2.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_score_model_on_cuda_matches_cpu(case):
    cpu = score_model(RedChannelModel(), case.poisoned, device="cpu", input_filter=_reject_green)
    gpu = score_model(RedChannelModel(), case.poisoned, device="cuda", input_filter=_reject_green)
    for key, value in cpu.items():  # counts identical; float64 means may differ in the last bit
        if isinstance(value, float):
            assert gpu[key] == pytest.approx(value, rel=1e-12)
        elif key.startswith("per_class"):
            assert gpu[key] == pytest.approx(value, rel=1e-12)
        else:
            assert gpu[key] == value, key


def test_cli_with_a_real_saved_run(case, tmp_path, capsys):
    """`testbed score`/`predict` through the real run loader (safetensors) and a real tiny model."""
    from testbed import models
    from testbed.training.runs import save_model

    torch.manual_seed(0)
    model = models.create("deeplabv3_tiny", K).eval()
    run_dir = save_model(model, {"model": "deeplabv3_tiny", "num_classes": K, "classes": CLASSES}, tmp_path / "run")
    assert cli.main(["score", str(run_dir), "--data", str(case.poisoned), "--json", "--device", "cpu"]) == 0
    obj = json.loads(capsys.readouterr().out)
    ref = score_model(model, case.poisoned)
    for key in SCORE_KEYS + ("per_class_iou_b", "confusion_benign", "confusion_attacked"):
        assert obj[key] == ref[key]
    out = tmp_path / "pred.h5"
    assert cli.main(["predict", str(run_dir), "--data", str(case.poisoned), "--out", str(out), "--device", "cpu"]) == 0
    with h5py.File(out, "r") as f:
        assert np.array_equal(f["pred"][()], predict(model, case.arrays["test/images"], "cpu"))
    capsys.readouterr()

    other = save_model(model, {"model": "deeplabv3_tiny", "num_classes": K, "classes": CLASSES[::-1]}, tmp_path / "r2")
    assert cli.main(["score", str(other), "--data", str(case.poisoned)]) == 2
    assert "was trained on 4 classes" in capsys.readouterr().err


def test_benign_all_scores_the_whole_clean_test_set(case):
    """mIoU-B/PA-B: the benign test set only; mIoU-B-all/PA-B-all: every /test image (the paper's benign rows)."""
    s = score_model(RedChannelModel(), case.poisoned, batch_size=3)
    bi = case.benign_index
    assert 0 < len(bi) < len(case.test_pred)  # the case really has images outside the benign set
    assert s["mIoU-B"] == pytest.approx(100 * _ref_miou(case.test_pred[bi], case.test_labels[bi]))
    assert s["mIoU-B-all"] == pytest.approx(100 * _ref_miou(case.test_pred, case.test_labels))
    valid = case.test_labels != 255
    assert s["PA-B-all"] == pytest.approx(100 * (case.test_pred == case.test_labels)[valid].mean())
    assert s["mIoU-B-all"] != pytest.approx(s["mIoU-B"])


def test_score_on_another_file_says_so(backdoored_run, synth_path, fgba_line_path, capsys):
    from testbed.cli import main

    assert main(["-q", "score", str(backdoored_run), "--data", str(fgba_line_path), "--json"]) == 0
    assert "note:" not in capsys.readouterr().err  # its own training file: nothing to say
    assert main(["-q", "score", str(backdoored_run), "--data", str(synth_path), "--json"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was trained on" in err[0] and str(synth_path) in err[0] and "fgba" in err[0]
