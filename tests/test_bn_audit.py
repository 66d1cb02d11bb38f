"""BatchNorm mode of fine-pruning and anp against their references (the audit that gave ft and nad ``bn``).

fine-pruning: BackdoorBench's ``defense/fp.py`` calls ``last_net.train()`` and fine-tunes with
``BackdoorModelTrainer``, whose ``ModelTrainerCLS_v2.one_forward_backward`` (``utils/trainer_cls.py``) calls
``self.model.train()`` before every batch: BN on batch statistics, running statistics updated.  fine-pruning does
the same by default (``bn="train"``, revision 2) with ``_repair.bn_mode``, shared with ft and nad.

anp: ANP's ``optimize_mask_cifar.py`` and BackdoorBench's ``defense/anp.py`` run ``mask_train`` after
``model.train()``, so ``NoisyBatchNorm2d`` normalises by the batch's statistics; both then prune a fresh copy of
the original checkpoint, so the running statistics updated on the way never reach the result.  anp's hook
(``NoisyBN``) normalises by the batch's statistics with ``bn="train"`` (revision 2) and never touches the buffers.
i-bau (its references call ``model.eval()`` before the rounds) and abl (``model_ascent.train()``, as its
references) were faithful already and are unchanged.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from testbed.core.errors import UserError
from testbed.defense import DefenseContext, ReadOnlyArray, TrainingSet
from testbed.defenses import anp as anp_module
from testbed.defenses import fine_pruning as fp_module
from testbed.defenses._repair import bn_mode
from testbed.defenses.abl import ABL
from testbed.defenses.anp import ANP, NoisyBN
from testbed.defenses.fine_pruning import FinePruning
from testbed.defenses.registry import load_defense
from testbed.models import create

from test_nad_audit import (BN, _model_and_ctx, _record_training_forwards,
                            assert_frozen_bn_keeps_the_running_statistics, assert_running_stats_follow)


# --- fine-pruning -------------------------------------------------------------------------------------------------

def test_fine_pruning_fine_tunes_batchnorm_on_batch_statistics():
    """One batch of 5, one epoch: BN in training mode, its running statistics moved by its momentum towards
    that batch's statistics (computed here by hand from the input the BatchNorm saw)."""
    model, ctx = _model_and_ctx(5)
    bn0 = dict(model.named_modules())[BN]
    mean0, var0 = bn0.running_mean.clone(), bn0.running_var.clone()
    seen = _record_training_forwards(model)
    res = FinePruning(epochs=1).run(model, ctx)
    assert [t for t, _ in seen] == [True]  # the pruning curve runs without gradients, in eval mode
    assert_running_stats_follow(dict(res.model.named_modules())[BN], (mean0, var0), seen[0][1], bn0.momentum)
    assert res.details["bn"] == "train"
    assert all(not mod.training for mod in res.model.modules())  # handed back in eval mode, BN included
    pruned = res.details["pruned_channels"]
    if pruned:  # the pruning survives the fine-tuning
        assert torch.count_nonzero(res.model.classifier.weight[:, pruned]) == 0


def test_fine_pruning_frozen_bn_keeps_the_running_statistics():
    assert_frozen_bn_keeps_the_running_statistics(FinePruning(epochs=2, bn="frozen"))


def test_fine_pruning_one_image_batch_keeps_bn_frozen():
    """9 images in batches of 8: the one-image batch runs on the running statistics (ASPP's pooled branch)."""
    model, ctx = _model_and_ctx(9)
    seen = _record_training_forwards(model)
    FinePruning(epochs=2).run(model, ctx)
    assert [(t, len(x)) for t, x in seen] == [(True, 8), (False, 1), (True, 8), (False, 1)]


def test_fine_pruning_uses_the_shared_bn_helper():
    assert fp_module.bn_mode is bn_mode


# --- anp ----------------------------------------------------------------------------------------------------------

def _bn(c: int = 3) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(1)
    bn = nn.BatchNorm2d(c).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
        bn.weight.copy_(torch.randn(c, generator=g))
        bn.bias.copy_(torch.randn(c, generator=g))
    return bn


def _noisy_reference(x, mean, var, bn, mask, noise, noise_bias):
    """NoisyBatchNorm2d's formula, perturbed: gamma (m + delta) x_hat + beta (1 + xi)."""
    x_hat = (x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + bn.eps)
    return (bn.weight * (mask + noise))[None, :, None, None] * x_hat + (bn.bias * (1 + noise_bias))[None, :, None, None]


@pytest.mark.parametrize("batch_stats", [True, False])
def test_anp_hook_normalises_by_batch_statistics_in_train_mode(batch_stats):
    bn = _bn()
    buffers = {k: v.clone() for k, v in bn.state_dict().items()}
    nb = NoisyBN(bn, batch_stats=batch_stats)
    with torch.no_grad():
        nb.mask.copy_(torch.tensor([1.0, 0.5, 0.0]))
        nb.noise.copy_(torch.tensor([0.1, -0.2, 0.3]))
        nb.noise_bias.copy_(torch.tensor([-0.3, 0.2, 0.1]))
    nb.perturbed = True
    x = torch.randn(4, 3, 5, 6, generator=torch.Generator().manual_seed(2)) * 2 + 1
    out = bn(x)
    if batch_stats:  # the batch's mean and biased variance, as F.batch_norm in training mode
        mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    expected = _noisy_reference(x, mean, var, bn, nb.mask, nb.noise, nb.noise_bias)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    one = bn(x[:1])  # one image: the running statistics, whatever the mode
    torch.testing.assert_close(one, _noisy_reference(x[:1], bn.running_mean, bn.running_var, bn, nb.mask, nb.noise,
                                                     nb.noise_bias), rtol=1e-5, atol=1e-5)
    for k, v in bn.state_dict().items():  # the running statistics are never updated
        assert torch.equal(v, buffers[k]), k
    nb.hook.remove()


def test_anp_hook_batch_statistics_on_a_one_by_one_map():
    """ASPP's pooled branch: a 1×1 map; with two images train-mode BN has two values per channel and works."""
    bn = _bn()
    nb = NoisyBN(bn, batch_stats=True)
    x = torch.randn(2, 3, 1, 1, generator=torch.Generator().manual_seed(3))
    out = bn(x)
    torch.testing.assert_close(out, F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps))
    assert torch.isfinite(bn(x[:1])).all()  # one image: running statistics, no error
    nb.hook.remove()


def test_anp_modes_keep_the_running_statistics_and_give_different_masks():
    """A short run in each mode: the buffers of the returned model are the suspicious model's (the references
    prune a fresh copy of the checkpoint), the hooks are gone, and the mode changes the optimised masks."""
    quantiles = {}
    for bn in ("train", "frozen"):
        model, ctx = _model_and_ctx(6)
        res = ANP(nb_iter=3, batch_size=4, prune_by="fraction", fraction=0.0, bn=bn).run(model, ctx)
        assert res.details["bn"] == bn and res.details["iterations"] == 3
        for name, before in model.state_dict().items():  # nothing pruned (fraction 0), buffers untouched
            assert torch.equal(res.model.state_dict()[name], before), (bn, name)
        assert all(not m._forward_hooks for m in res.model.modules())
        quantiles[bn] = res.details["mask_quantiles"]
    assert quantiles["train"] != quantiles["frozen"]


def test_anp_train_mode_sees_batch_statistics_during_the_optimisation(monkeypatch):
    """Every hooked forward of a multi-image batch goes through F.batch_norm in training mode with no buffers."""
    calls = []
    real = F.batch_norm

    def spy(x, mean, var, *args, **kwargs):
        calls.append((mean is None, args[2] if len(args) > 2 else kwargs.get("training")))
        return real(x, mean, var, *args, **kwargs)

    monkeypatch.setattr(anp_module.F, "batch_norm", spy)
    model, ctx = _model_and_ctx(4)
    ANP(nb_iter=1, batch_size=3, bn="train").run(model, ctx)
    hooked = [c for c in calls if c[0]]
    assert hooked and all(training for _, training in hooked)


# --- both ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,cls", [("fine-pruning", FinePruning), ("anp", ANP)])
def test_bn_parameter_is_checked(name, cls):
    with pytest.raises(ValueError, match=r"\bbn must be"):
        cls(bn="eval").check_params()
    with pytest.raises(UserError, match=r"\bbn must be"):
        load_defense(name, bn="eval")
    with pytest.raises(ValueError, match=r"\bbn must be"):
        cls(bn=None).run(nn.Identity(), None)
    for ok in ("train", "frozen"):
        assert load_defense(name, bn=ok).bn == ok


@pytest.mark.parametrize("name,cls", [("fine-pruning", FinePruning), ("anp", ANP)])
def test_revision_2_and_bn_defaults_to_train(name, cls):
    """The revision enters a bench's pair key, so a report's pairs computed with frozen BN are rerun."""
    from testbed.bench.run import _revision

    assert cls.revision == 2 and _revision(load_defense(name)) == 2
    assert inspect.signature(cls).parameters["bn"].default == "train" and "bn" in cls.params_doc


def test_abl_trains_through_a_one_image_batch_on_a_model_with_image_pooling():
    """17 training images in batches of 16 leave a last batch of one; deeplabv3plus_tiny's ASPP pools to 1×1, where
    train-mode BatchNorm has one value per channel and cannot normalise. ABL keeps that batch on the running
    statistics (as ft, nad, fine-pruning and anp do) instead of failing, isolation and unlearning alike."""
    torch.manual_seed(0)
    model = create("deeplabv3plus_tiny", num_classes=3).eval()
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (17, 32, 32, 3), dtype=np.uint8)
    labs = rng.integers(0, 3, (17, 32, 32), dtype=np.uint8)
    train = TrainingSet(ReadOnlyArray(lambda i: imgs[i], imgs.shape, imgs.dtype),
                        ReadOnlyArray(lambda i: labs[i], labs.shape, labs.dtype))
    ctx = DefenseContext(imgs[:4], labs[:4], ("a", "b", "c"), torch.device("cpu"), train=train, image_size=(32, 32))
    res = ABL(epochs=1, isolation_ratio=1 / 17 + 1e-9, init="model", unlearn=True, unlearn_epochs=1).run(model, ctx)
    assert len(res.flagged_train) == 2 and res.model is not None  # ceil(17 × ratio) = 2: one batch of 2 unlearned
    res = ABL(epochs=1, init="model", unlearn=True, unlearn_epochs=1, batch_size=1).run(model, ctx)
    assert res.model is not None and not res.model.training
