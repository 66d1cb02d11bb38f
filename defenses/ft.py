"""Fine-tuning (FT) on the defender's clean subset: the baseline every repair paper reports.

BackdoorBench's ``defense/ft.py``: SGD (momentum 0.9, weight decay 5e-4), learning rate 0.01 with cosine
annealing over the epochs, cross-entropy on the clean subset.  For segmentation the loss is per-pixel
cross-entropy (mean over labelled pixels, ``ctx.ignore_index`` ignored).  BatchNorm statistics stay frozen
(the clean subset is a dozen images; BackdoorBench trains them with batches of 256).
"""

from __future__ import annotations

from torch import nn

from testbed.defenses._features import cross_entropy, report
from testbed.defenses._repair import SGDPlan, begin, check_sgd, miou, train_clean
from testbed.defenses.protocol import DefenseContext, DefenseResult


class FineTuning:
    """Fine-tune the whole model on the clean subset (per-pixel cross-entropy, SGD, cosine learning rate).

    Parameters: ``epochs`` (BackdoorBench: 100), ``lr`` (0.01), ``batch_size`` (8), ``momentum`` (0.9),
    ``weight_decay`` (5e-4).
    """

    name = "ft"
    paper = 'baseline (no single paper); as in BackdoorBench (Wu et al., NeurIPS 2022 Datasets and Benchmarks)'
    reference = 'github.com/SCLBD/BackdoorBench defense/ft.py'
    uses_training_set = False
    params_doc = {
        "epochs": "epochs over the clean subset (BackdoorBench: 100)",
        "lr": "SGD learning rate at the start of the cosine schedule (BackdoorBench: 0.01)",
        "batch_size": "clean images per SGD step",
        "momentum": "SGD momentum (BackdoorBench: 0.9)",
        "weight_decay": "SGD weight decay (BackdoorBench: 5e-4)",
    }

    def __init__(self, epochs: int = 100, lr: float = 0.01, batch_size: int = 8, momentum: float = 0.9,
                 weight_decay: float = 5e-4) -> None:
        self.epochs, self.lr, self.batch_size = epochs, lr, batch_size
        self.momentum, self.weight_decay = momentum, weight_decay

    def check_params(self) -> None:
        check_sgd(self)

    def run(self, model: nn.Module, ctx: DefenseContext) -> DefenseResult:
        first = begin(self, model, ctx)
        model, meter, budget, start = first.model, first.meter, first.budget, first.miou
        plan = SGDPlan(self.epochs, self.lr, self.batch_size, self.momentum, self.weight_decay, "cosine")

        def loss_fn(m, x, y):
            return cross_entropy(m(x)["out"], y, ctx.ignore_index), len(x), len(x)

        done, _ = train_clean(model, ctx, plan, loss_fn, budget, meter)
        final = miou(model, ctx, meter)
        report(ctx.progress, 1.0, f"ft done: {done} epochs, clean mIoU {final:.3f}")
        details = {"epochs_done": done, "miou_clean_start": start, "miou_clean_final": final, **budget.summary()}
        return DefenseResult(model=model, cost=meter.cost(), details=details)
