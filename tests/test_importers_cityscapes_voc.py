"""Cityscapes (gtFine) and PASCAL VOC 2012 importers on fixtures with the real layouts (folder and file names,
label encodings, split lists), written in the test: never real images."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from testbed.cli import main
from testbed.core.errors import UserError
from testbed.data import h5data
from testbed.data.importers import ImportOptions, Resize, import_cityscapes, import_voc

H, W, BLOCK = 16, 32, 4  # Cityscapes is 1024×2048 (1:2)
# cityscapesscripts/helpers/labels.py: label id → train id for the 19 evaluated classes; every other id is ignored
TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14,
            28: 15, 31: 16, 32: 17, 33: 18}
CITIES = {"train": {"bochum": ["000000_000313"], "aachen": ["000000_000019", "000001_000019"]},
          "val": {"lindau": ["000000_000019"], "frankfurt": ["000000_000294"]}}


def _blocks(rng, high: int, h: int = H, w: int = W) -> np.ndarray:
    return np.kron(rng.integers(0, high + 1, (h // BLOCK, w // BLOCK)), np.ones((BLOCK, BLOCK))).astype(np.uint8)


def _train_ids(raw: np.ndarray) -> np.ndarray:
    out = np.full(raw.shape, 255, np.uint8)
    for lid, tid in TRAIN_ID.items():
        out[raw == lid] = tid
    return out


@pytest.fixture
def cityscapes(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "cityscapes"
    raw = {}
    for split, cities in CITIES.items():
        for city, frames in cities.items():
            for d in ("leftImg8bit", "gtFine"):
                (root / d / split / city).mkdir(parents=True)
            for frame in frames:
                stem = f"{city}_{frame}"
                rgb, ids = rng.integers(0, 256, (H, W, 3), dtype=np.uint8), _blocks(rng, 33)
                Image.fromarray(rgb).save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
                gt = root / "gtFine" / split / city
                Image.fromarray(ids, mode="L").save(gt / f"{stem}_gtFine_labelIds.png")
                # the other gtFine files of the real layout, which the importer must not take for labels
                Image.fromarray(rgb).save(gt / f"{stem}_gtFine_color.png")
                Image.fromarray(ids.astype(np.uint16) * 1000).save(gt / f"{stem}_gtFine_instanceIds.png")
                (gt / f"{stem}_gtFine_polygons.json").write_text("{}")
                raw[(split, city, frame)] = (rgb, ids)
    return root, raw


def _order(split: str) -> list[tuple[str, str]]:
    return sorted((city, f) for city, frames in CITIES[split].items() for f in frames)


def test_cityscapes_train_ids_val_as_test_palette(cityscapes, tmp_path):
    root, raw = cityscapes
    out = import_cityscapes(root, tmp_path / "cs.h5", ImportOptions(workers=2))
    with h5data.open_dataset(out) as f:
        assert f.num_classes == 19 and f.classes[0] == "road" and f.classes[18] == "bicycle"
        assert h5data.VAL_IMAGES not in f
        for split, group in (("train", "train"), ("val", "test")):
            assert f.length(group) == len(_order(split))
            for i, (city, frame) in enumerate(_order(split)):  # city, then frame order
                rgb, ids = raw[(split, city, frame)]
                assert np.array_equal(f[f"{group}/images"][i], rgb)
                assert np.array_equal(f[f"{group}/labels"][i], _train_ids(ids)), (split, city, frame)
        assert "val" in f.source["test_split"] and len(f.palette) == 19 and f.palette[0] == [128, 64, 128]
    held = import_cityscapes(root, tmp_path / "held.h5", ImportOptions(workers=1), val_fraction=0.34, seed=2)
    with h5data.open_dataset(held) as f:
        assert (f.length("train"), f.length("val"), f.length("test")) == (2, 1, 2)
        train_val = {f["train/images"][i].tobytes() for i in range(2)} | {f["val/images"][0].tobytes()}
        assert train_val == {raw[("train", c, fr)][0].tobytes() for c, fr in _order("train")}


def test_cityscapes_errors(cityscapes, tmp_path):
    root, _ = cityscapes
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(UserError, match="--val-fraction must be between 0 and 1"):
        import_cityscapes(root, out_dir / "x.h5", ImportOptions(workers=1), val_fraction=1.5)
    bad = np.zeros((H, W), np.uint8)
    bad[2, 2] = 34
    Image.fromarray(bad, mode="L").save(root / "gtFine" / "val" / "lindau" / "lindau_000000_000019_gtFine_labelIds.png")
    with pytest.raises(UserError, match=r"lindau_000000_000019_gtFine_labelIds\.png holds value 34 but valid values are 0\.\.33"):
        import_cityscapes(root, out_dir / "x.h5", ImportOptions(workers=1))
    (root / "gtFine" / "train" / "bochum" / "bochum_000000_000313_gtFine_labelIds.png").unlink()
    with pytest.raises(UserError, match=r"bochum_000000_000313_leftImg8bit\.png has no annotation .*bochum_000000_000313_gtFine_labelIds\.png"):
        import_cityscapes(root, out_dir / "x.h5", ImportOptions(workers=1))
    assert list(out_dir.iterdir()) == []


# -- VOC --------------------------------------------------------------------------------------------
VOC_SETS = {"train": ["2007_000032", "2007_000039", "2008_000002"], "val": ["2007_000033", "2007_000042"]}


def _voc_palette() -> list[int]:
    """The VOC devkit's colour map (VOCcode/VOClabelcolormap.m), written out independently of the testbed."""
    cmap = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r, g, b = r | ((c >> 0) & 1) << (7 - j), g | ((c >> 1) & 1) << (7 - j), b | ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap += [r, g, b]
    return cmap


@pytest.fixture
def voc(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "SegmentationObject", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    labels = {}
    for split, stems in VOC_SETS.items():
        for stem in stems:
            Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{stem}.jpg")
            mask = _blocks(rng, 20, 24, 32)
            mask[4, :] = 255  # an object boundary
            png = Image.fromarray(mask, mode="P")
            png.putpalette(_voc_palette())
            png.save(root / "SegmentationClass" / f"{stem}.png")
            labels[stem] = mask
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(stems) + "\n")
    (root / "ImageSets" / "Segmentation" / "trainval.txt").write_text("\n".join(sum(VOC_SETS.values(), [])) + "\n")
    Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(root / "JPEGImages" / "2009_000001.jpg")  # unlisted
    return tmp_path / "VOCdevkit", labels


def test_voc_lists_palette_masks_boundary_ignored(voc, tmp_path):
    devkit, labels = voc
    out = import_voc(devkit, tmp_path / "v.h5", ImportOptions(workers=2))  # VOCdevkit finds VOC2012 inside
    with h5data.open_dataset(out) as f:
        assert f.num_classes == 21 and f.classes[15] == "person" and f.classes[0] == "background"
        for split, group in (("train", "train"), ("val", "test")):
            assert f.length(group) == len(VOC_SETS[split])
            for i, stem in enumerate(VOC_SETS[split]):
                assert np.array_equal(f[f"{group}/labels"][i], labels[stem]), stem  # palette indices, 255 kept
                decoded = np.asarray(Image.open(devkit / "VOC2012" / "JPEGImages" / f"{stem}.jpg").convert("RGB"))
                assert np.array_equal(f[f"{group}/images"][i], decoded)
        assert f.palette == [_voc_palette()[3 * i : 3 * i + 3] for i in range(21)]
        assert f.palette[15] == [192, 128, 128] and "val" in f.source["test_split"]


def test_voc_sizes_and_errors(voc, tmp_path):
    devkit, _ = voc
    root = devkit / "VOC2012"
    Image.fromarray(np.zeros((20, 36, 3), np.uint8)).save(root / "JPEGImages" / "2008_000002.jpg")
    Image.fromarray(np.zeros((20, 36), np.uint8), mode="P").save(root / "SegmentationClass" / "2008_000002.png")
    with pytest.raises(UserError, match=r"2008_000002\.jpg is 36x20, other images are 32x24; pass --size"):
        import_voc(root, tmp_path / "x.h5", ImportOptions(workers=1))
    square = ImportOptions(resize=Resize(short_side=12, crop=True), workers=1)
    out = import_voc(root, tmp_path / "c.h5", square)
    with h5data.open_dataset(out) as f:
        assert f.image_size == (12, 12)
    bad = np.zeros((24, 32), np.uint8)
    bad[1, 1] = 21
    Image.fromarray(bad, mode="L").save(root / "SegmentationClass" / "2007_000042.png")
    with pytest.raises(UserError, match=r"2007_000042\.png holds value 21 but valid values are 0\.\.20 and 255"):
        import_voc(root, tmp_path / "x.h5", square)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000033\n2010_999999\n")
    with pytest.raises(UserError, match=r"val\.txt lists 2010_999999, but .*2010_999999\.jpg does not exist"):
        import_voc(root, tmp_path / "x.h5", square)
    assert not (tmp_path / "x.h5").exists()


def test_cli_cityscapes_and_voc(cityscapes, voc, tmp_path, capsys):
    root, _ = cityscapes
    out = tmp_path / "cs.h5"
    assert main(["-q", "data", "import", "cityscapes", str(root), "--out", str(out), "--size", "8", "16",
                 "--limit", "1", "--workers", "1"]) == 0
    assert "1 train + 1 test" in capsys.readouterr().out
    with h5data.open_dataset(out) as f:
        assert f.image_size == (8, 16) and json.loads(f.file.attrs["source"])["limit"] == 1
    assert main(["data", "info", str(out), "--no-stats"]) == 0
    assert "test split      val (Cityscapes' test labels are not public)" in capsys.readouterr().out
    devkit, _ = voc
    bad = tmp_path / "v.h5"
    assert main(["-q", "data", "import", "voc", str(devkit), "--out", str(bad), "--short-side", "4"]) == 2
    err = capsys.readouterr().err
    assert "--short-side must be at least 8" in err and len(err.strip().splitlines()) == 1 and not bad.exists()
