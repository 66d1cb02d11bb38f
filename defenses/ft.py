"""Fine-tuning (FT) on the defender's clean subset: the baseline every repair paper reports.

BackdoorBench's ``defense/ft.py``: SGD (momentum 0.9, weight decay 5e-4), learning rate 0.01 with cosine
annealing over the epochs, cross-entropy on the clean subset.  For segmentation the loss is per-pixel
cross-entropy (mean over labelled pixels, ``ctx.ignore_index`` ignored).

BatchNorm: training runs in ``model.train()`` mode, BatchNorm on batch statistics (and updating its running
statistics), as BackdoorBench's trainer does (``PureCleanModelTrainer``, whose
``ModelTrainerCLS_v2.one_forward_backward`` calls ``self.model.train()`` before every batch) — ``bn="train"``,
the default; ``bn="frozen"`` keeps the statistics fixed (eval-mode BN), ft's behaviour before revision 2, which
made fine-tuning at lr 0.01 unstable on CamVid models (docs/defenses.md, "ft").  A batch of one image keeps
BN frozen (train-mode BN needs more than one value per channel, and ASPP's pooled branch has one); see
:func:`testbed.defenses._repair.bn_mode`, shared with nad and fine-pruning.
"""

from __future__ import annotations

from torch import nn

from testbed.defenses._features import cross_entropy, report
from testbed.defenses._repair import SGDPlan, begin, bn_mode, bn_used, check_bn, check_sgd, miou, train_clean
from testbed.defenses.protocol import DefenseContext, DefenseResult


class FineTuning:
    """Fine-tune the whole model on the clean subset (per-pixel cross-entropy, SGD, cosine learning rate).

    Parameters: ``epochs`` (BackdoorBench: 100), ``lr`` (0.01), ``batch_size`` (8), ``momentum`` (0.9),
    ``weight_decay`` (5e-4), ``bn`` ("train": BatchNorm in training mode, as BackdoorBench; "frozen": statistics
    fixed).
    """

    name = "ft"
    # 2: BatchNorm in training mode, as BackdoorBench's trainer (was: frozen BN; a bench's pairs of revision 1
    # are run again)
    revision = 2
    paper = 'baseline (no single paper); as in BackdoorBench (Wu et al., NeurIPS 2022 Datasets and Benchmarks)'
    reference = 'github.com/SCLBD/BackdoorBench defense/ft.py'
    uses_training_set = False
    params_doc = {
        "epochs": "epochs over the clean subset (BackdoorBench: 100)",
        "lr": "SGD learning rate at the start of the cosine schedule (BackdoorBench: 0.01)",
        "batch_size": "clean images per SGD step",
        "momentum": "SGD momentum (BackdoorBench: 0.9)",
        "weight_decay": "SGD weight decay (BackdoorBench: 5e-4)",
        "bn": "BatchNorm while training: train (batch statistics, as BackdoorBench) or frozen",
    }

    def __init__(self, epochs: int = 100, lr: float = 0.01, batch_size: int = 8, momentum: float = 0.9,
                 weight_decay: float = 5e-4, bn: str = "train") -> None:
        self.epochs, self.lr, self.batch_size = epochs, lr, batch_size
        self.momentum, self.weight_decay, self.bn = momentum, weight_decay, bn

    def check_params(self) -> None:
        check_sgd(self)
        check_bn(self)

    def run(self, model: nn.Module, ctx: DefenseContext) -> DefenseResult:
        first = begin(self, model, ctx)
        model, meter, budget, start = first.model, first.meter, first.budget, first.miou
        plan = SGDPlan(self.epochs, self.lr, self.batch_size, self.momentum, self.weight_decay, "cosine")

        def loss_fn(m, x, y):
            return cross_entropy(m(x)["out"], y, ctx.ignore_index), len(x), len(x)

        done, _ = train_clean(model, ctx, plan, bn_mode(self.bn, loss_fn), budget, meter)
        final = miou(model, ctx, meter)
        report(ctx.progress, 1.0, f"ft done: {done} epochs, clean mIoU {final:.3f}")
        details = {"epochs_done": done, "bn": self.bn,
                   "bn_used": bn_used(self.bn, self.batch_size, len(ctx.clean_images)), "miou_clean_start": start,
                   "miou_clean_final": final, **budget.summary()}
        return DefenseResult(model=model, cost=meter.cost(), details=details)
