"""Stream a clean dataset into a poisoned one: the selected rows replaced, the audit and defense extras added.

The file layout is the dataset format's (docs/data-format.md): the clean groups, ``/train/poison_index`` and
the originals of the poisoned rows, ``/defense/clean_index``, ``/test_attacked/{images,labels,gt,index}``
and ``/test_benign/index``.  Per-sample arrays an attack returns from ``poison_samples`` for the attacked
test images (e.g. a trigger's distance to the victim) are stored as ``/test_attacked/<name>``.  A trigger's
noise samples (WaNet's noise mode) add ``/train/noise_index`` and ``/train/noise_original_images``: their
images change, their labels do not.  A file's optional ``/val`` split is copied unchanged (learning curves of
attacked models read it).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from testbed.data import h5data
from testbed.core import progress
from testbed.attacks.selection import Rows, Selection
from testbed.data.h5data import DatasetWriter, SegFile, canonical_attr, content_hash

OWN_ATTRS = ("format", "schema_version", "classes", "ignore_index", "source", "image_size", "attack", "parent_sha256")
_PLAIN = [h5data.TEST_IMAGES, h5data.TEST_LABELS, h5data.TRAIN_IMAGES, h5data.TRAIN_LABELS]
_VAL = [h5data.VAL_IMAGES, h5data.VAL_LABELS]


class _ParentHash:
    """The parent's content hash, computed on the way (one read of the clean file instead of two).

    Feeds sha256 exactly as :func:`testbed.data.h5data.content_hash` does: root attributes, then each array in
    name order (test, train, then val when the file has one).  An input with other arrays (a forced re-poisoning) is hashed separately;
    tests check both paths against ``content_hash``.
    """

    def __init__(self, src: h5py.File, train_y: Rows, test_y: Rows) -> None:
        names: list[str] = []
        src.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        self.src = src
        self.fold = sorted(names) in (_PLAIN, _PLAIN + _VAL) and train_y.data is not None and test_y.data is not None
        self.sha = hashlib.sha256()
        if self.fold:
            self.sha.update(json.dumps({k: canonical_attr(v) for k, v in src.attrs.items()}, sort_keys=True).encode())

    def header(self, name: str) -> None:
        if self.fold:
            ds = self.src[name]
            self.sha.update(f"\0{name}\0{ds.dtype.str}\0{ds.shape}\0".encode())

    def feed(self, array: np.ndarray | None) -> None:
        if self.fold and array is not None and array.size:
            self.sha.update(np.ascontiguousarray(array).data)

    def hexdigest(self) -> str:
        return self.sha.hexdigest() if self.fold else content_hash(self.src)


class _Extras:
    """Per-sample arrays from ``poison_samples`` for the attacked test images, created on first sight."""

    def __init__(self, wr: DatasetWriter, total: int) -> None:
        self.wr, self.total, self.ds = wr, total, {}

    def put(self, extras: dict[str, np.ndarray], start: int) -> None:
        for name, arr in extras.items():
            arr = np.asarray(arr)
            if name not in self.ds:
                self.ds[name] = self.wr.create(h5data.path("test_attacked", name), (self.total, *arr.shape[1:]), arr.dtype)
            self.ds[name][start : start + arr.shape[0]] = arr


@dataclass(frozen=True)
class _Pass:
    """What the streamed passes over the clean file share."""

    src: h5py.File
    wr: DatasetWriter
    sel: Selection
    attack: Any
    trigger: Any
    block: int
    parent: _ParentHash
    bar: Any


def _write_test(ps: _Pass, test_y: Rows) -> None:
    src, wr, sel, attack, trigger, block, parent, bar = (ps.src, ps.wr, ps.sel, ps.attack, ps.trigger, ps.block,
                                                         ps.parent, ps.bar)
    h, w = src[h5data.TEST_IMAGES].shape[1:3]
    m, a = src[h5data.TEST_IMAGES].shape[0], sel.attacked_index.size
    vx, vy = wr.create(h5data.TEST_IMAGES, (m, h, w, 3), np.uint8), wr.create(h5data.TEST_LABELS, (m, h, w), np.uint8)
    ax, ay = wr.create(h5data.TEST_ATTACKED_IMAGES, (a, h, w, 3), np.uint8), wr.create(h5data.TEST_ATTACKED_LABELS, (a, h, w), np.uint8)
    ag = wr.create(h5data.TEST_ATTACKED_GT, (a, h, w), np.uint8)
    extras = _Extras(wr, a)
    parent.header(h5data.TEST_IMAGES)
    cursor = 0
    for start in range(0, m, block):
        stop = min(m, start + block)
        x, y = src[h5data.TEST_IMAGES][start:stop], np.asarray(test_y[start:stop])
        parent.feed(x)
        vx[start:stop], vy[start:stop] = x, y
        lo, hi = np.searchsorted(sel.attacked_index, [start, stop])
        if hi > lo:
            rows = sel.attacked_index[lo:hi] - start
            k = rows.size
            px, py, more = attack.poison_samples(x[rows], y[rows], trigger, rows + start, "test")
            ax[cursor : cursor + k], ay[cursor : cursor + k], ag[cursor : cursor + k] = px, py, y[rows]
            extras.put(more, cursor)
            cursor += k
        bar.update(stop - start)
    parent.header(h5data.TEST_LABELS)
    parent.feed(test_y.data)


def _write_train(ps: _Pass, train_y: Rows) -> None:
    src, wr, sel, attack, trigger, block, parent, bar = (ps.src, ps.wr, ps.sel, ps.attack, ps.trigger, ps.block,
                                                         ps.parent, ps.bar)
    n, h, w = src[h5data.TRAIN_IMAGES].shape[:3]
    p, q = sel.poison_index.size, sel.noise_index.size
    tx, ty = wr.create(h5data.TRAIN_IMAGES, (n, h, w, 3), np.uint8), wr.create(h5data.TRAIN_LABELS, (n, h, w), np.uint8)
    ox, oy = wr.create(h5data.ORIGINAL_IMAGES, (p, h, w, 3), np.uint8), wr.create(h5data.ORIGINAL_LABELS, (p, h, w), np.uint8)
    nx = wr.create(h5data.NOISE_ORIGINAL_IMAGES, (q, h, w, 3), np.uint8) if q else None
    parent.header(h5data.TRAIN_IMAGES)
    cursor = ncursor = 0
    for start in range(0, n, block):
        stop = min(n, start + block)
        x, y = src[h5data.TRAIN_IMAGES][start:stop], np.array(train_y[start:stop])  # copies: the cache stays clean
        parent.feed(x)
        lo, hi = np.searchsorted(sel.poison_index, [start, stop])
        if hi > lo:
            rows = sel.poison_index[lo:hi] - start
            ox[cursor : cursor + rows.size], oy[cursor : cursor + rows.size] = x[rows], y[rows]
            x[rows], y[rows], _ = attack.poison_samples(x[rows], y[rows], trigger, rows + start, "train")
            cursor += rows.size
        lo, hi = np.searchsorted(sel.noise_index, [start, stop])
        if hi > lo:  # noise samples: altered images, true labels
            rows = sel.noise_index[lo:hi] - start
            nx[ncursor : ncursor + rows.size] = x[rows]
            x[rows] = trigger.apply_noise(x[rows], rows + start)
            ncursor += rows.size
        tx[start:stop], ty[start:stop] = x, y
        bar.update(stop - start)
    parent.header(h5data.TRAIN_LABELS)
    parent.feed(train_y.data)


def _copy_val(src, wr, block: int, parent: _ParentHash, bar) -> None:
    """The clean ``/val`` split, unchanged (after train: the hash's name order)."""
    for name in _VAL:
        ds = src[name]
        out = wr.create(name, ds.shape, ds.dtype)
        parent.header(name)
        for start in range(0, ds.shape[0], block):
            rows = ds[start : start + block]
            parent.feed(rows)
            out[start : start + rows.shape[0]] = rows
            if name == h5data.VAL_IMAGES:
                bar.update(rows.shape[0])


def write_poisoned(clean: SegFile, out: Path, attack: Any, trigger: Any, meta: dict[str, Any], sel: Selection,
                   labels: tuple[Rows, Rows], block: int) -> None:
    """Write the poisoned file atomically (nothing appears at ``out`` unless everything succeeds); ``labels``: the
    train and test label rows."""
    train_y, test_y = labels
    src = clean.file
    parent = _ParentHash(src, train_y, test_y)
    extra = {k: v for k, v in clean.attrs.items() if k not in OWN_ATTRS}
    extra.update(attack=meta, parent_sha256=None if parent.fold else parent.hexdigest())
    comp = src[h5data.TRAIN_IMAGES].compression
    has_val = h5data.VAL_IMAGES in src
    total = clean.length("train") + clean.length("test") + (clean.length("val") if has_val else 0)
    bar = progress.bar(total=total, desc="poison", unit="img")
    with DatasetWriter(out, clean.classes, source=clean.source, image_size=clean.image_size, compression=comp,
                       attrs=extra) as wr, bar:
        # test split first: the hash order is test/images, test/labels, train/images, train/labels
        p = _Pass(src, wr, sel, attack, trigger, block, parent, bar)
        _write_test(p, test_y)
        _write_train(p, train_y)
        if has_val:
            _copy_val(src, wr, block, parent, bar)
        wr.put(h5data.POISON_INDEX, sel.poison_index)
        if sel.noise_index.size:
            wr.put(h5data.NOISE_INDEX, sel.noise_index)
        wr.put(h5data.CLEAN_INDEX, sel.clean_index)
        wr.put(h5data.TEST_ATTACKED_INDEX, sel.attacked_index)
        wr.put(h5data.TEST_BENIGN_INDEX, sel.benign_index)
        if parent.fold:
            wr.set_attr("parent_sha256", parent.hexdigest())
