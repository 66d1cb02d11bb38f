"""testbed.scoring.metrics against scikit-learn, torchmetrics and hand-worked examples (docs/metrics.md, paper §3.1)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix as sk_confusion_matrix
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from testbed.scoring.metrics import AttackMeter, ConfusionMatrix, asr, der_seg, pba

IGN = 255


def _random_case(seed: int, n: int = 24, size: int = 16, k: int = 7):
    """Targets use classes 0..4, predictions 0..3 and 5: class 4 is only in the targets, class 5 only in
    the predictions, class 6 nowhere (empty union → excluded from the mean); ~10% ignore pixels."""
    g = np.random.default_rng(seed)
    target = g.integers(0, 5, size=(n, size, size)).astype(np.uint8)
    target[g.random(target.shape) < 0.1] = IGN
    pred = g.choice(np.array([0, 1, 2, 3, 5], dtype=np.uint8), size=(n, size, size))
    # make predictions correlated with targets so IoUs are not all tiny
    agree = (g.random(target.shape) < 0.5) & (target != IGN) & (target != 4)
    pred[agree] = target[agree]
    return pred, target, k


def _accumulate(pred, target, k, batch=5):
    cm = ConfusionMatrix(k)
    for s in range(0, len(pred), batch):
        cm.update(torch.from_numpy(pred[s : s + batch]), torch.from_numpy(target[s : s + batch]))
    return cm


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confusion_matrix_matches_sklearn(seed):
    pred, target, k = _random_case(seed)
    cm = _accumulate(pred, target, k)
    valid = target != IGN
    expected = sk_confusion_matrix(target[valid], pred[valid], labels=list(range(k)))
    assert np.array_equal(cm.classes_matrix.numpy(), expected)
    assert cm.rejected.sum() == 0
    assert cm.total == int(valid.sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_iou_miou_pa_match_torchmetrics(seed):
    pred, target, k = _random_case(seed)
    cm = _accumulate(pred, target, k)

    p, t = torch.from_numpy(pred).long(), torch.from_numpy(target).long()
    per_class = MulticlassJaccardIndex(num_classes=k, average=None, ignore_index=IGN)(p, t).double().numpy()
    macro = float(MulticlassJaccardIndex(num_classes=k, average="macro", ignore_index=IGN)(p, t))
    acc = float(MulticlassAccuracy(num_classes=k, average="micro", ignore_index=IGN)(p, t))

    # torchmetrics reports 0 (its zero_division) for a class whose union is empty and leaves it out of the
    # macro mean; our convention is NaN there.  Compute the union independently to know which classes.
    valid = target != IGN
    union_empty = np.array([not ((target[valid] == c) | (pred[valid] == c)).any() for c in range(k)])
    assert union_empty.tolist() == [False] * 6 + [True]  # the case really has an absent class (6)
    assert per_class[6] == 0.0  # ... and torchmetrics really reports 0 for it
    expected = np.where(union_empty, np.nan, per_class)

    got = cm.iou().numpy()
    assert np.array_equal(np.isnan(got), union_empty)
    np.testing.assert_allclose(got[~union_empty], expected[~union_empty], atol=1e-6, rtol=0)
    assert got[4] == 0.0 and got[5] == 0.0  # only-in-target / only-in-prediction classes count as 0 in the mean
    assert abs(cm.miou() - np.nanmean(expected)) < 1e-6
    assert abs(cm.miou() - macro) < 1e-6
    assert abs(cm.pixel_accuracy() - acc) < 1e-6


def test_hand_made_iou():
    # target [[0, 0,   1],     pred [[0, 1, 1],
    #         [2, 255, 1]]           [1, 0, 2]]
    # counted pixels (t, p): (0,0) 0→0, (0,1) 0→1, (0,2) 1→1, (1,0) 2→1, (1,2) 1→2; (1,1) is ignore.
    # class 0: GT 2, Pred 1 ((0,0); (1,1) is ignored), TP 1 → union 2 → 1/2
    # class 1: GT 2, Pred 3 ((0,1),(0,2),(1,0)), TP 1 → union 4 → 1/4
    # class 2: GT 1, Pred 1 ((1,2)), TP 0 → union 2 → 0
    # class 3: nowhere → NaN, left out of the mean; mIoU = (1/2 + 1/4 + 0) / 3 = 0.25
    # PA = 2 correct ((0,0), (0,2)) / 5 counted
    target = torch.tensor([[[0, 0, 1], [2, IGN, 1]]])
    pred = torch.tensor([[[0, 1, 1], [1, 0, 2]]])
    cm = ConfusionMatrix(4)
    cm.update(pred, target)
    iou = cm.iou().tolist()
    assert iou[:3] == pytest.approx([0.5, 0.25, 0.0])
    assert math.isnan(iou[3])
    assert cm.miou() == pytest.approx(0.25)
    assert cm.pixel_accuracy() == pytest.approx(2 / 5)


def test_empty_matrix_is_nan_and_bad_values_raise():
    cm = ConfusionMatrix(3)
    assert math.isnan(cm.miou()) and math.isnan(cm.pixel_accuracy())
    cm.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), IGN))  # all ignore: nothing counted
    assert cm.total == 0
    with pytest.raises(ValueError, match="outside"):
        cm.update(torch.tensor([[0, 3]]), torch.tensor([[0, 1]]))  # prediction 3 with K=3
    with pytest.raises(ValueError, match="outside"):
        cm.update(torch.tensor([[0, 5]]), torch.tensor([[0, 0]]))  # 5 would alias into row 1 without the check
    with pytest.raises(ValueError, match="outside"):
        cm.update(torch.tensor([[0, 1]]), torch.tensor([[7, 1]]))  # label 7 (not ignore) with K=3
    with pytest.raises(ValueError, match="outside"):
        cm.update(torch.tensor([[0, 1]]), torch.tensor([[3, 1]]))  # label K
    meter = AttackMeter(3)
    with pytest.raises(ValueError, match="outside"):
        meter.update(torch.tensor([[0, 1]]), torch.tensor([[3, 1]]), torch.tensor([[0, 1]]))  # target K
    with pytest.raises(ValueError, match="outside"):
        meter.update(torch.tensor([[0, 1]]), torch.tensor([[0, 1]]), torch.tensor([[0, 9]]))  # gt 9
    with pytest.raises(ValueError, match="outside"):
        meter.update(torch.tensor([[0, 3]]), torch.tensor([[0, 1]]), torch.tensor([[0, 1]]))  # prediction K
    with pytest.raises(ValueError, match="outside"):  # 257 would alias into the next group's row 1
        meter.update(torch.tensor([[0, 1]]), torch.tensor([[257, 1]]), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="outside"):
        cm.update(torch.tensor([[0, 1]]), torch.tensor([[-1, 1]]))
    assert meter.counts.sum() == 0
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(1, 2, 2), torch.zeros(1, 2, 3))
    assert cm.total == 0  # failed updates added nothing


# The 4×4 attacked example (1-to-1 attack person → palm; classes 0 wall, 1 person, 2 palm):
GT = [[0, 0, 1, 1],
      [0, 0, 1, 1],
      [2, 2, IGN, 1],
      [2, 2, 2, IGN]]
TARGET = [[0, 0, 2, 2],
          [0, 0, 2, 2],
          [2, 2, IGN, 2],
          [2, 2, 2, 0]]  # (3,3): the attacker labels a pixel whose ground truth is ignore
PRED = [[0, 1, 2, 2],
        [0, 0, 2, 1],
        [2, 0, 1, 2],
        [2, 2, 1, 0]]


def test_asr_pba_hand_made_4x4():
    pred, target, gt = (torch.tensor([m]) for m in (PRED, TARGET, GT))
    # ASR pixels: target ≠ gt, neither ignore: (0,2) (0,3) (1,2) (1,3) (2,3) — the person pixels → 5.
    # Predictions there: 2, 2, 2, 1, 2 → 4 predicted as the target (palm) → ASR = 4/5.
    assert asr(pred, target, gt) == pytest.approx(0.8)
    # PBA pixels: target == gt (valid): (0,0) (0,1) (1,0) (1,1) [wall] and (2,0) (2,1) (3,0) (3,1) (3,2) [palm].
    # Predictions: wall pixels → 0,1,0,0; palm pixels → 2,0,2,2,1.
    # wall: TP 3, GT 4, Pred 4 ((0,0),(1,0),(1,1),(2,1)) → union 5 → 3/5
    # person: GT 0, Pred 2 ((0,1),(3,2)) → union 2, TP 0 → 0
    # palm: TP 3, GT 5, Pred 3 → union 5 → 3/5
    # PBA = (0.6 + 0 + 0.6) / 3 = 0.4
    assert pba(pred, target, gt, num_classes=3) == pytest.approx(0.4)

    meter = AttackMeter(3)
    meter.update(pred[:, :2], target[:, :2], gt[:, :2])  # in two batches (rows 0-1, rows 2-3)
    meter.update(pred[:, 2:], target[:, 2:], gt[:, 2:])
    assert meter.asr_counts == (4, 5)
    assert meter.asr() == pytest.approx(0.8)
    assert meter.pba() == pytest.approx(0.4)
    # mIoU-A / PA-A: prediction vs target over the 15 target-valid pixels (only (2,2) is skipped).
    # wall target: (0,0) (0,1) (1,0) (1,1) (3,3) → preds 0,1,0,0,0 → TP 4; Pred wall: those 4 + (2,1) = 5
    #   → union 5 + 5 − 4 = 6 → 4/6
    # person target: none; Pred person: (0,1) (1,3) (3,2) → union 3 → 0
    # palm target: 10 pixels, preds 2,2,2,1,2,0,2,2,2,1 → TP 7; Pred palm = 7 → union 10 → 0.7
    a = meter.attacked
    assert a.iou().tolist() == pytest.approx([4 / 6, 0.0, 0.7])
    assert a.miou() == pytest.approx((4 / 6 + 0.7) / 3)
    assert a.pixel_accuracy() == pytest.approx(11 / 15)


def test_rejected_inputs_hand_made():
    # Two 1×2 images, K = 3.  Image 0: target [0, 1], pred [0, 1].  Image 1: target [1, 2], pred [1, 2],
    # but image 1 is rejected by a filter: its pixels predict no class.
    pred = torch.tensor([[[0, 1]], [[1, 2]]])
    target = torch.tensor([[[0, 1]], [[1, 2]]])
    cm = ConfusionMatrix(3)
    cm.update(pred, target, rejected=torch.tensor([False, True]))
    # PA = 2 correct / 4 pixels = 0.5 (rejected pixels are wrong)
    # class 0: TP 1, GT 1, Pred 1 → 1
    # class 1: TP 1, GT 2 (one rejected), Pred 1 → union 2 → 1/2
    # class 2: TP 0, GT 1 (rejected), Pred 0 → union 1 → 0  (not NaN: the class was in the ground truth)
    assert cm.pixel_accuracy() == pytest.approx(0.5)
    assert cm.iou().tolist() == pytest.approx([1.0, 0.5, 0.0])
    assert cm.miou() == pytest.approx(0.5)
    assert cm.rejected.tolist() == [0, 1, 1]
    assert cm.classes_matrix.sum() == 2

    # the same with a per-pixel mask, and numpy inputs
    cm2 = ConfusionMatrix(3)
    cm2.update(pred.numpy(), target.numpy(), rejected=np.array([[[False, False]], [[True, True]]]))
    assert torch.equal(cm.mat, cm2.mat)

    # attacked: gt [[0,0]] / [[0,0]], target = pred as above → ASR pixels: (0,1) of image 0 and both of
    # image 1 = 3; image 0's (0,1) predicted 1 = target → 1 hit; image 1 predicted its target but was
    # rejected → no hit.  ASR = 1/3 (over ALL attacked inputs), without the filter it would be 3/3.
    gt = torch.zeros_like(target)
    rej = torch.tensor([False, True])
    assert asr(pred, target, gt) == pytest.approx(1.0)
    assert asr(pred, target, gt, rejected=rej) == pytest.approx(1 / 3)
    meter = AttackMeter(3)
    meter.update(pred, target, gt, rejected=rej)
    assert meter.asr_counts == (1, 3)
    with pytest.raises(ValueError, match="rejected mask"):
        cm.update(pred, target, rejected=torch.tensor([True, False, True]))


def test_der_seg_hand_made():
    # ΔASR = (96 − 10)/100 = 0.86, ΔmIoU-B = (35 − 33)/100 = 0.02 → (0.86 − 0.02 + 1)/2 = 0.92
    assert der_seg({"ASR": 96.0, "mIoU-B": 35.0}, {"ASR": 10.0, "mIoU-B": 33.0}) == pytest.approx(0.92)
    # ASR went up (Δ = −0.03 → clipped to 0) and mIoU-B went up (Δ = −0.01 → 0) → (0 − 0 + 1)/2 = 0.5
    assert der_seg({"ASR": 96.0, "mIoU-B": 35.0}, {"ASR": 99.0, "mIoU-B": 36.0}) == pytest.approx(0.5)
    # perfect: ASR 100 → 0 at no cost → (1 − 0 + 1)/2 = 1; destroyed: ASR unchanged, mIoU 100 → 0 → 0
    assert der_seg({"ASR": 100.0, "mIoU-B": 50.0}, {"ASR": 0.0, "mIoU-B": 50.0}) == pytest.approx(1.0)
    assert der_seg({"ASR": 80.0, "mIoU-B": 100.0}, {"ASR": 80.0, "mIoU-B": 0.0}) == pytest.approx(0.0)
    # extra keys are fine; a clean-file score (ASR None) is not
    assert der_seg({"ASR": 50.0, "mIoU-B": 40.0, "PA-B": 1.0}, {"ASR": 30.0, "mIoU-B": 45.0}) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="ASR"):
        der_seg({"ASR": None, "mIoU-B": 40.0}, {"ASR": 30.0, "mIoU-B": 45.0})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    pred, target, k = _random_case(3)
    cpu = _accumulate(pred, target, k)
    gpu = ConfusionMatrix(k, "cuda")
    gpu.update(torch.from_numpy(pred).cuda(), torch.from_numpy(target).cuda())
    assert gpu.mat.device.type == "cuda"
    assert torch.equal(gpu.mat.cpu(), cpu.mat)
