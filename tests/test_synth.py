"""The embedded synthetic scenes: determinism, class statistics the attacks rely on, real textures."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from testbed.data.synth import SYNTH_CLASSES, make_synth_dataset, synth_scenes

ADE20K_NAMES = (Path(__file__).resolve().parents[1] / "testbed" / "data" / "ade20k_classes.txt").read_text().split("\n")


@pytest.fixture(scope="module")
def draw():
    """1000 scenes at 64×64 (the draw docs/data-format.md states the class shares of)."""
    return synth_scenes(1000, size=64, seed=0)


@pytest.fixture(scope="module")
def presence(draw):
    _, labels = draw
    return {name: (labels == k).any(axis=(1, 2)) for k, name in enumerate(SYNTH_CLASSES)}


def test_classes_are_ade20k_names_in_ade20k_order():
    required = {"wall", "building", "sky", "floor", "tree", "ceiling", "road", "grass", "person", "car", "palm"}
    assert required <= set(SYNTH_CLASSES)
    assert len(SYNTH_CLASSES) <= 16
    ade_ids = [ADE20K_NAMES.index(c) for c in SYNTH_CLASSES]
    assert ade_ids == sorted(ade_ids)


def test_shapes_dtypes_and_label_range(draw):
    images, labels = draw
    assert images.shape == (1000, 64, 64, 3) and images.dtype == np.uint8
    assert labels.shape == (1000, 64, 64) and labels.dtype == np.uint8
    values = set(np.unique(labels).tolist())
    assert values <= set(range(len(SYNTH_CLASSES))) | {255}
    assert values >= set(range(len(SYNTH_CLASSES)))  # every class occurs somewhere
    assert (labels == 255).mean() < 0.05  # "other" (ignore) stays a small share


@pytest.mark.parametrize("size", [16, 33, 128])
def test_any_size(size):
    images, labels = synth_scenes(3, size=size, seed=5)
    assert images.shape == (3, size, size, 3) and labels.shape == (3, size, size)
    assert len(np.unique(labels[0])) >= 2


def test_deterministic_and_seed_dependent():
    a = synth_scenes(70, size=32, seed=3)
    b = synth_scenes(70, size=32, seed=3)
    c = synth_scenes(70, size=32, seed=4)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    assert (a[1] != c[1]).mean() > 0.2
    # the first k of n are the k scenes asked for alone (chunk boundaries do not matter)
    k = synth_scenes(5, size=32, seed=3)
    assert np.array_equal(k[0], a[0][:5]) and np.array_equal(k[1], a[1][:5])
    assert synth_scenes(0, size=32)[0].shape == (0, 32, 32, 3)


def test_images_differ_from_each_other(draw):
    images, _ = draw
    flat = images[:300].reshape(300, -1)
    assert len({row.tobytes() for row in flat}) == 300
    # and not just by noise: label maps differ too
    assert len({row.tobytes() for row in draw[1][:300].reshape(300, -1)}) == 300


def test_cooccurrence_shares(presence):
    wall, person, grass, road = presence["wall"], presence["person"], presence["grass"], presence["road"]
    assert (wall & person).mean() >= 0.25
    assert (~wall).mean() >= 0.30
    assert 0.10 <= grass.mean() <= 0.20
    # street scenes (buildings, cars) always have a road
    street = presence["building"] | presence["car"]
    assert street.mean() > 0.3 and road[street].all()
    # person is common in every family: indoor (wall), street (road), park (grass, no road)
    park = grass & ~road
    for family in (wall, road, park):
        assert family.sum() > 50
        assert person[family].mean() >= 0.5
    # families keep to their classes: no sky indoors, no ceiling outdoors
    assert not (wall & presence["sky"]).any()
    assert not (presence["ceiling"] & ~wall).any()


def test_textures_are_not_flat(draw):
    images, labels = draw
    checked = 0
    for k, name in enumerate(SYNTH_CLASSES):
        per_image_std, per_image_mean = [], []
        for i in np.flatnonzero((labels == k).sum(axis=(1, 2)) >= 40)[:40]:
            px = images[i][labels[i] == k].astype(np.float64)
            per_image_std.append(px.std(axis=0).mean())
            per_image_mean.append(px.mean(axis=0))
        if len(per_image_std) < 5:
            continue
        checked += 1
        # within one image a class region is textured, not a flat colour ...
        assert np.median(per_image_std) > 4.0, name
        # ... and its colour varies between images (colour jitter, lighting)
        assert np.std(np.array(per_image_mean), axis=0).mean() > 4.0, name
    assert checked >= 9


def test_classes_are_visually_distinct(draw):
    """Sky is brighter and bluer than road; grass greener than wall: the image carries the label."""
    images, labels = draw
    mean = {n: images[labels == k].astype(np.float64).mean(0) for k, n in enumerate(SYNTH_CLASSES)}
    assert mean["sky"][2] > mean["road"][2] + 40
    assert mean["grass"][1] > mean["grass"][0] + 30 and mean["grass"][1] > mean["wall"][1] - 80
    assert mean["tree"][1] > mean["tree"][2]


def test_make_synth_dataset(tmp_path):
    out = make_synth_dataset(tmp_path / "s.h5", n_train=20, n_test=7, size=32, seed=2, compression="lzf")
    with h5py.File(out, "r") as f:
        assert f["train/images"].shape == (20, 32, 32, 3) and f["test/labels"].shape == (7, 32, 32)
        assert f["train/images"].compression == "lzf"
        train_x, train_y, test_x = f["train/images"][()], f["train/labels"][()], f["test/images"][()]
        import json

        source = json.loads(f.attrs["source"])
        assert json.loads(f.attrs["classes"]) == SYNTH_CLASSES
    assert source == {"generator": "testbed.data.synth", "n_train": 20, "n_test": 7, "size": 32, "seed": 2}
    x, y = synth_scenes(20, size=32, seed=2)
    assert np.array_equal(train_x, x) and np.array_equal(train_y, y)
    # the test split is an independent stream, not a continuation or copy of train
    assert not np.array_equal(test_x, x[:7])
    assert not np.array_equal(test_x, synth_scenes(27, size=32, seed=2)[0][20:])
