"""`testbed data ...` through testbed.cli.main: outputs, --json keys, and exit 2 with no file left."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from testbed.data import h5data
from testbed.cli import main
from testbed.data.show import sample_panels
from testbed.data.synth import SYNTH_CLASSES


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "s.h5"
    assert main(["-q", "data", "synth", "--out", str(out), "--n-train", "40", "--n-test", "8", "--size", "32", "--seed", "3"]) == 0
    return out


@pytest.fixture(scope="module")
def poisoned(small, tmp_path_factory) -> Path:
    """A poisoned file written by hand to docs/data-format.md (independent of attacks/): 4 of 40 training samples."""
    with h5data.open_dataset(small) as f:
        arrays = {k: f[k] for k in ("train/images", "train/labels", "test/images", "test/labels")}
        parent = f.content_hash()
    idx = np.array([5, 1, 30, 17], np.int64)
    arrays["train/poison_index"] = idx
    arrays["train/original_images"] = arrays["train/images"][idx].copy()
    arrays["train/original_labels"] = arrays["train/labels"][idx].copy()
    x, y = arrays["train/images"].copy(), arrays["train/labels"].copy()
    x[idx, :2] = 0  # a black line trigger
    y[idx] = 0  # everything → wall
    arrays["train/images"], arrays["train/labels"] = x, y
    arrays["defense/clean_index"] = np.array([0, 2], np.int64)
    t = np.array([3, 6], np.int64)
    ti = arrays["test/images"][t].copy()
    ti[:, :2] = 0
    arrays["test_attacked/images"] = ti
    arrays["test_attacked/labels"] = np.zeros_like(arrays["test/labels"][t])
    arrays["test_attacked/gt"] = arrays["test/labels"][t].copy()
    arrays["test_attacked/index"] = t
    arrays["test_benign/index"] = np.arange(8, dtype=np.int64)
    attack = {"name": "fgba", "trigger": "line", "seed": 0, "requested_rate": 0.1, "achieved_rate": 0.1}
    out = tmp_path_factory.mktemp("cli") / "p.h5"
    return h5data.write_dataset(out, arrays, SYNTH_CLASSES, source={"generator": "hand"},
                                attrs={"attack": attack, "parent_sha256": parent})


def test_synth_writes_file(small, capsys):
    with h5data.open_dataset(small) as f:
        assert f.length("train") == 40 and f.length("test") == 8 and f.image_size == (32, 32)
        assert f.source["seed"] == 3


def test_info_text_and_json(small, capsys):
    assert main(["data", "info", str(small)]) == 0
    text = capsys.readouterr().out
    assert "content sha256" in text and h5data.content_hash(small) in text
    assert "wall" in text and "palm" in text and "co-occurring" in text
    assert main(["data", "info", str(small), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    for key in ("path", "format", "schema_version", "content_sha256", "classes", "num_classes", "ignore_index",
                "image_size", "source", "splits", "arrays", "attack", "poison", "stats"):
        assert key in info, key
    assert info["classes"] == SYNTH_CLASSES and info["splits"] == {"train": 40, "test": 8}
    assert info["content_sha256"] == h5data.content_hash(small)
    assert info["attack"] is None and info["poison"] is None
    assert info["arrays"]["train/images"] == {"shape": [40, 32, 32, 3], "dtype": "uint8", "chunks": [1, 32, 32, 3], "compression": None}
    # statistics against values computed here from the labels
    with h5py.File(small, "r") as f:
        y = f["train/labels"][()]
    st = info["stats"]["train"]
    k = len(SYNTH_CLASSES)
    assert st["num_images"] == 40
    for c, name in enumerate(SYNTH_CLASSES):
        assert st["pixel_share"][name] == pytest.approx((y == c).mean())
        assert st["image_share"][name] == pytest.approx((y == c).any(axis=(1, 2)).mean())
    assert st["ignore_share"] == pytest.approx((y == 255).mean())
    pres = np.stack([(y == c).any(axis=(1, 2)) for c in range(k)], 1)
    co = np.array(st["cooccurrence"]["share"])
    assert co.shape == (k, k)
    assert np.allclose(co, (pres[:, :, None] & pres[:, None, :]).mean(0))
    top = st["top_pairs"][0]
    i, j = SYNTH_CLASSES.index(top["classes"][0]), SYNTH_CLASSES.index(top["classes"][1])
    assert top["share"] == pytest.approx(np.triu(co, 1).max()) and co[i, j] == pytest.approx(top["share"])


def test_info_poisoned(poisoned, capsys):
    assert main(["data", "info", str(poisoned), "--json", "--no-stats"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["attack"]["name"] == "fgba" and info["parent_sha256"] is not None
    p = info["poison"]
    assert p["poisoned_samples"] == 4 and p["train_samples"] == 40 and p["achieved_rate"] == pytest.approx(0.1)
    assert p["requested_rate"] == 0.1 and p["clean_subset"] == 2 and p["test_attacked"] == 2 and p["test_benign"] == 8
    assert info["splits"] == {"train": 40, "test": 8, "test_attacked": 2}
    assert info["stats"] is None
    assert main(["data", "info", str(poisoned)]) == 0
    assert "4/40 training samples = 10.0% achieved" in capsys.readouterr().out


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def test_show_plain_poisoned_and_attacked(small, poisoned, tmp_path, capsys):
    out = tmp_path / "a.png"
    assert main(["data", "show", str(small), "--split", "test", "--index", "7", "--out", str(out)]) == 0
    assert _png(out).shape[0] > 100
    sample = sample_panels(small, "test", 7)
    panels, classes = sample.panels, sample.classes
    with h5py.File(small, "r") as f:
        assert np.array_equal(panels[0][1], f["test/images"][7]) and np.array_equal(panels[1][1], f["test/labels"][7])
    # a poisoned training index: benign image, poisoned image, benign label, target label (Figure 1/2)
    panels = sample_panels(poisoned, "train", 30).panels
    assert [p[0] for p in panels] == ["benign image", "poisoned image", "benign label", "target label"]
    with h5py.File(poisoned, "r") as f:
        k = list(f["train/poison_index"][()]).index(30)
        assert np.array_equal(panels[0][1], f["train/original_images"][k])
        assert np.array_equal(panels[1][1], f["train/images"][30])
        assert np.array_equal(panels[2][1], f["train/original_labels"][k])
        assert np.array_equal(panels[3][1], f["train/labels"][30])
        assert not np.array_equal(panels[0][1], panels[1][1])
    assert [p[0] for p in sample_panels(poisoned, "train", 0).panels] == ["image (not poisoned)", "label"]
    panels = sample_panels(poisoned, "test_attacked", 1).panels
    assert [p[0] for p in panels] == ["attacked image (test 6)", "ground truth", "target label"]
    four, three = tmp_path / "p.png", tmp_path / "t.png"
    assert main(["data", "show", str(poisoned), "--split", "train", "--index", "30", "--out", str(four)]) == 0
    assert main(["data", "show", str(poisoned), "--split", "test_attacked", "--index", "1", "--out", str(three)]) == 0
    assert _png(four).shape[1] > _png(three).shape[1] > _png(out).shape[1]  # 4 panels wider than 3 than 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "p.png", "t.png"]


def test_import_commands(tmp_path, capsys):
    root = tmp_path / "ADE"
    rng = np.random.default_rng(0)
    for split in ("training", "validation"):
        for i in range(2):
            (root / "images" / split).mkdir(parents=True, exist_ok=True)
            (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(root / "images" / split / f"{i}.jpg")
            Image.fromarray(rng.integers(0, 151, (20, 28), dtype=np.uint8), mode="L").save(root / "annotations" / split / f"{i}.png")
    out = tmp_path / "ade.h5"
    assert main(["-q", "data", "import", "ade20k", str(root), "--out", str(out), "--size", "16", "--workers", "2"]) == 0
    with h5data.open_dataset(out) as f:
        assert f.num_classes == 150 and f.length("train") == 2 and f.image_size == (16, 16)
    assert main(["-q", "data", "import", "ade20k", str(root), "--out", str(out), "--size", "16"]) == 2  # exists, no --force
    assert main(["-q", "data", "import", "ade20k", str(root), "--out", str(out), "--size", "16", "--force"]) == 0
    # folder import with the same files (ADE masks are ids too) and a 151-name classes file
    fold = tmp_path / "fold"
    (fold / "images").mkdir(parents=True)
    (fold / "masks").mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(fold / "images" / f"{i}.png")
        Image.fromarray(rng.integers(0, 3, (12, 12), dtype=np.uint8), mode="L").save(fold / "masks" / f"{i}.png")
    names = tmp_path / "names.txt"
    names.write_text("a\nb\nc\n")
    out2 = tmp_path / "fold.h5"
    assert main(["-q", "data", "import", "folder", str(fold), "--classes", str(names), "--out", str(out2), "--test-fraction", "0.25"]) == 0
    with h5data.open_dataset(out2) as f:
        assert f.classes == ["a", "b", "c"] and f.length("train") == 3 and f.length("test") == 1


# -- every bad input: exit 2, one line, no file left --------------------------------------------
def _bad_inputs(tmp_path: Path, small: Path) -> dict[str, tuple[list[str], Path]]:
    d = tmp_path / "bad"
    d.mkdir()
    out_png, out_h5 = d / "o.png", d / "o.h5"
    text = d / "text.h5"
    text.write_text("not hdf5 at all\n")
    trunc = d / "trunc.h5"
    trunc.write_bytes(small.read_bytes()[:5000])
    foreign = d / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.arange(4)
    v99 = d / "v99.h5"
    v99.write_bytes(small.read_bytes())
    with h5py.File(v99, "a") as f:
        f.attrs["schema_version"] = 99
    # ADE20K variants
    def ade(name: str, mask_shape=(16, 16), value=3, annotations=True) -> Path:
        root = d / name
        for split in ("training", "validation"):
            (root / "images" / split).mkdir(parents=True)
            Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "images" / split / "a.jpg")
            if annotations:
                (root / "annotations" / split).mkdir(parents=True)
                m = np.full(mask_shape, value, np.uint8)
                Image.fromarray(m, mode="L").save(root / "annotations" / split / "a.png")
        return root

    imp = ["-q", "data", "import", "ade20k"]
    cases = {
        "info: missing path": (["data", "info", str(d / "missing.h5")], None),
        "info: non-HDF5 file": (["data", "info", str(text)], None),
        "info: truncated file": (["data", "info", str(trunc)], None),
        "info: foreign HDF5": (["data", "info", str(foreign)], None),
        "info: schema 99": (["data", "info", str(v99)], None),
        "show: missing path": (["data", "show", str(d / "missing.h5"), "--out", str(out_png)], out_png),
        "show: non-HDF5": (["data", "show", str(text), "--out", str(out_png)], out_png),
        "show: truncated": (["data", "show", str(trunc), "--out", str(out_png)], out_png),
        "show: foreign HDF5": (["data", "show", str(foreign), "--out", str(out_png)], out_png),
        "show: schema 99": (["data", "show", str(v99), "--out", str(out_png)], out_png),
        "show: unknown split": (["data", "show", str(small), "--split", "valid", "--out", str(out_png)], out_png),
        "show: index out of range": (["data", "show", str(small), "--index", "40", "--out", str(out_png)], out_png),
        "show: negative index": (["data", "show", str(small), "--index", "-1", "--out", str(out_png)], out_png),
        "show: --out in a missing directory": (["data", "show", str(small), "--out", str(d / "no" / "x.png")], d / "no"),
        "import: ADE20K without annotations": (imp + [str(ade("noann", annotations=False)), "--out", str(out_h5)], out_h5),
        "import: image/mask size mismatch": (imp + [str(ade("mismatch", mask_shape=(16, 15))), "--out", str(out_h5)], out_h5),
        "import: mask value > 150": (imp + [str(ade("v151", value=151)), "--out", str(out_h5)], out_h5),
        "import: missing root": (imp + [str(d / "nowhere"), "--out", str(out_h5)], out_h5),
        "import: --out in a missing directory": (imp + [str(ade("ok")), "--out", str(d / "no" / "x.h5")], d / "no"),
        "synth: zero train": (["data", "synth", "--out", str(out_h5), "--n-train", "0"], out_h5),
        "synth: negative test": (["data", "synth", "--out", str(out_h5), "--n-test", "-3"], out_h5),
        "synth: zero size": (["data", "synth", "--out", str(out_h5), "--size", "0"], out_h5),
        "synth: --out in a missing directory": (["data", "synth", "--out", str(d / "no" / "x.h5"), "--n-train", "2"], d / "no"),
    }
    return cases


def test_bad_inputs_exit_2_no_file_left(small, tmp_path, capsys):
    cases = _bad_inputs(tmp_path, small)
    bad_dir = tmp_path / "bad"
    before = sorted(p.name for p in bad_dir.iterdir())
    for what, (argv, must_not_exist) in cases.items():
        capsys.readouterr()
        assert main(argv) == 2, what
        err = capsys.readouterr().err.strip()
        assert err.startswith("testbed: error: ") and "\n" not in err and "Traceback" not in err, (what, err)
        if must_not_exist is not None:
            assert not must_not_exist.exists(), what
        # no temporary or partial file appears anywhere in the folder
        assert sorted(p.name for p in bad_dir.iterdir() if not p.is_dir() or p.name == "no") == [
            n for n in before if not (bad_dir / n).is_dir()
        ], what
