"""NAD audited against its references (bboylyg/NAD ``at.py``/``main.py``, BackdoorBench ``defense/nad.py``).

- The attention-transfer loss equals the references' ``AT`` class, written out here independently of
  :mod:`testbed.defenses.nad`: ``am = sum_c |F_c|^p``, divided by ``torch.norm(am, dim=(2,3)) + 1e-6``, then
  ``F.mse_loss`` (the mean over N·h·w).
- Both phases train with BatchNorm on batch statistics (the references' ``model.train()``): checked by the
  running-statistics update the student's last training forward must leave, computed by hand from the input
  its BatchNorm saw.  With frozen BN (the repo's earlier choice) the student diverged at the paper's betas and lr
  (docs/defenses.md, "nad").
- The teacher's learning rate is constant (BackdoorBench: cosine with T_max=100 over 10 epochs, 0.01 → 0.0098).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from testbed.core.errors import UserError
from testbed.defense import DefenseContext
from testbed.defenses import nad as nad_module
from testbed.defenses.nad import NAD, at_loss, attention_map
from testbed.defenses.registry import load_defense

BN = "backbone.layer1.bn2"  # a BatchNorm of the tiny DeepLabv3 the recording hook watches


def reference_attention_map(fm: torch.Tensor, p: float, eps: float = 1e-6) -> torch.Tensor:
    """NAD's / BackdoorBench's ``AT.attention_map``, line by line."""
    am = torch.pow(torch.abs(fm), p)
    am = torch.sum(am, dim=1, keepdim=True)
    norm = torch.norm(am, dim=(2, 3), keepdim=True)
    return torch.div(am, norm + eps)


def reference_at(fm_s: torch.Tensor, fm_t: torch.Tensor, p: float) -> torch.Tensor:
    return F.mse_loss(reference_attention_map(fm_s, p), reference_attention_map(fm_t, p))


@pytest.mark.parametrize("shape,p", [((2, 16, 6, 8), 2.0), ((3, 8, 12, 16), 2.0), ((1, 4, 5, 5), 1.5)])
def test_at_loss_is_the_references_formula(shape, p):
    g = torch.Generator().manual_seed(0)
    fs, ft = torch.randn(shape, generator=g), 3 * torch.randn(shape, generator=g)
    torch.testing.assert_close(attention_map(fs, p), reference_attention_map(fs, p), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(at_loss(fs, ft, p), reference_at(fs, ft, p), rtol=1e-6, atol=1e-12)
    # the reduction is the mean over every (sample, position), not the sum
    diff = (reference_attention_map(fs, p) - reference_attention_map(ft, p)) ** 2
    n, _, h, w = shape
    assert float(at_loss(fs, ft, p)) == pytest.approx(float(diff.sum()) / (n * h * w), rel=1e-6)


def test_at_loss_of_hand_built_maps():
    """One channel, 2×2: student attention all on one position, teacher spread evenly."""
    fs = torch.tensor([[[[2.0, 0.0], [0.0, 0.0]]]])  # A = [4, 0, 0, 0] / 4 = [1, 0, 0, 0]
    ft = torch.ones(1, 1, 2, 2)  # A = [1, 1, 1, 1] / 2
    expected = ((1 - 0.5) ** 2 + 3 * 0.5 ** 2) / 4
    assert float(at_loss(fs, ft, 2.0)) == pytest.approx(expected, rel=1e-5)


def test_at_loss_is_scale_invariant_so_its_gradient_is_orthogonal_to_the_features():
    """AT(c·F) = AT(F): the gradient has no component along F (Euler), so SGD on AT alone only grows ||F||;
    nothing but BatchNorm in training mode renormalises it (the divergence measured with frozen BN)."""
    g = torch.Generator().manual_seed(1)
    fs, ft = torch.randn(2, 8, 6, 8, generator=g).requires_grad_(), torch.randn(2, 8, 6, 8, generator=g)
    with torch.no_grad():
        assert float(at_loss(5 * fs, ft, 2.0)) == pytest.approx(float(at_loss(fs, ft, 2.0)), rel=1e-4)
    (grad,) = torch.autograd.grad(at_loss(fs, ft, 2.0), fs)
    cosine = float((grad * fs.detach()).sum() / (grad.norm() * fs.detach().norm()))
    assert abs(cosine) < 1e-4


def _model_and_ctx(n_images: int, k: int = 4, size: int = 32):
    from testbed.models import create

    torch.manual_seed(0)
    model = create("deeplabv3_tiny", num_classes=k).eval()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n_images, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, k, (n_images, size, size), dtype=np.uint8)
    classes = tuple(f"c{i}" for i in range(k))
    ctx = DefenseContext(images, labels, classes, torch.device("cpu"), image_size=(size, size))
    return model, ctx

def assert_running_stats_follow(bn, before, x, momentum):
    """``bn``'s running statistics moved from ``before`` (mean, var) by ``momentum`` towards those of the batch
    ``x`` it saw (computed here by hand: the batch mean and the unbiased variance over N, H, W)."""
    mean0, var0 = before
    torch.testing.assert_close(bn.running_mean, (1 - momentum) * mean0 + momentum * x.mean(dim=(0, 2, 3)),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, (1 - momentum) * var0 + momentum * x.var(dim=(0, 2, 3), unbiased=True),
                               rtol=1e-5, atol=1e-6)
    assert not torch.equal(bn.running_mean, mean0)


def assert_frozen_bn_keeps_the_running_statistics(defense):
    """``defense`` (with ``bn="frozen"`` and 2 epochs) on 5 images: BN in eval mode in both SGD steps, the BN
    buffers untouched while the weights train."""
    model, ctx = _model_and_ctx(5)
    seen = _record_training_forwards(model)
    res = defense.run(model, ctx)
    assert [t for t, _ in seen] == [False, False]
    assert res.details["bn"] == "frozen"
    for name, before in model.state_dict().items():  # weights trained, BN buffers untouched
        if name.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(res.model.state_dict()[name], before), name
    assert any(not torch.equal(res.model.state_dict()[n], v) for n, v in model.state_dict().items())


def _record_training_forwards(model) -> list[tuple[bool, torch.Tensor]]:
    """(BN in training mode?, its input) for every forward of BN that builds a graph (the SGD phases); the hook
    travels with ``copy.deepcopy`` into NAD's student and teacher."""
    seen: list[tuple[bool, torch.Tensor]] = []

    def hook(module, inputs):
        if torch.is_grad_enabled():
            seen.append((module.training, inputs[0].detach().clone()))

    dict(model.named_modules())[BN].register_forward_pre_hook(hook)
    return seen


def test_nad_trains_batchnorm_on_batch_statistics_in_both_phases():
    model, ctx = _model_and_ctx(5)  # one batch of 5 per epoch
    bn0 = dict(model.named_modules())[BN]
    mean0, var0 = bn0.running_mean.clone(), bn0.running_var.clone()
    seen = _record_training_forwards(model)
    res = NAD(teacher_epochs=1, epochs=1).run(model, ctx)
    assert [t for t, _ in seen] == [True, True]  # the teacher's batch, then the student's
    x = seen[1][1]  # what the student's BN normalised: its running statistics move by momentum 0.1 towards it
    m = bn0.momentum
    expected_mean = (1 - m) * mean0 + m * x.mean(dim=(0, 2, 3))
    expected_var = (1 - m) * var0 + m * x.var(dim=(0, 2, 3), unbiased=True)
    bn = dict(res.model.named_modules())[BN]
    torch.testing.assert_close(bn.running_mean, expected_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, expected_var, rtol=1e-5, atol=1e-6)
    assert res.details["bn"] == "train" and not res.model.training


def test_nad_frozen_bn_keeps_the_running_statistics():
    model, ctx = _model_and_ctx(5)
    seen = _record_training_forwards(model)
    res = NAD(teacher_epochs=1, epochs=1, bn="frozen").run(model, ctx)
    assert [t for t, _ in seen] == [False, False]
    before, after = dict(model.named_modules())[BN], dict(res.model.named_modules())[BN]
    for name in ("running_mean", "running_var"):
        assert torch.equal(getattr(after, name), getattr(before, name))


def test_nad_one_image_batch_keeps_bn_frozen():
    """9 images in batches of 8: the last batch holds one image, where train-mode BN would fail (ASPP's pooled
    1×1 branch has one value per channel); that batch runs on the running statistics."""
    model, ctx = _model_and_ctx(9)
    seen = _record_training_forwards(model)
    NAD(teacher_epochs=1, epochs=1).run(model, ctx)
    assert [(t, len(x)) for t, x in seen] == [(True, 8), (False, 1), (True, 8), (False, 1)]


def test_nad_teacher_and_student_learning_rates_are_constant(monkeypatch):
    plans = []
    real = nad_module.train_clean

    def spy(model, ctx, plan, *args, **kwargs):
        plans.append(plan)
        return real(model, ctx, plan, *args, **kwargs)

    monkeypatch.setattr(nad_module, "train_clean", spy)
    model, ctx = _model_and_ctx(2)
    NAD(teacher_epochs=1, epochs=1).run(model, ctx)
    assert [(p.label, p.schedule, p.lr) for p in plans] == [("teacher", "constant", 0.01),
                                                            ("student", "constant", 0.01)]


def test_nad_bn_parameter_is_checked():
    with pytest.raises(ValueError, match=r"\bbn must be"):
        NAD(bn="eval").check_params()
    with pytest.raises(UserError, match=r"\bbn must be"):
        load_defense("nad", bn="eval")
