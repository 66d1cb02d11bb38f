"""Importers: ADE20K layout and images/+masks/ folders written here with real JPEG/PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from testbed.data import h5data
from testbed.core.errors import UserError
from testbed.data.importers import FolderLayout, ImportOptions, Resize, ade20k_classes, import_ade20k, import_folder


def _ade_mapping(raw: np.ndarray) -> np.ndarray:
    """docs/data-format.md (ADE20K import), written independently: 0 → 255, v → v−1."""
    out = raw.astype(np.int64) - 1
    out[raw == 0] = 255
    return out.astype(np.uint8)


def _save_pair(img_dir: Path, ann_dir: Path, stem: str, rgb: np.ndarray, mask: np.ndarray, ext=".jpg") -> None:
    img_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(img_dir / f"{stem}{ext}", quality=95)
    Image.fromarray(mask, mode="L").save(ann_dir / f"{stem}.png")


def _block_mask(rng, h: int, w: int, block: int, high: int) -> np.ndarray:
    """Constant block×block tiles, so nearest-neighbour resizing by whole factors is unambiguous."""
    small = rng.integers(0, high + 1, (h // block, w // block), dtype=np.uint8)
    return np.kron(small, np.ones((block, block), np.uint8))


@pytest.fixture
def ade_root(tmp_path):
    """ADEChallengeData2016 with 5 training and 2 validation images of varied sizes, masks 0..150."""
    rng = np.random.default_rng(0)
    root = tmp_path / "ADEChallengeData2016"
    raws = {}
    shapes = {"training": [(32, 32), (32, 64), (96, 48), (40, 32), (32, 32)], "validation": [(64, 32), (32, 32)]}
    for split, hw in shapes.items():
        for i, (h, w) in enumerate(hw):
            stem = f"ADE_{split[:5]}_{i:08d}"
            rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            mask = _block_mask(rng, h, w, 4, 150)
            mask[0, 0] = 150 if i == 0 else mask[0, 0]  # the largest valid raw value occurs
            _save_pair(root / "images" / split, root / "annotations" / split, stem, rgb, mask)
            raws[(split, i)] = mask
    return root, raws


def test_ade20k_classes_shipped_with_package():
    names = ade20k_classes()
    assert len(names) == 150 and len(set(names)) == 150
    expected = {0: "wall", 2: "sky", 6: "road", 9: "grass", 12: "person", 20: "car", 72: "palm", 149: "flag"}
    assert {i: names[i] for i in expected} == expected


def test_ade20k_label_mapping_resize_and_crop(ade_root, tmp_path):
    root, raws = ade_root
    out = import_ade20k(root, tmp_path / "ade.h5", size=32, workers=1)
    with h5data.open_dataset(out) as f:
        assert f.classes == ade20k_classes()
        assert f.image_size == (32, 32)
        assert f.length("train") == 5 and f.length("test") == 2
        assert f.source["importer"] == "ade20k" and f.source["size"] == 32
        y, x = f["train/labels"], f["train/images"]
        yt = f["test/labels"]
    assert x.shape == (5, 32, 32, 3) and y.shape == (5, 32, 32)
    # 32×32: no resize, every pixel is the mapped raw value
    assert np.array_equal(y[0], _ade_mapping(raws[("training", 0)]))
    assert y[0][0, 0] == 149  # raw 150 → flag
    assert (y[0] == 255).sum() == (raws[("training", 0)] == 0).sum()
    # 32 high × 64 wide: shorter side already 32 → centre crop of columns 16..47
    assert np.array_equal(y[1], _ade_mapping(raws[("training", 1)][:, 16:48]))
    # 96 high × 48 wide: scaled by 2/3 → 64×32, then rows 16..47; check on whole blocks via a 2× case instead:
    # 64 high × 32 wide validation image: no scaling, rows 16..47
    assert np.array_equal(yt[0], _ade_mapping(raws[("validation", 0)][16:48, :]))
    # the 96×48 image shrinks to 64×32: every label is a value present in the raw mask's centre band
    assert set(np.unique(y[2])) <= set(np.unique(_ade_mapping(raws[("training", 2)][24:72])))


def test_ade20k_downscale_nearest(tmp_path):
    """Shorter side 64 → 32 halves the image: 4×4 label blocks become exact 2×2 blocks."""
    rng = np.random.default_rng(1)
    root = tmp_path / "ADE"
    mask = _block_mask(rng, 64, 96, 4, 150)
    rgb = np.zeros((64, 96, 3), np.uint8)
    rgb[:, :48] = 200  # left half bright: bilinear keeps the edge roughly in place
    _save_pair(root / "images" / "training", root / "annotations" / "training", "a", rgb, mask)
    _save_pair(root / "images" / "validation", root / "annotations" / "validation", "b", rgb, mask)
    out = import_ade20k(root, tmp_path / "o.h5", size=32, workers=1)
    with h5data.open_dataset(out) as f:
        y, x = f["train/labels"][0], f["train/images"][0]
    half = _ade_mapping(mask[::4, ::4]).repeat(2, 0).repeat(2, 1)  # 32 × 48, then centre crop columns 8..39
    assert np.array_equal(y, half[:, 8:40])
    # image: columns < 16 (original < 48, minus crop 8 → 16) are bright, beyond 16 dark
    assert x[:, :14].mean() > 180 and x[:, 18:].mean() < 20


def test_multiworker_equals_single_worker(ade_root, tmp_path):
    root, _ = ade_root
    one = import_ade20k(root, tmp_path / "one.h5", size=24, workers=1)
    two = import_ade20k(root, tmp_path / "two.h5", size=24, workers=2)
    with h5data.open_dataset(one) as a, h5data.open_dataset(two) as b:
        for name in ("train/images", "train/labels", "test/images", "test/labels"):
            assert np.array_equal(a[name], b[name]), name
    assert h5data.content_hash(one) == h5data.content_hash(two)


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.suffix in (".h5", ".tmp") or ".tmp" in p.name)


def test_ade20k_errors(ade_root, tmp_path):
    root, _ = ade_root
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "x.h5"
    with pytest.raises(UserError, match="does not exist"):
        import_ade20k(tmp_path / "nowhere", out, size=32, workers=1)
    # mask value 151 (one past the last class)
    bad = _block_mask(np.random.default_rng(2), 32, 32, 4, 10)
    bad[5, 5] = 151
    Image.fromarray(bad, mode="L").save(root / "annotations" / "validation" / "ADE_valid_00000001.png")
    with pytest.raises(UserError, match="value 151"):
        import_ade20k(root, out, size=32, workers=2)
    assert _leftovers(out_dir) == []
    # image/mask size mismatch
    Image.fromarray(np.zeros((30, 32), np.uint8), mode="L").save(root / "annotations" / "validation" / "ADE_valid_00000001.png")
    with pytest.raises(UserError, match="must match"):
        import_ade20k(root, out, size=32, workers=1)
    assert _leftovers(out_dir) == []
    # image without mask
    (root / "annotations" / "validation" / "ADE_valid_00000001.png").unlink()
    with pytest.raises(UserError, match="has no mask"):
        import_ade20k(root, out, size=32, workers=1)
    # no annotations folder at all
    (root / "annotations").rename(tmp_path / "moved")
    with pytest.raises(UserError, match="no annotations/ folder"):
        import_ade20k(root, out, size=32, workers=1)
    assert _leftovers(out_dir) == []


def test_ade20k_zero_images(tmp_path):
    root = tmp_path / "ADE"
    for sub in ("images/training", "images/validation", "annotations/training", "annotations/validation"):
        (root / sub).mkdir(parents=True)
    with pytest.raises(UserError, match="no images"):
        import_ade20k(root, tmp_path / "x.h5", size=32, workers=1)
    assert not (tmp_path / "x.h5").exists()


# -- folder -----------------------------------------------------------------------------------------
def _folder(tmp_path, n=10, k=4, split_dirs=False, size=(24, 20)):
    rng = np.random.default_rng(5)
    root = tmp_path / "ds"
    masks = {}
    for i in range(n):
        sub = ("train" if i < n - 3 else "test") if split_dirs else ""
        mask = rng.integers(0, k, size, dtype=np.uint8)
        mask[0, :3] = 255
        rgb = rng.integers(0, 256, size + (3,), dtype=np.uint8)
        _save_pair(root / "images" / sub, root / "masks" / sub, f"img{i:02d}", rgb, mask, ext=".png")
        masks[f"img{i:02d}"] = (rgb, mask)
    classes = tmp_path / "names.txt"
    classes.write_text("\n".join(f"c{j}" for j in range(k)) + "\n")
    return root, classes, masks


def test_folder_seeded_split_exact_pixels(tmp_path):
    root, classes, pairs = _folder(tmp_path)
    out = import_folder(root, classes, tmp_path / "f.h5", ImportOptions(workers=1), FolderLayout(test_fraction=0.3, seed=1))
    with h5data.open_dataset(out) as f:
        assert f.classes == ["c0", "c1", "c2", "c3"]
        x = np.concatenate([f["train/images"], f["test/images"]])
        y = np.concatenate([f["train/labels"], f["test/labels"]])
        assert f.length("test") == 3 and f.length("train") == 7
        assert f.source["split"] == "seeded" and f.source["seed"] == 1
    # PNG is lossless: every stored pair is exactly one of the written pairs, each used once
    found = []
    for xi, yi in zip(x, y):
        match = [s for s, (rgb, mask) in pairs.items() if np.array_equal(rgb, xi) and np.array_equal(mask, yi)]
        assert len(match) == 1
        found += match
    assert sorted(found) == sorted(pairs)
    again = import_folder(root, classes, tmp_path / "g.h5", ImportOptions(workers=2), FolderLayout(test_fraction=0.3, seed=1))
    assert h5data.content_hash(again) == h5data.content_hash(out)
    other = import_folder(root, classes, tmp_path / "h.h5", ImportOptions(workers=1), FolderLayout(test_fraction=0.3, seed=2))
    with h5data.open_dataset(other) as a, h5data.open_dataset(out) as b:
        assert not np.array_equal(a["test/images"], b["test/images"])


def test_folder_split_dirs_and_resize(tmp_path):
    root, classes, pairs = _folder(tmp_path, split_dirs=True)
    out = import_folder(root, classes, tmp_path / "f.h5", ImportOptions(resize=Resize(short_side=16, crop=True), workers=1))
    with h5data.open_dataset(out) as f:
        assert f.length("train") == 7 and f.length("test") == 3 and f.image_size == (16, 16)
        assert f.source["split"] == "folders"
        assert set(np.unique(f["train/labels"])) <= {0, 1, 2, 3, 255}


def test_folder_errors(tmp_path):
    root, classes, _ = _folder(tmp_path, k=4)
    few = tmp_path / "few.txt"
    few.write_text("a\nb\nc\n")  # 3 classes but masks hold 3
    with pytest.raises(UserError, match="value 3"):
        import_folder(root, few, tmp_path / "x.h5", ImportOptions(workers=1))
    with pytest.raises(UserError, match="classes file"):
        import_folder(root, tmp_path / "none.txt", tmp_path / "x.h5", ImportOptions(workers=1))
    # sizes differ and no --size
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(root / "images" / "img03.png")
    Image.fromarray(np.zeros((10, 10), np.uint8), mode="L").save(root / "masks" / "img03.png")
    with pytest.raises(UserError, match="--size"):
        import_folder(root, classes, tmp_path / "x.h5", ImportOptions(workers=1))
    assert not (tmp_path / "x.h5").exists()
    (root / "masks").rename(tmp_path / "m")
    with pytest.raises(UserError, match="no masks/ folder"):
        import_folder(root, classes, tmp_path / "x.h5", ImportOptions(workers=1))


def test_folder_ignore_values_val_split_palette_limit_cli(tmp_path, capsys):
    """The new user's CamVid-as-folder case: void 11 → 255 with --ignore, a val/ split, the dataset's colours."""
    from testbed.cli import main

    rng = np.random.default_rng(7)
    root = tmp_path / "camvid-folder"
    written = {}
    for split, n in (("train", 3), ("val", 2), ("test", 2)):
        for i in range(n):
            mask = _block_mask(rng, 16, 24, 4, 11)  # 0..10 are classes, 11 is void
            mask[:4, :4] = 11
            rgb = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
            _save_pair(root / "images" / split, root / "masks" / split, f"{split}{i}", rgb, mask, ext=".png")
            written[(split, i)] = mask
    classes = tmp_path / "names.txt"
    classes.write_text("\n".join(f"k{j}" for j in range(11)) + "\n")
    pal = tmp_path / "colours.txt"
    pal.write_text("".join(f"{j} {2 * j},{255 - j}\n" for j in range(11)))
    out = tmp_path / "f.h5"
    argv = ["-q", "data", "import", "folder", str(root), "--classes", str(classes), "--out", str(out), "--workers", "1"]
    assert main(argv + ["--ignore", "11", "--palette", str(pal), "--limit", "2"]) == 0
    with h5data.open_dataset(out) as f:
        assert (f.length("train"), f.length("val"), f.length("test")) == (2, 2, 2)  # --limit: first 2 of each
        for (split, i), mask in written.items():
            if i < 2:
                assert np.array_equal(f[f"{split}/labels"][i], np.where(mask == 11, 255, mask)), (split, i)
        assert f.palette == [[j, 2 * j, 255 - j] for j in range(11)] and f.source["ignore"] == [11]
    capsys.readouterr()
    assert main(argv + ["--force"]) == 2  # without --ignore, void is out of range: one line naming the first mask
    err = capsys.readouterr().err.strip()
    assert "holds value 11 but valid values are 0..10 and 255" in err and "train0.png" in err and "\n" not in err
    pal.write_text("1 2 3\n")
    assert main(argv + ["--force", "--ignore", "11", "--palette", str(pal)]) == 2
    assert "has 1 colours for 11 classes" in capsys.readouterr().err


def test_ade20k_non_square_short_side_and_limit(ade_root, tmp_path):
    root, raws = ade_root
    out = import_ade20k(root, tmp_path / "a.h5", options=ImportOptions(resize=Resize(size=(16, 24)), limit=2, workers=1))
    with h5data.open_dataset(out) as f:
        assert f.image_size == (16, 24) and f.length("train") == 2 and f.length("test") == 2
        assert f.source["size"] == [16, 24] and f.source["limit"] == 2
    with pytest.raises(UserError, match=r"ADE_train_00000001\.jpg is 32x16, other images are 16x16"):  # aspect kept
        import_ade20k(root, tmp_path / "b.h5", options=ImportOptions(resize=Resize(short_side=16), workers=1))
