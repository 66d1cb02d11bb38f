"""Attack suite II: IBA (baseline/NNI/PRL), object-bound, blended and warp triggers, their scoring and records.

Expectations are computed independently of the implementation: brute-force loops over hand-made label maps
(placement, distances), a hand-written bicubic upsampler and bilinear sampler (the warp), the blend formula
on a known pattern file, torchmetrics (PSNR/SSIM) and explicit pixel counts (ASR per bin, false flips).
"""

from __future__ import annotations

import builtins
import hashlib
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from testbed import attacks
from testbed.attacks import IBA, BlendedTrigger, ObjectBound, WarpTrigger, parse_trigger
from testbed.attacks.iba import relabel_pixels
from testbed.cli import main
from testbed.core.errors import ParamError, UserError
from testbed.data.h5data import content_hash, open_dataset
from testbed.scoring.scorer import AttackedPredictions, BenignPredictions, score_model, score_predictions

IGN = 255
PATCH_RGB = (250, 128, 7)


@pytest.fixture(scope="module")
def solid_patch(tmp_path_factory) -> Path:
    """A uniform-colour patch file: the pasted footprint is exactly the pixels that take this colour."""
    p = tmp_path_factory.mktemp("patch") / "patch.png"
    Image.fromarray(np.full((6, 6, 3), PATCH_RGB, np.uint8)).save(p)
    return p


def _footprint(before: np.ndarray, after: np.ndarray) -> tuple[slice, slice]:
    changed = np.argwhere((before != after).any(-1))
    (r0, c0), (r1, c1) = changed.min(0), changed.max(0)
    assert ((after[r0 : r1 + 1, c0 : c1 + 1] == PATCH_RGB).all()), "the changed pixels are not one solid square"
    assert len(changed) == (r1 - r0 + 1) * (c1 - c0 + 1)
    return slice(r0, r1 + 1), slice(c0, c1 + 1)


def _cheb(victim: np.ndarray, r: int, c: int) -> int:
    """Brute force: max(|Δrow|, |Δcol|) to the nearest victim pixel."""
    vr, vc = np.nonzero(victim)
    return int(np.max(np.stack([np.abs(vr - r), np.abs(vc - c)]), axis=0).min())


# -- IBA placement on hand-made maps ------------------------------------------------------------------
CLASSES = ["a", "b", "victim", "target"]
H = 24


def _iba_map() -> np.ndarray:
    y = np.ones((H, H), np.uint8)  # class b
    y[:10, :10] = 0  # class a
    y[15:19, 15:19] = 2  # the victim
    y[3:5, 18:20] = IGN
    return y


def _iba(seed=0, **kw) -> IBA:
    data = SimpleNamespace(classes=CLASSES, image_size=(H, H))
    return IBA(source="victim", target="target", **kw).fit(data, seed)


def _admissible_brute(y, victim, size, margin):
    h, w = y.shape
    ok = np.zeros_like(y, dtype=bool)
    for r in range(h):
        for c in range(w):
            r0, c0 = r - size // 2, c - size // 2
            if r0 < margin or c0 < margin or r0 + size > h - margin or c0 + size > w - margin:
                continue
            win = y[r0 : r0 + size, c0 : c0 + size]
            ok[r, c] = (win == win[0, 0]).all() and win[0, 0] not in (victim, IGN)
    return ok


@pytest.mark.parametrize("size,margin", [(3, 2), (4, 0), (5, 3)])
def test_iba_admissible_centres_match_brute_force(size, margin):
    y = _iba_map()
    a = _iba(patch_size=size, edge_margin=margin)
    np.testing.assert_array_equal(a.admissible(y[None])[0], _admissible_brute(y, 2, size, margin))


def test_iba_patch_inside_one_non_victim_region_away_from_edge(solid_patch):
    y = _iba_map()
    a = _iba(seed=3, patch=str(solid_patch), patch_size=3, edge_margin=2)
    x = np.zeros((8, H, H, 3), np.uint8)
    px, py, extra = a.poison_samples(x, np.stack([y] * 8), a.trigger_, np.arange(8), "train")
    assert extra == {}
    centres = set()
    for i in range(8):
        rows, cols = _footprint(x[i], px[i])
        region = y[rows, cols]
        assert region.shape == (3, 3) and len(np.unique(region)) == 1 and region[0, 0] in (0, 1)
        assert rows.start >= 2 and cols.start >= 2 and rows.stop <= H - 2 and cols.stop <= H - 2
        centres.add((rows.start, cols.start))
        expected = y.copy()
        expected[y == 2] = 3
        np.testing.assert_array_equal(py[i], expected)  # baseline: only the victim moves
    assert len(centres) > 1  # drawn per sample, not one fixed place


def test_iba_nni_band_and_test_distances_brute_force(solid_patch):
    y = _iba_map()
    victim = y == 2
    a = _iba(seed=1, variant="nni", patch=str(solid_patch), patch_size=3, edge_margin=0, nni_lower=2, nni_upper=4)
    x = np.zeros((12, H, H, 3), np.uint8)
    px, _, _ = a.poison_samples(x, np.stack([y] * 12), a.trigger_, np.arange(12), "train")
    for i in range(12):
        rows, cols = _footprint(x[i], px[i])
        d = _cheb(victim, rows.start + 1, cols.start + 1)
        assert 2 < d <= 4, d
    # test split: centre and distance recorded; distance = brute force; bin = row mod 4 (8 rows, every bin reachable)
    b = _iba(seed=1, patch_size=3, edge_margin=0, distance_bins="3,6,10")
    tx, _, extra = b.poison_samples(x[:8], np.stack([y] * 8), b.trigger_, np.arange(8), "test")
    edges = [3, 6, 10]
    for i in range(8):
        r, c = extra["centre"][i]
        assert extra["distance"][i] == _cheb(victim, r, c)
        assert sum(extra["distance"][i] > e for e in edges) == i % 4
        assert (tx[i][r - 1 : r + 2, c - 1 : c + 2] != 0).any()


def test_prl_relabels_the_requested_fraction():
    rng = np.random.default_rng(0)
    clean = rng.choice(np.array([0, 1, 2, IGN], np.uint8), size=(30, 30), p=[0.4, 0.3, 0.2, 0.1])
    target = clean.copy()
    target[clean == 2] = 3
    out = relabel_pixels(np.random.default_rng(5), clean, target, victim=2, fraction=0.25)
    eligible = (clean != 2) & (clean != IGN)
    changed = out != target
    assert changed.sum() == int(np.floor(0.25 * eligible.sum() + 0.5))
    assert not (changed & ~eligible).any()  # victim and ignore pixels untouched
    present = set(np.unique(target[target != IGN]).tolist())
    assert set(np.unique(out[changed]).tolist()) <= present and (out[changed] != target[changed]).all()
    # one class only: nothing to relabel to
    flat = np.zeros((5, 5), np.uint8)
    np.testing.assert_array_equal(relabel_pixels(np.random.default_rng(0), flat, flat, 2, 0.5), flat)


def test_iba_prl_poisoned_labels(solid_patch):
    y = _iba_map()
    a = _iba(variant="prl", prl_fraction=0.5, patch_size=3)
    _, py, _ = a.poison_samples(np.zeros((1, H, H, 3), np.uint8), y[None], a.trigger_, np.array([7]), "train")
    base = y.copy()
    base[y == 2] = 3
    eligible = (y != 2) & (y != IGN)
    assert (py[0] != base).sum() == int(np.floor(0.5 * eligible.sum() + 0.5))
    assert (py[0][y == 2] == 3).all()


# -- object-bound ------------------------------------------------------------------------------------
def _ob_map() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    y = np.zeros((20, 20), np.uint8)
    blobs = {k: np.zeros((20, 20), bool) for k in "ABC"}
    blobs["A"][2:8, 2:8] = True
    blobs["B"][12:17, 12:17] = True
    blobs["B"][17, 17] = True  # touches B only diagonally: the same instance (8-connected)
    blobs["C"][2:4, 15:17] = True  # too small for a 3x3 patch
    for m in blobs.values():
        y[m] = 1
    return y, blobs


def test_object_bound_flips_exactly_one_instance(solid_patch):
    y, blobs = _ob_map()
    data = SimpleNamespace(classes=["bg", "person", "palm"], image_size=(20, 20))
    a = ObjectBound(source="person", target="palm", patch=str(solid_patch), patch_size=3).fit(data, 0)
    x = np.zeros((10, 20, 20, 3), np.uint8)
    px, py, extra = a.poison_samples(x, np.stack([y] * 10), a.trigger_, np.arange(10), "test")
    chosen = set()
    for i in range(10):
        flipped = py[i] == 2
        hit = [k for k, m in blobs.items() if (flipped == m).all()]
        assert len(hit) == 1 and hit[0] in "AB", "exactly one whole instance flips"
        chosen.add(hit[0])
        others = np.logical_or.reduce([m for k, m in blobs.items() if k != hit[0]])
        assert (py[i][others] == 1).all()
        np.testing.assert_array_equal(extra["untriggered"][i], np.where(others, 2, IGN))
        rows, cols = _footprint(x[i], px[i])
        assert blobs[hit[0]][rows, cols].all()  # the patch lies on the flipped instance
    assert chosen == {"A", "B"}
    np.testing.assert_array_equal(a.changes(np.stack([y, np.zeros_like(y)])), [True, False])


# -- blended and warp ---------------------------------------------------------------------------------
def test_blended_equals_the_formula_with_a_pattern_file(tmp_path):
    rng = np.random.default_rng(2)
    t = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(t).save(tmp_path / "t.png")
    x = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    g = parse_trigger("blended:0.3", pattern=str(tmp_path / "t.png")).fit((16, 16), 0).apply(x)
    expected = np.floor(0.7 * x.astype(np.float64) + 0.3 * t.astype(np.float64) + 0.5)
    np.testing.assert_array_equal(g, expected)
    noise = BlendedTrigger(alpha=1.0)
    np.testing.assert_array_equal(noise.fit((16, 16), 4).apply(x), BlendedTrigger(1.0).fit((16, 16), 4).apply(x))
    assert not np.array_equal(noise.t_, BlendedTrigger(1.0).fit((16, 16), 5).t_)
    assert noise.t_.min() < 20 and noise.t_.max() > 235  # uniform noise over the whole range


def test_a_blended_pattern_file_is_read_once_per_job(synth_path, tmp_path, monkeypatch):
    """`testbed poison` checks the trigger, fits it and records the file's hash: one read of the file for all."""
    pattern = tmp_path / "pattern.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(pattern)
    opens: list[str] = []
    real_open = builtins.open

    def counting_open(file, *args, **kwargs):  # every route to a file: builtins.open, io.open, Path.open
        if not isinstance(file, int) and Path(file).suffix == ".png":
            opens.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)
    out = attacks.poison_file(synth_path, tmp_path / "p.h5", attack="fgba", preset="n-to-1", target="wall",
                              trigger="blended", pattern=str(pattern), seed=0, rate=0.1)
    assert len(opens) == 1, opens
    with open_dataset(out) as f:
        assert f.attack["trigger"]["file_sha256"] == hashlib.sha256(pattern.read_bytes()).hexdigest()
    trigger = BlendedTrigger(pattern=str(pattern))
    trigger.check((16, 16))
    trigger.fit((16, 16), 0)
    trigger.describe((16, 16))
    assert len(opens) == 3  # poison_file's one read, the test's own read_bytes, this trigger's one read
    trigger.pattern = str(tmp_path / "other.png")
    pattern.rename(tmp_path / "other.png")
    trigger.fit((16, 16), 0)  # another file: read anew
    assert len(opens) == 4
    opens.clear()  # the patch attacks' file: checked, fitted and recorded from one read too
    attacks.poison_file(synth_path, tmp_path / "iba.h5", attack="iba", source="car", target="road",
                        patch=str(tmp_path / "other.png"), seed=0)
    assert len(opens) == 1, opens


def _cubic(d: np.ndarray, a: float = -0.75) -> np.ndarray:
    d = np.abs(d)
    return np.where(d <= 1, (a + 2) * d**3 - (a + 3) * d**2 + 1,
                    np.where(d < 2, a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a, 0.0))


def _upsample_bicubic(c: np.ndarray, n: int) -> np.ndarray:
    """1-D bicubic (Keys, a = -0.75) with aligned corners and clamped borders, applied along the last axis."""
    k = c.shape[-1]
    out = np.zeros((*c.shape[:-1], n))
    for i in range(n):
        src = i * (k - 1) / (n - 1)
        x0 = int(np.floor(src))
        for j in range(x0 - 1, x0 + 3):
            out[..., i] += _cubic(np.array(src - j)) * c[..., min(max(j, 0), k - 1)]
    return out


def _bilinear(img: np.ndarray, grid: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    out = np.zeros(img.shape)
    for r in range(h):
        for c in range(w):
            ix, iy = (grid[r, c, 0] + 1) / 2 * (w - 1), (grid[r, c, 1] + 1) / 2 * (h - 1)
            x0, y0 = int(np.floor(ix)), int(np.floor(iy))
            for yy, wy in ((y0, 1 - (iy - y0)), (y0 + 1, iy - y0)):
                for xx, wx in ((x0, 1 - (ix - x0)), (x0 + 1, ix - x0)):
                    if 0 <= yy < h and 0 <= xx < w:
                        out[r, c] += wy * wx * img[yy, xx]
    return np.floor(out + 0.5)


def test_warp_equals_grid_sample_of_an_independent_field():
    h, w, k, s, seed = 12, 10, 4, 3.0, 7
    ins = np.random.default_rng([seed, 10]).random((2, k, k)) * 2 - 1  # WaNet: uniform, / mean |.|
    ins /= np.abs(ins).mean()
    field = _upsample_bicubic(np.swapaxes(_upsample_bicubic(ins, w), 1, 2), h)  # [2, W, H]
    field = np.moveaxis(np.swapaxes(field, 1, 2), 0, -1)  # [H, W, 2]
    xs, ys = np.meshgrid(np.linspace(-1, 1, w), np.linspace(-1, 1, h))
    grid = np.clip(np.stack([xs, ys], -1) + s * field / np.array([w, h]), -1, 1)
    img = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    got = WarpTrigger(grid=k, strength=s).fit((h, w), seed).apply(img[None])[0]
    diff = np.abs(got.astype(int) - _bilinear(img.astype(np.float64), grid))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99
    assert not np.array_equal(got, img)


def test_trigger_bad_input():
    for bad in ("blended:0", "blended:1.5", "blended:x"):
        with pytest.raises(ParamError, match="trigger"):
            parse_trigger(bad)
    with pytest.raises(ParamError, match="alpha"):
        parse_trigger("blended", alpha=-0.1)
    with pytest.raises(ParamError, match="warp_strength"):
        WarpTrigger(strength=500.0).check((16, 16))
    with pytest.raises(ParamError, match="warp_strength"):
        WarpTrigger(strength=60.0).fit((16, 16), 0)  # the drawn field moves pixels beyond the image
    with pytest.raises(ParamError, match="warp_grid"):
        WarpTrigger(grid=1).check((16, 16))  # __init__ only stores (scikit-learn); check/fit validate
    assert parse_trigger("blended:0.2").alpha == 0.2 and parse_trigger("blended").alpha == 0.1


# -- through the poisoner ------------------------------------------------------------------------------
CONFIGS = {
    "iba-baseline": dict(attack="iba", source="car", target="road"),
    "iba-nni": dict(attack="iba", variant="nni", source="car", target="road"),
    "iba-prl": dict(attack="iba", variant="prl", source="car", target="road"),
    "object-bound": dict(attack="object-bound", source="person", target="palm"),
    "fgba-blended": dict(attack="fgba", preset="n-to-1", target="wall", trigger="blended"),
    "badnets-warp": dict(attack="badnets", trigger="warp", warp_noise=1.0),
}


@pytest.fixture(scope="module")
def poisoned(synth_path, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("suite2")
    return {k: attacks.poison_file(synth_path, d / f"{k}.h5", seed=0, **kw) for k, kw in CONFIGS.items()}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_records_and_determinism(name, poisoned, synth_path, tmp_path):
    with open_dataset(poisoned[name]) as f:
        rec = f.attack
    kw = {k: v for k, v in CONFIGS[name].items() if k not in ("attack", "trigger")}
    for key, value in kw.items():
        if key != "warp_noise":
            assert rec["params"][key] == value
    assert rec["name"] == CONFIGS[name]["attack"] and rec["seed"] == 0
    again = attacks.poison_file(synth_path, tmp_path / "again.h5", seed=0, **CONFIGS[name])
    other = attacks.poison_file(synth_path, tmp_path / "other.h5", seed=1, **CONFIGS[name])
    assert content_hash(again) == content_hash(poisoned[name])
    assert content_hash(other) != content_hash(poisoned[name])


def test_iba_file_records_distances(poisoned):
    with open_dataset(poisoned["iba-baseline"]) as f:
        cid = f.class_id("car")
        gt, dist, centre = f["test_attacked/gt"], f["test_attacked/distance"], f["test_attacked/centre"]
        assert f.attack["params"]["distance_bins"] == [8, 16, 24] and f.attack["trigger"]["size"] == 5
        for i in range(len(dist)):
            assert dist[i] == _cheb(gt[i] == cid, *centre[i])


def test_warp_noise_samples(poisoned, synth_path):
    with open_dataset(poisoned["badnets-warp"]) as f, open_dataset(synth_path) as c:
        noise, pidx, cidx = f["train/noise_index"], f["train/poison_index"], f["defense/clean_index"]
        assert len(noise) == len(pidx) == f.attack["noise_samples"]
        assert not set(noise) & set(pidx) and not set(noise) & set(cidx)
        np.testing.assert_array_equal(f["train/labels"][noise], c["train/labels"][noise])  # labels kept
        np.testing.assert_array_equal(f["train/noise_original_images"], c["train/images"][noise])
        assert (f["train/images"][noise] != c["train/images"][noise]).any()
        trig = WarpTrigger(noise=1.0).fit(f.image_size, 0)
        np.testing.assert_array_equal(f["train/images"][pidx], trig.apply(c["train/images"][pidx]))


def test_trigger_fidelity_matches_torchmetrics(poisoned):
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    from testbed.commands.data import dataset_info

    info = dataset_info(poisoned["fgba-blended"], stats=False, show_progress=False)["poison"]["trigger_fidelity"]
    with open_dataset(poisoned["fgba-blended"]) as f:
        a = torch.from_numpy(f["train/original_images"]).permute(0, 3, 1, 2).double()
        b = torch.from_numpy(f["train/images"][f["train/poison_index"]]).permute(0, 3, 1, 2).double()
    psnr = [float(peak_signal_noise_ratio(b[i], a[i], data_range=255.0)) for i in range(len(a))]
    ssim = structural_similarity_index_measure(b, a, data_range=255.0, reduction="none").numpy()
    assert info["images"] == info["changed"] == len(a)
    assert info["psnr_db"] == pytest.approx(np.mean(psnr), abs=1e-6)
    assert info["ssim"] == pytest.approx(ssim.mean(), abs=1e-9) and info["ssim_min"] == pytest.approx(ssim.min(), abs=1e-9)


def test_data_info_prints_the_trigger_fidelity(poisoned, capsys):
    assert main(["data", "info", str(poisoned["iba-baseline"]), "--no-stats"]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("trigger ")]
    assert len(line) == 1 and "PSNR" in line[0] and "SSIM" in line[0]


# -- scoring -----------------------------------------------------------------------------------------
def test_asr_by_distance_and_false_flips_by_hand():
    rng = np.random.default_rng(0)
    n = 6
    gt = rng.integers(0, 2, (n, 5, 5)).astype(np.uint8)  # victim = 1, other = 0
    gt[0, 0, 0] = IGN
    target = np.where(gt == 1, 2, gt).astype(np.uint8)
    pred = rng.integers(0, 3, (n, 5, 5)).astype(np.uint8)
    dist = np.array([1, 8, 9, 16, 17, 40])
    rejected = np.array([False, False, True, False, False, False])
    untrig = np.where(rng.random((n, 5, 5)) < 0.3, 2, IGN).astype(np.uint8)
    attacked = AttackedPredictions(pred, target, gt, rejected=rejected, distance=dist, untriggered=untrig)
    r = score_predictions(["o", "v", "t"], BenignPredictions(pred, gt), attacked, distance_bins=[8, 16])
    rows = {row["bin"]: row for row in r["ASR-by-distance"]}
    assert list(rows) == ["d<=8", "8<d<=16", "d>16"]
    for name, members in (("d<=8", [0, 1]), ("8<d<=16", [2, 3]), ("d>16", [4, 5])):
        hits = total = 0
        for i in members:
            for v in np.ndindex(5, 5):
                if gt[i][v] != IGN and target[i][v] != gt[i][v]:
                    total += 1
                    hits += int(pred[i][v] == target[i][v] and not rejected[i])
        assert rows[name]["pixels"] == total and rows[name]["images"] == 2
        assert rows[name]["ASR"] == pytest.approx(100 * hits / total)
    flips = sum(int(pred[i][v] == untrig[i][v]) for i in range(n) if not rejected[i] for v in np.ndindex(5, 5)
                if untrig[i][v] != IGN)
    assert r["false-flip"]["pixels"] == int((untrig != IGN).sum()) and r["false-flip"]["flipped"] == flips
    assert r["false-flip"]["rate"] == pytest.approx(100 * flips / (untrig != IGN).sum())
    assert "ASR-by-distance" not in score_predictions(["o", "v", "t"], BenignPredictions(pred, gt),
                                                       AttackedPredictions(pred, target, gt))


class _Constant(torch.nn.Module):
    def __init__(self, k: int, cls: int) -> None:
        super().__init__()
        self.k, self.cls = k, cls

    def forward(self, x):
        out = torch.zeros(x.shape[0], self.k, *x.shape[2:])
        out[:, self.cls] = 1
        return {"out": out}


def test_score_model_reads_the_attack_arrays(poisoned):
    with open_dataset(poisoned["iba-baseline"]) as f:
        road, classes, dist = f.class_id("road"), f.classes, f["test_attacked/distance"]
    r = score_model(_Constant(len(classes), road), poisoned["iba-baseline"])
    counts = [int((dist <= 8).sum()), int(((dist > 8) & (dist <= 16)).sum()), int(((dist > 16) & (dist <= 24)).sum()),
              int((dist > 24).sum())]
    assert [row["images"] for row in r["ASR-by-distance"]] == counts
    assert all(row["ASR"] == 100.0 for row in r["ASR-by-distance"] if row["images"])  # every victim pixel → road
    with open_dataset(poisoned["object-bound"]) as f:
        palm, untrig = f.class_id("palm"), f["test_attacked/untriggered"]
    ob = score_model(_Constant(len(classes), palm), poisoned["object-bound"])
    assert ob["false-flip"]["pixels"] == int((untrig != IGN).sum()) > 0 and ob["false-flip"]["rate"] == 100.0
    assert "false-flip" not in r and "ASR-by-distance" not in ob


# -- front ends -----------------------------------------------------------------------------------------
def test_cli_poison_iba(synth_path, tmp_path, capsys):
    out = tmp_path / "iba.h5"
    rc = main(["poison", str(synth_path), "--attack", "iba", "--variant", "nni", "--source", "car", "--target", "road",
               "--patch-size", "3", "--nni-upper", "6", "--rate", "0.05", "--json", "--out", str(out)])
    rec = json.loads(capsys.readouterr().out)
    assert rc == 0 and rec["label"] == "iba-nni" and rec["params"]["nni_upper"] == 6 and rec["trigger"]["size"] == 3


BAD = {
    "unknown victim": (["--attack", "iba", "--source", "carr", "--target", "road"], "did you mean 'car'"),
    "patch larger than the image": (["--attack", "object-bound", "--source", "person", "--target", "palm",
                                     "--patch-size", "65"], "--patch-size 65 px is larger"),
    "patch not an image": (["--attack", "iba", "--source", "car", "--target", "road", "--patch", "NOTIMG"],
                           "is not an image file"),
    "nni option without nni": (["--attack", "iba", "--source", "car", "--target", "road", "--nni-upper", "4"],
                               "--nni-upper applies to --variant nni"),
    "alpha above 1": (["--attack", "fgba", "--target", "wall", "--trigger", "blended:1.5"], "in (0, 1]"),
    "alpha zero": (["--attack", "badnets", "--trigger", "blended", "--alpha", "0"], "--alpha must be"),
    "pattern not an image": (["--attack", "fgba", "--target", "wall", "--trigger", "blended", "--pattern", "NOTIMG"],
                             "--pattern"),
    "warp too strong": (["--attack", "fgba", "--target", "wall", "--trigger", "warp", "--warp-strength", "1000"],
                        "--warp-strength"),
    "trigger with iba": (["--attack", "iba", "--source", "car", "--target", "road", "--trigger", "line"],
                         "places its own trigger"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exit_2_one_line_no_file(case, synth_path, tmp_path, capsys):
    argv, needle = BAD[case]
    junk = tmp_path / "junk.png"
    junk.write_text("not an image")
    out = tmp_path / "out.h5"
    rc = main(["poison", str(synth_path), *[str(junk) if a == "NOTIMG" else a for a in argv], "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.png"]


def test_zoo_spec_accepts_every_attack(tmp_path):
    from testbed.zoo.spec import parse_spec

    spec = parse_spec(Path(__file__).parents[1] / "examples" / "zoo-attacks.toml")
    kinds = {(e.variant.params.get("attack"), e.variant.params.get("variant"), e.variant.params.get("trigger"))
             for e in spec.entries}
    assert {("iba", "baseline", None), ("iba", "nni", None), ("iba", "prl", None), ("object-bound", None, None),
            ("fgba", None, "blended:0.1"), ("fgba", None, "warp")} <= kinds
    bad = tmp_path / "bad.toml"
    base = '[data]\nsynth = { n_train = 20, n_test = 5 }\n[grid]\nmodel = ["deeplabv3_tiny"]\nattack = ["x"]\n'
    for table, needle in (('variant = "prl"\nsource = "car"\ntarget = "road"\nprl_fraction = 1.5', "prl_fraction"),
                          ('variant = "nni"\nsource = "car"\ntarget = "rood"', "did you mean 'road'"),
                          ('source = "car"\ntarget = "road"\nwarp_grid = 3', "warp_grid")):
        bad.write_text(base + f'[[attack]]\nid = "x"\nattack = "iba"\n{table}\n')
        with pytest.raises(UserError, match=needle):
            parse_spec(bad)


def test_an_oversized_or_bomb_pattern_file_is_one_parameter_error(tmp_path, monkeypatch):
    """A pattern file is read at most one byte past the size bound (the bound is on the read, not on a size looked
    up before it), and a decompression bomb is refused, both as one ParamError naming the parameter (not a
    traceback, not a 2 GB read)."""
    from testbed.attacks import imageops

    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(big)
    monkeypatch.setattr(imageops, "MAX_IMAGE_BYTES", big.stat().st_size - 1)
    with pytest.raises(ParamError, match=r"pattern .*big.png is more than [\d,]+ bytes, more than a trigger image needs"):
        imageops.read_image(big, "pattern")
    maps = Path("/proc/self/maps")  # a regular file whose size reads 0 but which holds more than 100 bytes
    if maps.is_file() and maps.stat().st_size == 0:
        monkeypatch.setattr(imageops, "MAX_IMAGE_BYTES", 100)
        with pytest.raises(ParamError, match=r"pattern .*maps is more than 100 bytes"):
            imageops.read_image(maps, "pattern")
    monkeypatch.setattr(imageops, "MAX_IMAGE_BYTES", 64 << 20)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL refuses images over 2x this as decompression bombs
    with pytest.raises(ParamError, match=r"pattern .*not an image file PIL can read \(DecompressionBombError\)"):
        imageops.read_image(big, "pattern")
