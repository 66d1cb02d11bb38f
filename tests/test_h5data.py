"""The HDF5 dataset format: round trip, content hash, validation (exit 2), SegDataset in a DataLoader."""

from __future__ import annotations

import hashlib
import json

import h5py
import numpy as np
import pytest
import torch

from testbed.data import h5data
from testbed.data.h5dataset import SegDataset
from testbed.cli import main
from testbed.core.errors import UserError

CLASSES = ["wall", "sky", "person"]


def _arrays(seed: int = 0, n: int = 12, m: int = 5, h: int = 8, w: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lab = lambda *s: rng.choice(np.array([0, 1, 2, 255], np.uint8), s)  # noqa: E731
    return {
        "train/images": rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8),
        "train/labels": lab(n, h, w),
        "test/images": rng.integers(0, 256, (m, h, w, 3), dtype=np.uint8),
        "test/labels": lab(m, h, w),
    }


def _write_raw(path, arrays, attrs, chunks=True, compression=None, order=None):
    """Write a file with h5py directly (not through h5data): another layout of the same content."""
    with h5py.File(path, "w") as f:
        for name in order or arrays:
            a = arrays[name]
            f.create_dataset(name, data=a, chunks=(min(4, a.shape[0]),) + a.shape[1:] if chunks else None,
                             compression=compression)
        for k, v in attrs.items():
            f.attrs[k] = v


def _valid_attrs(**over):
    attrs = {"format": "testbed-seg", "schema_version": 1, "classes": json.dumps(CLASSES), "ignore_index": 255,
             "source": json.dumps({"generator": "test"}), "image_size": [8, 6]}
    attrs.update(over)
    return attrs


# -- round trip -------------------------------------------------------------------------------------
def test_round_trip_arrays_and_attrs(tmp_path):
    arrays = _arrays()
    arrays["train/poison_index"] = np.array([3, 1], np.int64)
    extra = {"attack": {"name": "fgba", "rate": 0.1, "params": {"map": [[0, 1]]}}, "parent_sha256": "ab" * 32, "note": 7}
    path = h5data.write_dataset(tmp_path / "d.h5", arrays, CLASSES, source={"generator": "test", "n": 12}, attrs=extra)
    with h5data.open_dataset(path) as f:
        assert f.classes == CLASSES and f.num_classes == 3
        assert f.image_size == (8, 6)
        assert f.source == {"generator": "test", "n": 12}
        assert f.attack == extra["attack"] and f.is_poisoned
        assert f.attrs["parent_sha256"] == "ab" * 32 and f.attrs["note"] == 7
        assert f.attrs["format"] == "testbed-seg" and f.attrs["schema_version"] == 1 and f.ignore_index == 255
        for name, a in arrays.items():
            got = f[name]
            assert got.dtype == a.dtype and np.array_equal(got, a), name
        assert f.length("train") == 12 and f.length("test") == 5
        assert f.file["train/images"].chunks == (1, 8, 6, 3)
        idx = [4, 0, 4, 11]
        assert np.array_equal(f.read("train/labels", idx), arrays["train/labels"][idx])
        assert f.class_id("person") == 2
        with pytest.raises(UserError, match="did you mean 'person'"):
            f.class_id("persn")
    # plain h5py sees the documented attributes
    with h5py.File(path, "r") as raw:
        assert json.loads(raw.attrs["classes"]) == CLASSES
        assert list(raw.attrs["image_size"]) == [8, 6]
        assert json.loads(raw.attrs["attack"])["rate"] == 0.1


def test_writer_streams_slices_and_is_atomic(tmp_path):
    arrays = _arrays(n=4, m=2)
    out = tmp_path / "w.h5"
    with h5data.DatasetWriter(out, CLASSES, source={"g": 1}, image_size=(8, 6)) as w:
        for split in ("train", "test"):
            x = w.create(f"{split}/images", arrays[f"{split}/images"].shape, np.uint8)
            y = w.create(f"{split}/labels", arrays[f"{split}/labels"].shape, np.uint8)
            for i in range(x.shape[0]):
                x[i], y[i] = arrays[f"{split}/images"][i], arrays[f"{split}/labels"][i]
        assert not out.exists()  # nothing under the final name until complete
    with h5data.open_dataset(out) as f:
        assert np.array_equal(f["train/images"], arrays["train/images"])
    with pytest.raises(RuntimeError):
        with h5data.DatasetWriter(tmp_path / "x.h5", CLASSES, source={}, image_size=(8, 6)) as w:
            w.put("train/images", arrays["train/images"])
            raise RuntimeError("crash mid-write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.h5"]


# -- content hash -----------------------------------------------------------------------------------
def _documented_hash(path) -> str:
    """The content hash exactly as docs/data-format.md defines it, computed without testbed code."""
    h = hashlib.sha256()
    with h5py.File(path, "r") as f:
        attrs = {}
        for k, v in f.attrs.items():
            v = v.decode() if isinstance(v, bytes) else v
            if isinstance(v, str):
                try:
                    v = json.loads(v)
                except ValueError:
                    pass
            elif isinstance(v, np.ndarray):
                v = v.tolist()
            elif isinstance(v, np.generic):
                v = v.item()
            attrs[k] = v
        h.update(json.dumps(attrs, sort_keys=True).encode())
        names = []
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        for n in sorted(names):
            d = f[n]
            h.update(f"\0{n}\0{d.dtype.str}\0{d.shape}\0".encode())
            h.update(np.ascontiguousarray(d[()]).tobytes())
    return h.hexdigest()


def test_content_hash_ignores_layout_and_sees_one_pixel(tmp_path):
    arrays = _arrays(seed=1)
    a = h5data.write_dataset(tmp_path / "a.h5", arrays, CLASSES, source={"generator": "test"})
    b = h5data.write_dataset(tmp_path / "b.h5", arrays, CLASSES, source={"generator": "test"}, compression="gzip")
    c = tmp_path / "c.h5"  # other chunking, lzf, other creation order, JSON with other key order/whitespace
    _write_raw(c, arrays, _valid_attrs(classes=json.dumps(CLASSES, indent=3), source='{ "generator" : "test" }'),
               compression="lzf", order=sorted(arrays, reverse=True))
    ha = h5data.content_hash(a)
    assert len(ha) == 64 and int(ha, 16) >= 0
    assert h5data.content_hash(b) == ha
    assert h5data.content_hash(c) == ha
    assert _documented_hash(a) == ha
    with h5data.open_dataset(b) as f:
        assert f.content_hash() == ha
    # one changed pixel (one channel, by one level) changes the hash
    changed = {k: v.copy() for k, v in arrays.items()}
    changed["test/images"][4, 7, 5, 2] ^= 1
    d = h5data.write_dataset(tmp_path / "d.h5", changed, CLASSES, source={"generator": "test"})
    assert h5data.content_hash(d) != ha
    # and so does one changed label or attribute
    changed = {k: v.copy() for k, v in arrays.items()}
    changed["train/labels"][0, 0, 0] = (int(changed["train/labels"][0, 0, 0]) + 1) % 3
    assert h5data.content_hash(h5data.write_dataset(tmp_path / "e.h5", changed, CLASSES, source={"generator": "test"})) != ha
    assert h5data.content_hash(h5data.write_dataset(tmp_path / "f.h5", arrays, CLASSES, source={"generator": "x"})) != ha


# -- validation: every problem is exit 2 with one line --------------------------------------------
def _bad_files(tmp_path):
    arrays = _arrays()
    good = h5data.write_dataset(tmp_path / "good.h5", arrays, CLASSES, source={"generator": "test"})
    out = {"missing path": (tmp_path / "nope.h5", "no such file")}
    p = tmp_path / "text.h5"
    p.write_text("this is not HDF5\n" * 100)
    out["non-HDF5 file"] = (p, "not an HDF5 file")
    p = tmp_path / "trunc.h5"
    p.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    out["truncated file"] = (p, "corrupt or truncated")
    p = tmp_path / "foreign.h5"
    with h5py.File(p, "w") as f:
        f["data"] = np.zeros(3)
        f.attrs["format"] = "something-else"
    out["HDF5 of another format"] = (p, "not a testbed dataset")
    p = tmp_path / "v99.h5"
    _write_raw(p, arrays, _valid_attrs(schema_version=99))
    out["schema_version 99"] = (p, "schema_version 99")
    p = tmp_path / "range.h5"
    bad = {k: v.copy() for k, v in arrays.items()}
    bad["test/labels"][2, 1, 1] = 3  # 3 classes: ids 0..2 and 255 only
    _write_raw(p, bad, _valid_attrs())
    out["label out of range"] = (p, r"test/labels\[2\] holds label 3")
    p = tmp_path / "palette.h5"  # 3 classes but 2 colours
    _write_raw(p, arrays, _valid_attrs(palette=json.dumps([[0, 0, 0], [1, 2, 3]])))
    out["palette of the wrong length"] = (p, "palette must list one \\[r, g, b\\] \\(0..255\\) per class \\(3\\)")
    p = tmp_path / "colour.h5"
    _write_raw(p, arrays, _valid_attrs(palette=json.dumps([[0, 0, 0], [1, 2, 3], [4, 5, 256]])))
    out["palette value out of range"] = (p, "palette must list")
    return out


def test_validation_failures_exit_2_via_cli(tmp_path, capsys):
    cases = _bad_files(tmp_path)
    for what, (path, message) in cases.items():
        with pytest.raises(UserError, match=message):
            h5data.open_dataset(path)
        capsys.readouterr()
        assert main(["data", "info", str(path)]) == 2, what
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert err.startswith("testbed: error: ") and "\n" not in err, (what, err)
        assert "Traceback" not in captured.err and captured.out == "", what
    assert main(["data", "info", str(tmp_path / "good.h5")]) == 0


# -- SegDataset ---------------------------------------------------------------------------------
def test_format_module_stays_torch_free_and_old_segdataset_name_works():
    """h5data never imports h5dataset (one direction; no torch for `data info`); the old documented names
    ``testbed.data.h5data.SegDataset`` and ``testbed.h5data.SegDataset`` are still the class itself."""
    import subprocess
    import sys

    code = ("import sys, testbed.data.h5data as h; print('torch' in sys.modules, 'testbed.data.h5dataset' in sys.modules); "
            "from testbed.h5data import SegDataset as A; from testbed.data.h5dataset import SegDataset as B; print(A is B is h.SegDataset)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.split() == ["False", "False", "True"]
    with pytest.raises(AttributeError, match="no attribute 'NoSuchName'"):
        h5data.NoSuchName


@pytest.mark.parametrize("in_memory", [True, False])
def test_segdataset_dataloader_two_workers_in_order(tmp_path, in_memory):
    arrays = _arrays(seed=3, n=37)
    path = h5data.write_dataset(tmp_path / "d.h5", arrays, CLASSES, source={"generator": "test"})
    ds = SegDataset(path, "train", in_memory=in_memory)
    assert len(ds) == 37
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2, shuffle=False)
    xs, ys = zip(*loader)
    x, y = torch.cat(xs).numpy(), torch.cat(ys).numpy()
    assert x.dtype == np.uint8 and y.dtype == np.uint8
    assert np.array_equal(x, arrays["train/images"]) and np.array_equal(y, arrays["train/labels"])


def test_segdataset_getitems_unsorted_repeated_and_subset(tmp_path):
    arrays = _arrays(seed=4, n=20, m=6)
    path = h5data.write_dataset(tmp_path / "d.h5", arrays, CLASSES, source={"generator": "test"})
    for in_memory in (True, False):
        ds = SegDataset(path, "test", in_memory=in_memory)
        items = [5, 0, 3, 3, 5, 1]
        got = ds.__getitems__(items)
        assert len(got) == len(items)
        for (x, y), i in zip(got, items):
            assert np.array_equal(x.numpy(), arrays["test/images"][i]) and np.array_equal(y.numpy(), arrays["test/labels"][i])
        x, y = ds[4]
        assert np.array_equal(x.numpy(), arrays["test/images"][4])
        sub = SegDataset(path, "train", indices=[19, 2, 7], in_memory=in_memory)
        assert len(sub) == 3
        got = sub.__getitems__([2, 0, 0])
        for (x, y), i in zip(got, [7, 19, 19]):
            assert np.array_equal(x.numpy(), arrays["train/images"][i]) and np.array_equal(y.numpy(), arrays["train/labels"][i])
    with pytest.raises(UserError):
        SegDataset(path, "train", indices=[20])
    with pytest.raises(UserError):
        SegDataset(path, "validation")
