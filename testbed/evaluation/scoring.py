"""Scoring what a defense returned, one function per result kind, the same way for every defense (docs/writing-a-defense.md).

- repair  (``model``)              → :func:`score_repair`: the model to score "after";
- retrain (``flagged_train``)      → :func:`score_retrain` (precision/recall of the flags), then
                                     :func:`retrain_without` (the run's original training arguments);
- filter  (``input_scores``)       → :func:`score_filter`: TPR/FPR/AUROC over benign vs attacked test inputs,
                                     and the filter that counts rejected inputs as defended;
- verdict (``verdict``)            → :func:`score_verdict`;
- and for every kind that changes predictions, :func:`score_after`: the after-scores, DER, panel predictions.

Whose failure is it?  Everything the defense wrote — its ``input_scores``, its repaired model's forward, a
result that breaks the protocol — raises :class:`DefenseFault`; any other exception here is the testbed's.
"""

from __future__ import annotations

import hashlib
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from testbed.core.atomic import safe_name
from testbed.core.errors import UserError
from testbed.core.jsonutil import jsonable
from testbed.data import h5data
from testbed.defense import DefenseResult, Verdict
from testbed.evaluation.rows import Detection, FilterScores, Flagged, Panel, VerdictRecord
from testbed.scoring.metrics import der_seg
from testbed.scoring.scorer import SCORE_KEYS, DataRef, opened, predict, score_model
from testbed.stats.intervals import auroc as auroc_of
from testbed.training.loop import TrainConfig, train
from testbed.training.runs import load_run


class DefenseFault(Exception):
    """``cause`` came from the defense's own code, or from a result that breaks the protocol."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def blame_defense(fn: Callable[..., Any], *args: Any) -> Any:
    """Call defense code; whatever it raises becomes a :class:`DefenseFault`."""
    try:
        return fn(*args)
    except (KeyboardInterrupt, SystemExit, DefenseFault):
        raise
    except Exception as e:  # noqa: BLE001 — any failure of defense code is the defense's
        raise DefenseFault(e) from e


def protocol_error(message: str, kind: type[Exception] = ValueError) -> DefenseFault:
    return DefenseFault(kind(message))


def scores_only(scores: dict[str, Any]) -> dict[str, Any]:
    return {k: scores.get(k) for k in SCORE_KEYS}


def auroc(labels: Any, scores: Any) -> float | None:
    """AUROC of ``scores`` for ``labels`` (1 = positive); None with one class.  NaN scores rank lowest and
    ±inf stays extreme, so a filter that gives up on an input is not rewarded for it."""
    s = np.clip(np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf), -1e300, 1e300)
    return auroc_of(np.asarray(labels, dtype=int), s)


# -- repair ------------------------------------------------------------------------------------------
class DefenseModel(nn.Module):
    """A defense's repaired model: what its forward raises or returns out of protocol is the defense's failure."""

    def __init__(self, inner: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.inner, self.num_classes = inner, num_classes

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = blame_defense(self.inner, x)
        logits = out.get("out") if isinstance(out, dict) else None
        if not isinstance(logits, torch.Tensor) or logits.ndim != 4 or logits.shape[0] != x.shape[0] \
                or logits.shape[1] != self.num_classes or logits.shape[-2:] != x.shape[-2:]:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(out).__name__
            raise protocol_error(f"the repaired model must return {{'out': logits [N,{self.num_classes},H,W]}} for "
                                 f"input {tuple(x.shape)}, got {got}")
        return out


def score_repair(result: DefenseResult, name: str, device: torch.device, num_classes: int) -> nn.Module | None:
    """The repaired model to score "after" (None when the defense returned none)."""
    if result.model is None:
        return None
    if not isinstance(result.model, nn.Module):
        raise protocol_error(f"{name} returned a model of type {type(result.model).__name__}, expected torch.nn.Module",
                             TypeError)
    return DefenseModel(result.model, num_classes).to(device).eval()


# -- retrain -----------------------------------------------------------------------------------------
def score_retrain(result: DefenseResult, data_path: DataRef, n_train: int) -> tuple[Flagged, np.ndarray]:
    """The flagged training indices (checked, unique, sorted) and their precision/recall against the poison."""
    flagged = np.asarray(result.flagged_train).reshape(-1)
    if flagged.size and (not np.issubdtype(flagged.dtype, np.integer) or flagged.min() < 0 or flagged.max() >= n_train):
        raise protocol_error(f"flagged_train must hold integer indices in [0, {n_train})")
    flagged = np.unique(flagged.astype(np.int64))
    with opened(data_path) as f:
        poison = np.asarray(f[h5data.POISON_INDEX], dtype=np.int64) if h5data.POISON_INDEX in f else np.empty(0, np.int64)
    tp = int(np.intersect1d(flagged, poison).size)
    part = Flagged(count=int(flagged.size), true_poison=int(poison.size), true_positives=tp,
                   precision=tp / flagged.size if flagged.size else None, recall=tp / poison.size if poison.size else None,
                   fraction=flagged.size / n_train if n_train else None)
    return part, flagged


RANDOM_CONTROL_STREAM = 0x52414E44  # "RAND": the control's draw has its own stream, apart from the defense's seed use


def random_removal(n_train: int, count: int, seed: int) -> np.ndarray:
    """The control for a training-set defense: ``count`` training indices drawn uniformly, sorted.

    Seeded by the run's seed on a stream of its own, so it is the same draw whatever the defense did with
    the seed, and it knows nothing of which samples are poisoned: it shows what removing that many images
    does by itself (less data, a different sample) next to what removing the flagged ones does.
    """
    rng = np.random.default_rng([int(seed), RANDOM_CONTROL_STREAM])
    return np.sort(rng.choice(n_train, size=int(count), replace=False)).astype(np.int64)


def retrain_without(run_config: dict[str, Any], data_path: Path, flagged: np.ndarray, n_train: int,
                    device: torch.device, work_dir: Path, progress: bool, name: str = "retrained") -> tuple[nn.Module, float]:
    """Retrain from scratch with the run's original training arguments on every ``/train`` row not flagged
    (into ``work_dir/name``); returns the model and the seconds it took."""
    if "train" not in run_config:
        raise UserError("the run's config.json has no 'train' arguments; cannot retrain without the flagged samples")
    keep = np.setdiff1d(np.arange(n_train), flagged)
    t0 = time.perf_counter()
    cfg = TrainConfig.from_dict(dict(run_config["train"]))
    cfg.device = str(device)
    if device.type != "cuda":
        cfg.amp, cfg.channels_last = False, False
    out = train(data_path, work_dir / name, cfg, train_indices=keep, progress=progress, overwrite=True, score=False)
    model, _ = load_run(out, device)
    return model, round(time.perf_counter() - t0, 4)


# -- filter ------------------------------------------------------------------------------------------
def _image_key(img: np.ndarray) -> bytes:
    return hashlib.sha1(np.ascontiguousarray(img).tobytes()).digest()


class CachedFilter:
    """The defense's ``input_scores`` behind a cache (image bytes → score), and its rejection rule."""

    def __init__(self, fn: Callable[[np.ndarray], Any], threshold: float) -> None:
        self.fn, self.threshold = fn, threshold
        self.cache: dict[bytes, float] = {}

    def scores(self, images: np.ndarray) -> np.ndarray:
        """Scores of ``images`` from the defense (always called: the cache only remembers)."""
        v = blame_defense(self.fn, images)
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu().numpy()
        v = np.asarray(v, dtype=np.float64).reshape(-1)
        if v.shape[0] != len(images):
            raise protocol_error(f"input_scores returned {v.shape[0]} scores for {len(images)} images")
        self.cache.update((_image_key(im), float(val)) for im, val in zip(images, v))
        return v

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """True = rejected (score > threshold); only images not seen before go to the defense."""
        keys = [_image_key(im) for im in images]
        missing = [i for i, k in enumerate(keys) if k not in self.cache]
        if missing:
            self.scores(images[missing])
        return np.array([self.cache[k] > self.threshold for k in keys], dtype=bool)


def _mixed_scores(filt: CachedFilter, data_path: DataRef, benign: np.ndarray, n_attacked: int, batch_size: int,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The filter's score of every benign and attacked test image, as (benign, attacked) arrays.

    Images are shown in one seeded random order with both kinds mixed in every batch, so a stateful filter
    cannot learn which inputs are attacked from when it sees them.
    """
    nb, n = len(benign), len(benign) + n_attacked
    order = np.random.default_rng([seed, 0x5C0E]).permutation(n)
    out = np.empty(n, dtype=np.float64)
    with opened(data_path) as f:
        h, w = f.image_size
        for s in range(0, n, batch_size):
            batch = order[s : s + batch_size]
            is_b = batch < nb
            x = np.empty((batch.size, h, w, 3), dtype=np.uint8)
            if is_b.any():
                x[is_b] = f.read(h5data.TEST_IMAGES, benign[batch[is_b]])
            if not is_b.all():
                x[~is_b] = f.read(h5data.TEST_ATTACKED_IMAGES, batch[~is_b] - nb)
            out[batch] = filt.scores(x)
    return out[:nb], out[nb:]


def confounded_sets(f: Any, benign: np.ndarray) -> str | None:
    """Why a filter's TPR/FPR would compare different images, or None when they compare like with like.

    With a pixel trigger the attacked test images are benign test images plus the trigger, so a filter is
    measured on the same content with and without it.  An attack that picks its test images by content (a
    semantic trigger: the attacked images are the test images that show the trigger class, unchanged, and the
    benign set is the images without it) leaves the two sets with different content: a filter that merely
    reacts to that content scores as a detector.  Content-matched sets do not exist there (the attacked
    images *are* unmodified test images), so the numbers are reported and marked instead.
    """
    if h5data.TEST_ATTACKED_INDEX not in f:
        return None
    attacked = np.asarray(f[h5data.TEST_ATTACKED_INDEX], dtype=np.int64)
    outside = np.setdiff1d(attacked, benign)
    if attacked.size == 0 or outside.size == 0:
        return None
    return (f"{outside.size} of {attacked.size} attacked test images are not in the benign test set (the attack picks "
            "test images by content, e.g. a semantic trigger): TPR/FPR/AUROC compare images with that content against "
            "images without it, not inputs with and without a trigger")


@dataclass
class FilterPart:
    detection: Detection
    scores: FilterScores
    rejects: CachedFilter


def score_filter(result: DefenseResult, name: str, data_path: DataRef, batch_size: int, seed: int) -> FilterPart:
    """Score the defense's input filter on every benign and attacked test input."""
    try:
        threshold = float(result.threshold) if result.threshold is not None else math.nan
    except (TypeError, ValueError):
        threshold = math.nan
    if not math.isfinite(threshold):
        raise protocol_error(f"{name} returned input_scores without a finite threshold")
    with opened(data_path) as f:
        benign = np.asarray(f[h5data.TEST_BENIGN_INDEX], dtype=np.int64) if h5data.TEST_BENIGN_INDEX in f else np.arange(f.length("test"))
        n_att = int(f.file[h5data.TEST_ATTACKED_IMAGES].shape[0]) if h5data.TEST_ATTACKED_IMAGES in f else 0
        confounded = confounded_sets(f, benign)
    filt = CachedFilter(result.input_scores, threshold)
    s_b, s_a = _mixed_scores(filt, data_path, benign, n_att, batch_size, seed)
    fb, fa = s_b > threshold, s_a > threshold
    detection = Detection(
        tpr=float(fa.mean()) if fa.size else None, fpr=float(fb.mean()) if fb.size else None,
        auroc=auroc(np.r_[np.zeros(s_b.size), np.ones(s_a.size)], np.r_[s_b, s_a]), threshold=threshold,
        benign_flagged=int(fb.sum()), benign_total=int(fb.size), attacked_flagged=int(fa.sum()), attacked_total=int(fa.size),
        confounded=confounded,
    )
    return FilterPart(detection, FilterScores(benign_index=benign, benign=s_b, attacked=s_a, threshold=threshold), filt)


# -- verdict -----------------------------------------------------------------------------------------
def score_verdict(verdict: Verdict) -> VerdictRecord:
    """The verdict as reported; a verdict that is not one (no numeric score, say) is the defense's failure."""
    try:
        score = float(np.clip(verdict.score, -1e300, 1e300))  # ±inf stays extreme in rankings; NaN becomes null
        backdoored = bool(verdict.backdoored)
        status = getattr(verdict, "status", None) or ("backdoored" if backdoored else "clean")
        if status not in ("backdoored", "clean", "inconclusive"):
            raise ValueError(f"verdict status must be backdoored, clean or inconclusive, got {status!r}")
        coverage = getattr(verdict, "coverage", None)
        return VerdictRecord(backdoored=backdoored, score=jsonable(score),
                             suspected=[list(map(str, p)) for p in (verdict.suspected or [])], status=str(status),
                             coverage=None if coverage is None else jsonable(float(coverage)))
    except (AttributeError, TypeError, ValueError) as e:
        raise DefenseFault(e) from e


# -- the defense's own figures -----------------------------------------------------------------------
FIGURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".svg", ".gif")


def _figure_bytes(item: Any, what: str) -> tuple[bytes, str]:
    """(bytes, suffix) of one figure: a path to an image file, or an object with ``savefig`` (matplotlib)."""
    if hasattr(item, "savefig"):
        buf = io.BytesIO()
        item.savefig(buf, format="png", dpi=100, metadata={"Software": None})
        try:
            import matplotlib.pyplot as plt

            plt.close(item)
        except ImportError:  # pragma: no cover - an object with savefig but no matplotlib
            pass
        return buf.getvalue(), ".png"
    path = Path(str(item))
    if path.suffix.lower() not in FIGURE_SUFFIXES or not path.is_file():
        raise ValueError(f"{what}: {item!r} is neither a matplotlib figure nor an image file "
                         f"({', '.join(FIGURE_SUFFIXES)})")
    return path.read_bytes(), path.suffix.lower()


def take_figures(details: dict[str, Any]) -> dict[str, bytes]:
    """Pop ``details["figures"]`` (a list, or a dict name → figure, of paths or matplotlib figures) and return the
    images as file name → bytes; ``details["figures"]`` becomes the list of those file names.  The images are
    read at once: a temporary file the defense wrote may be gone when the report is written."""
    raw = details.pop("figures", None)
    if raw is None:
        return {}
    items = list(raw.items()) if isinstance(raw, dict) else [(None, x) for x in (raw if isinstance(raw, (list, tuple)) else [raw])]
    out: dict[str, bytes] = {}
    try:
        for i, (name, item) in enumerate(items):
            data, suffix = _figure_bytes(item, "details['figures']")
            stem = safe_name(name if name is not None else (Path(str(item)).stem if not hasattr(item, "savefig") else f"figure{i + 1}"))
            while stem + suffix in out:
                stem += "_"
            out[stem + suffix] = data
    except (OSError, ValueError, TypeError) as e:
        raise DefenseFault(e) from e
    details["figures"] = list(out)
    return out


# -- after -------------------------------------------------------------------------------------------
@dataclass
class AfterPart:
    after: dict[str, Any]
    der: float | None
    rejected: dict[str, Any] | None  # rejection counts, when a filter was applied


def score_after(model: nn.Module, rejects: CachedFilter | None, before: dict[str, Any], data_path: DataRef,
                device: torch.device, batch_size: int, panels: Sequence[Panel | None] = ()) -> AfterPart:
    """``model`` on both test sets with ``rejects``' rejected inputs counted as defended; DER; panel predictions."""
    after = score_model(model, data_path, device=device, batch_size=batch_size, input_filter=rejects)
    rejected = None
    if "rejected" in after:
        rejected = jsonable({k: after["rejected"].get(k) for k in ("benign", "benign_total", "attacked", "attacked_total")})
    der = None
    if all(s.get(k) is not None for s in (before, after) for k in ("ASR", "mIoU-B")):
        der = der_seg(before, after)
    for panel in panels:
        if panel is not None:
            panel.after = predict(model, panel.images, device, batch_size)
            panel.rejected = rejects(panel.images) if rejects is not None else np.zeros(len(panel.after), bool)
    return AfterPart(scores_only(after), der, rejected)


def panel_before(model: nn.Module, data_path: DataRef, n: int, device: torch.device, batch_size: int) -> Panel | None:
    """The first ``n`` attacked test images with their labels and ``model``'s predictions (None: nothing attacked)."""
    if n <= 0:
        return None
    with opened(data_path) as f:
        if h5data.TEST_ATTACKED_IMAGES not in f:
            return None
        m = min(n, f.length("test_attacked"))
        panel = Panel(index=np.arange(m), images=np.asarray(f.file[h5data.TEST_ATTACKED_IMAGES][:m]),
                      gt=np.asarray(f.file[h5data.TEST_ATTACKED_GT][:m]), target=np.asarray(f.file[h5data.TEST_ATTACKED_LABELS][:m]))
    panel.before = predict(model, panel.images, device, batch_size)
    return panel


def benign_panel_before(model: nn.Module, data_path: DataRef, n: int, device: torch.device, batch_size: int) -> Panel | None:
    """The first ``n`` images of the benign test set with their labels and ``model``'s predictions: a repair costs
    benign accuracy, and a filter rejects benign inputs too (None when ``n`` is 0)."""
    if n <= 0:
        return None
    with opened(data_path) as f:
        index = np.asarray(f[h5data.TEST_BENIGN_INDEX], dtype=np.int64) if h5data.TEST_BENIGN_INDEX in f else np.arange(f.length("test"))
        index = index[:n]
        if index.size == 0:
            return None
        panel = Panel(index=index, images=f.read(h5data.TEST_IMAGES, index), gt=f.read(h5data.TEST_LABELS, index), target=None)
    panel.before = predict(model, panel.images, device, batch_size)
    return panel
