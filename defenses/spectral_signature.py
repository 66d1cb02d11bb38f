"""Spectral Signatures (Tran et al., 2018) adapted to segmentation: a training-set defense.

Within a class, poisoned samples shift the mean of the learned representation along one direction; the
top singular vector of the centred features finds it, and the squared projection on it is an outlier
score.  Here a sample is one (image, class) region (classifier-input features averaged over the region);
per class the ``1.5·ε`` fraction with the highest scores is flagged (Tran et al.'s rule; ε = the expected
poison rate), and images are dropped by an area vote over their regions (``rule="area"``, see
``flag_images``) before retraining, so that about ``1.5·ε`` of the training images are removed
(``details["removed_fraction"]`` next to ``details["nominal_fraction"]``).
"""

from __future__ import annotations

import numpy as np
from torch import nn

from testbed.defenses._features import begin_set_filter, check, check_set_params, flag_per_class, is_num
from testbed.defenses.protocol import DefenseContext, DefenseResult


def spectral_scores(vectors: np.ndarray) -> np.ndarray:
    """Squared projection of the centred vectors on their top right singular vector."""
    x = np.asarray(vectors, dtype=np.float64)
    if len(x) == 0:
        return np.zeros(0)
    x = x - x.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return (x @ vt[0]) ** 2


def top_flags(scores: np.ndarray, fraction: float) -> np.ndarray:
    """Flags for the ``round(fraction·n)`` highest scores (ties broken by index, deterministic)."""
    n = len(scores)
    k = min(n, int(round(fraction * n)))
    flags = np.zeros(n, dtype=bool)
    if k > 0:
        flags[np.argsort(-np.asarray(scores), kind="stable")[:k]] = True
    return flags


class SpectralSignature:
    """Parameters (defaults): ``epsilon`` expected poison rate (0.1), ``multiplier`` (1.5), ``class_source``
    ("labels" | "predictions"), ``rule`` ("area" | "any"), ``min_class_vectors`` (10), ``batch_size`` (32)."""

    name = "spectral-signature"
    paper = 'Tran, Li & Madry: Spectral Signatures in Backdoor Attacks, NeurIPS 2018'
    reference = 'none read: implemented from the paper'
    uses_training_set = True
    params_doc = {
        "epsilon": "expected poison rate; multiplier * epsilon of each class's regions are flagged",
        "multiplier": "Tran et al.'s 1.5",
        "class_source": '"labels": the training labels as given; "predictions": the model\'s argmax',
        "rule": '"area": drop an image when flagged regions cover half its labelled pixels; "any": when one is flagged',
        "min_class_vectors": "classes with fewer (image, class) regions are not analysed",
        "batch_size": "training images per forward pass",
    }

    def __init__(self, epsilon: float = 0.1, multiplier: float = 1.5, class_source: str = "labels", rule: str = "area",
                 min_class_vectors: int = 10, batch_size: int = 32) -> None:
        self.epsilon, self.multiplier, self.class_source = epsilon, multiplier, class_source
        self.rule, self.min_class_vectors, self.batch_size = rule, min_class_vectors, batch_size

    def check_params(self) -> None:
        for key in ("epsilon", "multiplier"):
            check(is_num(getattr(self, key)) and getattr(self, key) >= 0, key, "a number >= 0", getattr(self, key))
        check(self.epsilon * self.multiplier <= 1, "epsilon", "at most 1 / multiplier (epsilon·multiplier in [0, 1])",
              self.epsilon)
        check_set_params(self)

    def run(self, model: nn.Module, ctx: DefenseContext) -> DefenseResult:
        feats, budget, meter = begin_set_filter(self, model, ctx)

        def analyse(vectors):
            scores = spectral_scores(vectors)
            flags = top_flags(scores, self.multiplier * self.epsilon)
            return flags, {"removed": int(flags.sum()), "score_mean": float(scores.mean()),
                           "score_max": float(scores.max()),
                           "score_cut": float(scores[flags].min()) if flags.any() else None}

        drop, details = flag_per_class(feats, ctx, self.min_class_vectors, analyse, "scored", self.rule,
                                       self.class_source, nominal=self.multiplier * self.epsilon)
        details.update(budget.summary())
        return DefenseResult(flagged_train=drop, cost=meter.cost(), details=details)
