"""ft's BatchNorm mode against its reference, BackdoorBench's ``defense/ft.py``.

BackdoorBench fine-tunes with ``PureCleanModelTrainer``, whose ``one_forward_backward``
(``utils/trainer_cls.py``, ``ModelTrainerCLS_v2``) calls ``self.model.train()`` before every batch: BatchNorm
normalises by batch statistics and updates its running statistics.  ft does the same by default (``bn="train"``,
revision 2); ``bn="frozen"`` keeps the running statistics fixed, ft's behaviour before revision 2
(docs/defenses.md, "ft").  The per-batch switch is the helper nad uses too (``_repair.bn_mode``).
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from torch import nn

from testbed.core.errors import UserError
from testbed.defenses import nad as nad_module
from testbed.defenses._repair import bn_mode, set_bn_training
from testbed.defenses.ft import FineTuning
from testbed.defenses.registry import load_defense

from test_nad_audit import (BN, _model_and_ctx, _record_training_forwards,
                            assert_frozen_bn_keeps_the_running_statistics, assert_running_stats_follow)


def test_ft_trains_batchnorm_on_batch_statistics():
    """One batch of 5, one epoch: the running statistics move by BN's momentum towards that batch's statistics,
    computed here by hand from the input the BatchNorm saw."""
    model, ctx = _model_and_ctx(5)
    bn0 = dict(model.named_modules())[BN]
    mean0, var0 = bn0.running_mean.clone(), bn0.running_var.clone()
    seen = _record_training_forwards(model)
    res = FineTuning(epochs=1).run(model, ctx)
    assert [t for t, _ in seen] == [True]
    assert_running_stats_follow(dict(res.model.named_modules())[BN], (mean0, var0), seen[0][1], bn0.momentum)
    assert res.details["bn"] == "train" and not res.model.training
    assert all(not mod.training for mod in res.model.modules())  # handed back in eval mode, BN included


def test_ft_frozen_bn_keeps_the_running_statistics():
    assert_frozen_bn_keeps_the_running_statistics(FineTuning(epochs=2, bn="frozen"))


def test_ft_bn_is_in_training_mode_in_every_epoch_and_frozen_for_a_one_image_batch():
    """9 images in batches of 8, 2 epochs: ``train_clean`` freezes BN at each epoch's start and the wrapper puts
    it back in training mode per batch; the one-image batch (train-mode BN would fail on ASPP's pooled branch)
    runs on the running statistics."""
    model, ctx = _model_and_ctx(9)
    seen = _record_training_forwards(model)
    FineTuning(epochs=2).run(model, ctx)
    assert [(t, len(x)) for t, x in seen] == [(True, 8), (False, 1), (True, 8), (False, 1)]


def test_bn_mode_helper_by_hand():
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.Dropout(0.5)).train()
    calls = []

    def loss_fn(m, x, y):
        calls.append((m[1].training, m[2].training))
        return x.sum(), len(x), len(x)

    assert bn_mode("frozen", loss_fn) is loss_fn
    set_bn_training(net, False)
    assert not net[1].training and net[2].training  # only BatchNorm layers are switched
    wrapped = bn_mode("train", loss_fn)
    wrapped(net, torch.zeros(2, 1, 1, 1), None)
    set_bn_training(net, False)
    wrapped(net, torch.zeros(1, 1, 1, 1), None)  # one image: BN stays in eval mode
    assert calls == [(True, True), (False, True)]


def test_ft_bn_parameter_is_checked():
    with pytest.raises(ValueError, match=r"\bbn must be"):
        FineTuning(bn="eval").check_params()
    with pytest.raises(UserError, match=r"\bbn must be"):
        load_defense("ft", bn="eval")
    with pytest.raises(ValueError, match=r"\bbn must be"):
        FineTuning(bn=None).run(nn.Identity(), None)
    for ok in ("train", "frozen"):
        assert load_defense("ft", bn=ok).bn == ok


def test_ft_declares_revision_2_and_bn_defaults_to_train():
    """The revision enters a bench's pair key, so a report's ft pairs computed with frozen BN are rerun."""
    from testbed.bench.run import _revision

    assert FineTuning.revision == 2 and _revision(load_defense("ft")) == 2
    assert inspect.signature(FineTuning).parameters["bn"].default == "train" and "bn" in FineTuning.params_doc


def test_nad_uses_the_shared_bn_helper():
    """nad and ft switch BatchNorm with the same helper (no second copy in nad)."""
    assert nad_module.bn_mode is bn_mode and not hasattr(nad_module, "set_bn_training")



@pytest.mark.parametrize("name", ["ft", "nad", "fine-pruning"])
@pytest.mark.parametrize("batch_size, n_images, used", [
    (1, 3, "frozen (every batch"),    # every batch one image: BN never trains
    (2, 3, "train (except each"),     # 2 + 1: the last batch of each epoch keeps the running statistics
    (2, 4, "train"),                  # 2 + 2
    (4, 1, "frozen (every batch"),    # a one-image subset
])
def test_details_say_which_batches_trained_batchnorm(name, batch_size, n_images, used):
    """``bn`` repeats the parameter; ``bn_used`` says what BatchNorm did, and agrees with the training-mode flags
    recorded on the model's forwards (one flag per batch)."""
    model, ctx = _model_and_ctx(n_images)
    seen = _record_training_forwards(model)
    extra = {"teacher_epochs": 1} if name == "nad" else {}
    res = load_defense(name, epochs=1, batch_size=batch_size, **extra).run(model, ctx)
    assert res.details["bn"] == "train" and res.details["bn_used"].startswith(used)
    flags = {t for t, x in seen if len(x) > 1}
    one = {t for t, x in seen if len(x) == 1}
    assert flags <= {True} and one <= {False}  # BN trains on every batch of 2+ images, never on one image
    assert bool(one) == (used != "train") and bool(flags) == used.startswith("train")


@pytest.mark.parametrize("batch_size, used", [(1, "frozen (every batch"), (16, "train")])
def test_anp_details_say_whether_batchnorm_trained(batch_size, used):
    """anp draws ``batch_size`` images with replacement per iteration: every batch is that size."""
    model, ctx = _model_and_ctx(3)
    res = load_defense("anp", nb_iter=2, batch_size=batch_size).run(model, ctx)
    assert res.details["bn"] == "train" and res.details["bn_used"].startswith(used)
