"""Activation Clustering (Chen et al., 2018) adapted to segmentation: a training-set defense.

Poisoned samples reach their (target) label through the trigger, not through the class's usual evidence,
so within one class their classifier features form a separate, small cluster.  Here a "sample" is one
(image, class) region: its classifier-input features averaged over the region.  Per class the vectors are
reduced to 10 components — with PCA by default (a deviation, kept because FastICA lost the poisoned
cluster on the unit tests' model: docs/defenses.md), or with FastICA as Chen et al. (``reduce="ica"``; IBM
ART's ``ActivationDefence``: ``reduce="FastICA"``, ``nb_dims=10``) — and split by KMeans(2); a cluster holding less than ``size_threshold``
(0.35) of the class is judged poisoned (Chen et al.'s relative-size analysis: clean data splits into two
clusters of comparable size, poison into a small one); when neither is that small the class is judged clean
and nothing in it is flagged.  Images are dropped by an area vote over their regions (``rule="area"``, see
``flag_images``) before retraining, so the share of images removed tracks the share of labelled pixels in the
clusters judged poisoned (``details["nominal_fraction"]``).
"""

from __future__ import annotations

import warnings

import numpy as np
from torch import nn

from testbed.defenses._features import begin_set_filter, check, check_set_params, flag_per_class, is_int, is_num
from testbed.defenses.protocol import DefenseContext, DefenseResult


REDUCTIONS = ("ica", "pca")


def _sklearn():
    """scikit-learn's modules, imported on first use: the one lazy import of the defenses.  `testbed --help`
    loads every defense (the demo's settings list them), and scikit-learn, which only this defense uses, would
    add about a second to it (6 s measured on a loaded 2-core machine)."""
    from sklearn import cluster, decomposition, exceptions

    return cluster, decomposition, exceptions


def reduce_dims(x: np.ndarray, n_components: int, reduce: str = "ica", seed: int = 0) -> np.ndarray:
    """``x [n,C]`` → ``[n, min(n_components, n − 1, C)]`` by FastICA (Chen et al.) or PCA, seeded."""
    _, decomposition, exceptions = _sklearn()
    comps = max(1, min(n_components, len(x) - 1, x.shape[1]))
    if reduce == "pca":
        return decomposition.PCA(n_components=comps, random_state=seed).fit_transform(x)
    if reduce != "ica":
        raise ValueError(f"reduce must be 'ica' or 'pca', got {reduce!r}")
    with warnings.catch_warnings():  # FastICA's iteration cap: the components are still usable for KMeans
        warnings.simplefilter("ignore", exceptions.ConvergenceWarning)
        return decomposition.FastICA(n_components=comps, random_state=seed, whiten="unit-variance", max_iter=400).fit_transform(x)


def cluster_flags(vectors: np.ndarray, n_components: int = 10, size_threshold: float = 0.35,
                  seed: int = 0, reduce: str = "pca") -> tuple[np.ndarray, list[int]]:
    """Flags (bool ``[n]``) for the members of a KMeans(2) cluster smaller than ``size_threshold``, and the
    two cluster sizes.  With fewer than 4 vectors nothing is flagged (no meaningful split)."""

    n = len(vectors)
    if n < 4:
        return np.zeros(n, dtype=bool), [n, 0]
    x = np.asarray(vectors, dtype=np.float64)
    z = reduce_dims(x, n_components, reduce, seed)
    labels = _sklearn()[0].KMeans(n_clusters=2, n_init=10, random_state=seed).fit_predict(z)
    sizes = np.bincount(labels, minlength=2)
    small = sizes / n < size_threshold
    return small[labels], [int(s) for s in sizes]


class ActivationClustering:
    """Parameters (defaults): ``reduce`` ("pca", or "ica": FastICA as Chen et al.), ``n_components`` (10),
    ``size_threshold`` (0.35), ``class_source`` ("labels":
    the training labels as given, or "predictions"), ``rule`` ("area" | "any", see ``flag_images``),
    ``min_class_vectors`` (classes with fewer vectors are not analysed, 10), ``batch_size`` (32)."""

    name = "activation-clustering"
    paper = 'Chen et al.: Detecting Backdoor Attacks on Deep Neural Networks by Activation Clustering, arXiv:1811.03728 (2018)'
    reference = ('IBM Adversarial Robustness Toolbox (github.com/Trusted-AI/adversarial-robustness-toolbox) '
                 'ActivationDefence')
    uses_training_set = True
    params_doc = {
        "reduce": '"pca": PCA (a deviation, see docs/defenses.md); "ica": FastICA (Chen et al.)',
        "n_components": "components per class before KMeans(2) (Chen et al.: 10)",
        "size_threshold": "a cluster below this share of its class is judged poisoned (Chen et al.'s relative size)",
        "class_source": '"labels": the training labels as given; "predictions": the model\'s argmax',
        "rule": '"area": drop an image when flagged regions cover half its labelled pixels; "any": when one is flagged',
        "min_class_vectors": "classes with fewer (image, class) regions are not analysed",
        "batch_size": "training images per forward pass",
    }

    def __init__(self, reduce: str = "pca", n_components: int = 10, size_threshold: float = 0.35,
                 class_source: str = "labels", rule: str = "area", min_class_vectors: int = 10,
                 batch_size: int = 32) -> None:
        self.reduce, self.n_components, self.size_threshold = reduce, n_components, size_threshold
        self.class_source, self.rule, self.min_class_vectors, self.batch_size = class_source, rule, min_class_vectors, batch_size

    def check_params(self) -> None:
        check(self.reduce in REDUCTIONS, "reduce", "'ica' or 'pca'", self.reduce)
        check(is_num(self.size_threshold) and 0 < self.size_threshold <= 0.5, "size_threshold", "a number in (0, 0.5]",
              self.size_threshold)
        check(is_int(self.n_components, 1), "n_components", "an integer >= 1", self.n_components)
        check_set_params(self)

    def run(self, model: nn.Module, ctx: DefenseContext) -> DefenseResult:
        feats, budget, meter = begin_set_filter(self, model, ctx)

        def analyse(vectors):
            flags, sizes = cluster_flags(vectors, self.n_components, self.size_threshold, ctx.seed, self.reduce)
            return flags, {"cluster_sizes": sizes, "relative_sizes": [s / len(vectors) for s in sizes],
                           "judged_poisoned": bool(flags.any()), "flagged": int(flags.sum())}

        drop, details = flag_per_class(feats, ctx, self.min_class_vectors, analyse, "clustered", self.rule,
                                       self.class_source)
        details.update(budget.summary(), reduce=self.reduce)
        return DefenseResult(flagged_train=drop, cost=meter.cost(), details=details)
