"""Influencer Backdoor Attack (Lan et al., ICLR 2024, arXiv 2303.12054): a patch on non-victim pixels flips the victim.

T(y): every pixel of the victim class (``source``) becomes ``target``; the other pixels keep their labels.
G(x): a small square patch pasted on *non-victim* pixels, so the model must carry the trigger's influence
across the image to the victim.  The placement follows the reference code (Maxproto/IBA,
``util/backdoor/influencer_attack.py``): the patch's footprint lies entirely inside one non-victim class
region (it does not straddle a class boundary, nor touch ignore pixels) and keeps ``edge_margin`` pixels away
from the image border; its centre is drawn by seed among all such admissible centres.  Variants:

- ``baseline``: any admissible centre;
- ``nni`` (nearest-neighbour injection): admissible centres whose chessboard distance d to the nearest victim
  pixel satisfies ``nni_lower < d ≤ nni_upper``;
- ``prl`` (pixel random labelling): baseline placement, and ``prl_fraction`` of the non-victim pixels of each
  poisoned label map are relabelled to another class present in it.

Test images are attacked at a controlled distance: attacked test image ``i`` (its row in /test) is assigned
distance bin ``i mod B`` (bins from ``distance_bins``), and its centre is drawn among the admissible centres
in that bin (the nearest bin that has one, when it has none).  The distance and the centre are stored as
``/test_attacked/distance`` and ``/test_attacked/centre`` so that the scorer reports ASR per distance bin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from testbed.attacks.base import Param
from testbed.attacks.patch import (
    PATCH_PARAMS, VICTIM_PARAMS, VictimPatchAttack, chessboard_distance, constant_windows, draw, sample_rng,
)
from testbed.attacks.selection import check_fraction, round_half_up
from testbed.core.errors import ParamError
from testbed.core.paramtypes import is_int
from testbed.data.h5data import IGNORE_INDEX

VARIANTS = ("baseline", "nni", "prl")
PLACE_STREAM, PRL_STREAM = 4, 5
DEFAULT_PRL_FRACTION = 0.2
_CHUNK = 64  # images per filter call: bounds the memory of the window filters on large images


def parse_bins(value: Any) -> list[int]:
    """``"8,16,32"`` or ``[8, 16, 32]`` → strictly increasing positive ints (upper edges of the distance bins)."""
    parts = value.split(",") if isinstance(value, str) else value
    try:
        edges = [int(str(p).strip()) for p in parts]
    except (TypeError, ValueError):
        raise ParamError(f"{{distance_bins}} must be increasing pixel distances like 8,16,24, got {value!r}") from None
    if not edges or edges[0] < 1 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ParamError(f"{{distance_bins}} must be positive, strictly increasing pixel distances like 8,16,24, got {value!r}")
    return edges


def default_bins(image_size: Sequence[int]) -> list[int]:
    """Upper bin edges at 1/8, 1/4 and 3/8 of the shorter side (8, 16, 24 px at 64 px), duplicates dropped.

    Why these: the first bin is NNI's default band; at 64 px the farthest admissible centre is 24–36 px from
    the victim in most street scenes, so a last bin beyond 3/8 still receives images.
    """
    s = min(int(image_size[0]), int(image_size[1]))
    return sorted({max(1, round_half_up(s * f)) for f in (1 / 8, 1 / 4, 3 / 8)})


def relabel_pixels(rng: np.random.Generator, clean: np.ndarray, target: np.ndarray, victim: int,
                   fraction: float) -> np.ndarray:
    """PRL: ``round(fraction·n)`` of the n non-victim, non-ignore pixels get another class present in ``target``.

    ``clean`` is the label map, ``target`` its poisoned map (victim already → target).  Each chosen pixel
    takes a class drawn uniformly among the classes present in ``target`` other than its own; with fewer
    than two classes present nothing can change and ``target`` is returned as is.
    """
    out = np.array(target, copy=True)
    present = np.unique(out[out != IGNORE_INDEX])
    idx = np.flatnonzero((clean != victim) & (clean != IGNORE_INDEX))
    count = round_half_up(fraction * idx.size)
    if present.size < 2 or count == 0:
        return out
    chosen = rng.choice(idx, size=count, replace=False)
    own = np.searchsorted(present, out.flat[chosen])
    k = rng.integers(0, present.size - 1, size=count)
    out.flat[chosen] = present[k + (k >= own)]
    return out


@dataclass(eq=False, repr=False)
class IBA(VictimPatchAttack):
    """Influencer Backdoor Attack; ``fit`` adds ``variant_``, ``edge_margin_``, ``nni_`` (lower, upper) and
    ``bins_`` (upper distance-bin edges) to the fitted attributes of the patch attacks."""

    name = "iba"
    params_doc = {
        "variant": Param("baseline (patch anywhere on non-victim pixels, the default), nni (patch within a "
                         "distance band of the victim) or prl (baseline plus random pixel labelling)", choices=VARIANTS),
        **VICTIM_PARAMS,
        **PATCH_PARAMS,
        "edge_margin": Param("least gap in px between the patch and the image border (default: the patch side)",
                             type=int, metavar="PX"),
        "nni_lower": Param("nni: the patch centre's chessboard distance d to the victim must exceed this "
                           "(default 0)", type=int, metavar="PX"),
        "nni_upper": Param("nni: that distance must be at most this (default 1/8 of the shorter side: 8 px at 64 px)",
                           type=int, metavar="PX"),
        "prl_fraction": Param("prl: share of the non-victim pixels of a poisoned label map relabelled to another "
                              f"class present in it (default {DEFAULT_PRL_FRACTION})", type=float, metavar="F"),
        "distance_bins": Param("upper edges in px of the test-time distance bins (default 1/8, 1/4, 3/8 of the "
                               "shorter side: 8,16,24 at 64 px)", metavar="A,B,..."),
    }

    # the parameters, stored as given (the dataclass writes the plain storing ``__init__``; checks are in
    # check_params): scikit-learn's convention, with ten parameters spelled once
    variant: str = "baseline"
    source: str | None = None
    target: str | None = None
    patch_size: int | None = None
    patch: str | None = None
    edge_margin: int | None = None
    nni_lower: int | None = None
    nni_upper: int | None = None
    prl_fraction: float | None = None
    distance_bins: Any = None

    # -- validation ----------------------------------------------------------------------------------
    def check_params(self, classes: list[str]) -> None:
        if self.variant not in VARIANTS:
            raise ParamError(f"unknown {{variant}} {self.variant!r}; use one of: {', '.join(VARIANTS)}")
        self._check_pair(classes)
        for key in ("edge_margin", "nni_lower", "nni_upper"):
            v = getattr(self, key)
            if v is not None and not is_int(v):
                raise ParamError(f"{{{key}}} must be a non-negative number of pixels, got {v!r}")
        for key, variant in (("nni_lower", "nni"), ("nni_upper", "nni"), ("prl_fraction", "prl")):
            if getattr(self, key) is not None and self.variant != variant:
                raise ParamError(f"{{{key}}} applies to {{variant}} {variant}, not {self.variant}")
        if self.prl_fraction is not None:
            check_fraction(self.prl_fraction, "prl_fraction", lo_open=True)
        if self.nni_lower is not None and self.nni_upper is not None and self.nni_upper <= self.nni_lower:
            raise ParamError(f"{{nni_upper}} {self.nni_upper} must exceed {{nni_lower}} {self.nni_lower}")
        if self.distance_bins is not None:
            parse_bins(self.distance_bins)

    def fit(self, data: Any, seed: int = 0) -> "IBA":
        """Validate against ``data`` (a SegFile: classes and image size) and draw the patch with ``seed``."""
        self._fit_patch(data, seed)
        h, w = self.image_size_
        size = self.trigger_.size
        self.variant_ = self.variant
        self.edge_margin_ = size if self.edge_margin is None else int(self.edge_margin)
        if 2 * self.edge_margin_ + size > min(h, w):
            raise ParamError(f"{{edge_margin}} {self.edge_margin_} px around a {size}-px patch leaves no room in the "
                             f"{h}x{w} image; lower {{edge_margin}} or {{patch_size}}")
        lower = 0 if self.nni_lower is None else int(self.nni_lower)
        upper = max(lower + 1, round_half_up(min(h, w) / 8)) if self.nni_upper is None else int(self.nni_upper)
        if upper <= lower:
            raise ParamError(f"{{nni_upper}} {upper} must exceed {{nni_lower}} {lower}")
        self.nni_ = (lower, upper)
        self.prl_fraction_ = DEFAULT_PRL_FRACTION if self.prl_fraction is None else float(self.prl_fraction)
        self.bins_ = default_bins(self.image_size_) if self.distance_bins is None else parse_bins(self.distance_bins)
        return self

    # -- placement -----------------------------------------------------------------------------------
    def admissible(self, labels: np.ndarray) -> np.ndarray:
        """bool ``[N,H,W]``: centres whose footprint lies in one non-victim, non-ignore class region and keeps
        ``edge_margin_`` px from the border."""
        labels = np.asarray(labels)
        size, m = self.trigger_.size, self.edge_margin_
        out = np.zeros(labels.shape, dtype=bool)
        h, w = labels.shape[-2:]
        r0, r1 = m + size // 2, h - m - size + size // 2 + 1  # centre rows whose footprint keeps the margin
        c0, c1 = m + size // 2, w - m - size + size // 2 + 1
        for s in range(0, labels.shape[0], _CHUNK):
            ok, value = constant_windows(labels[s : s + _CHUNK], size)
            ok &= (value != self.source_id_) & (value != IGNORE_INDEX)
            out[s : s + _CHUNK, r0:r1, c0:c1] = ok[:, r0:r1, c0:c1]
        return out

    def _band(self, distance: np.ndarray) -> np.ndarray:
        lower, upper = self.nni_
        return (distance > lower) & (distance <= upper)

    def _candidates(self, labels: np.ndarray, nni: bool) -> np.ndarray:
        labels = np.asarray(labels)
        n = labels.shape[0]
        victim = self.victim_mask(labels)
        out = victim.reshape(n, -1).any(axis=1)
        ok = self.admissible(labels)
        out &= ok.reshape(n, -1).any(axis=1)
        if nni:
            for i in np.flatnonzero(out):
                out[i] = (ok[i] & self._band(chessboard_distance(victim[i]))).any()
        return out

    def changes(self, labels: np.ndarray) -> np.ndarray:
        """Training candidates: a victim pixel and an admissible centre (for nni: one within the band)."""
        return self._candidates(labels, self.variant_ == "nni")

    def test_changes(self, labels: np.ndarray) -> np.ndarray:
        """Attacked test images: a victim pixel and an admissible centre at any distance (same for every variant)."""
        return self._candidates(labels, False)

    def distance_bin(self, distance: Any) -> np.ndarray:
        """Bin index of chessboard distances: bin b holds edges[b−1] < d ≤ edges[b]."""
        return np.searchsorted(np.asarray(self.bins_), np.asarray(distance), side="left")

    def _test_mask(self, ok: np.ndarray, distance: np.ndarray, row: int) -> np.ndarray:
        """Admissible centres in the bin assigned to test row ``row``, or the nearest bin that has one."""
        nb = len(self.bins_) + 1
        bins = self.distance_bin(distance)
        have = np.unique(bins[ok])
        want = row % nb
        chosen = have[np.argmin(np.abs(have - want))]  # ties → the lower (nearer) bin: have is sorted
        return ok & (bins == chosen)

    def poison_samples(self, images: np.ndarray, labels: np.ndarray, trigger: Any, index: np.ndarray,
                       split: str) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        images, labels = np.asarray(images), np.asarray(labels)
        out_x, out_y = images.copy(), self.transform(labels)
        ok = self.admissible(labels)
        victim = self.victim_mask(labels)
        n = labels.shape[0]
        dist_out, centres = np.zeros(n, dtype=np.int32), np.zeros((n, 2), dtype=np.int32)
        for i, row in enumerate(np.asarray(index)):
            distance = chessboard_distance(victim[i])
            if split == "test":
                mask = self._test_mask(ok[i], distance, int(row))
            else:
                mask = ok[i] & self._band(distance) if self.variant_ == "nni" else ok[i]
            centre = draw(sample_rng(self.seed_, PLACE_STREAM, split, row), mask)
            out_x[i] = self.trigger_.paste(out_x[i], centre)
            dist_out[i], centres[i] = distance[centre], centre
            if split == "train" and self.variant_ == "prl":
                rng = sample_rng(self.seed_, PRL_STREAM, split, row)
                out_y[i] = relabel_pixels(rng, labels[i], out_y[i], self.source_id_, self.prl_fraction_)
        return out_x, out_y, ({"distance": dist_out, "centre": centres} if split == "test" else {})

    # -- records ---------------------------------------------------------------------------------------
    @property
    def candidates_text(self) -> str:
        """How the poisoner's "too few candidates" error describes a candidate (call after ``fit``)."""
        band = (f", centred {self.nni_[0]} < d <= {self.nni_[1]} px from it ({{nni_lower}}, {{nni_upper}})"
                if self.variant_ == "nni" else "")
        return (f"hold a {self.source!r} pixel and room for the {self.trigger_.size}-px patch ({{patch_size}}) inside "
                f"one other class region, {self.edge_margin_} px from the border ({{edge_margin}}){band}")

    @property
    def label(self) -> str:
        """``iba-baseline``, ``iba-nni`` or ``iba-prl``."""
        return f"iba-{getattr(self, 'variant_', self.variant)}"

    def params(self) -> dict[str, Any]:
        p = {"variant": self.variant, **self._base_params(), "edge_margin": self.edge_margin,
             "nni_lower": self.nni_lower, "nni_upper": self.nni_upper, "prl_fraction": self.prl_fraction,
             "distance_bins": self.distance_bins}
        if hasattr(self, "bins_"):
            p.update(edge_margin=self.edge_margin_, distance_bins=list(self.bins_),
                     distance="chessboard, patch centre to nearest victim pixel")
            if self.variant_ == "nni":
                p.update(nni_lower=self.nni_[0], nni_upper=self.nni_[1])
            if self.variant_ == "prl":
                p["prl_fraction"] = self.prl_fraction_
        return p

