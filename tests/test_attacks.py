"""Attacks (docs/attacks.md, paper §2): T(y; A), the blended line G, sample selection and the poisoned file (docs/data-format.md).

Expectations are computed here, independently of attacks/: pixel loops for T and G, Python sets for the
selections, the clean file's own arrays for everything that must be copied unchanged.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import h5py
import numpy as np
import pytest

from testbed import attacks
from testbed.attacks import FGBA, BadNets, BlendedTrigger, LineTrigger, SemanticTrigger, WarpTrigger, parse_trigger
from testbed.core.errors import UserError
from testbed.data.h5data import content_hash, open_dataset, write_dataset

CLASSES = ["wall", "building", "sky", "floor", "tree", "ceiling", "road", "grass", "person", "car", "palm"]
ID = {c: i for i, c in enumerate(CLASSES)}
IGN = 255
S = 16  # image side


def _label_map(i: int) -> np.ndarray:
    """Five hand-made scene kinds; road area grows with i so the 'most road' ranking is known."""
    y = np.zeros((S, S), np.uint8)
    kind = i % 5
    if kind == 0:  # wall only (+ ignore): nothing to attack for n-to-1 wall
        y[:] = ID["wall"]
        y[5:7, 5:7] = IGN
    elif kind == 1:  # wall + person
        y[:] = ID["wall"]
        y[8:, 4:9] = ID["person"]
    elif kind == 2:  # street: sky over road, road rows = 1 + i % 8
        y[:] = ID["sky"]
        y[S - (1 + i % 8):, :] = ID["road"]
        y[0, 0] = IGN
    elif kind == 3:  # park: grass, tree, person
        y[:] = ID["grass"]
        y[:6, :] = ID["tree"]
        y[9:13, 10:12] = ID["person"]
    else:  # indoor without wall: floor, car, ignore block
        y[:] = ID["floor"]
        y[10:, :8] = ID["car"]
        y[:3, :3] = IGN
    return y


def make_clean(path: Path, n: int = 40, m: int = 10, seed: int = 0, classes=CLASSES) -> Path:
    rng = np.random.default_rng(seed)
    arrays = {
        "train/images": rng.integers(0, 256, (n, S, S, 3), dtype=np.uint8),
        "train/labels": np.stack([_label_map(i) for i in range(n)]),
        "test/images": rng.integers(0, 256, (m, S, S, 3), dtype=np.uint8),
        "test/labels": np.stack([_label_map(i + 3) for i in range(m)]),
    }
    return write_dataset(path, arrays, classes, source={"generator": "hand-made test scenes"})


@pytest.fixture
def clean(tmp_path) -> Path:
    return make_clean(tmp_path / "clean.h5")


def _read(path: Path) -> dict:
    with open_dataset(path) as f:
        arrays = {}
        f.file.visititems(lambda name, obj: arrays.__setitem__(name, obj[()]) if hasattr(obj, "shape") else None)
        return {"arrays": arrays, "attack": f.attack, "attrs": dict(f.attrs)}


def _t_loop(y: np.ndarray, a: np.ndarray) -> np.ndarray:
    """T(y; A) pixel by pixel, straight from Definition 1."""
    out = np.empty_like(y)
    for idx, v in np.ndenumerate(y):
        out[idx] = IGN if v == IGN else int(np.argmax(a[v]))
    return out


def _has_any(y: np.ndarray, ids) -> bool:
    return bool(set(np.unique(y).tolist()) & set(ids))


# -- T(y; A) ------------------------------------------------------------------------------------------
def test_attack_matrix_lookup_matches_definition_with_ignore():
    rng = np.random.default_rng(1)
    k = 5
    a = np.zeros((k, k), np.uint8)
    a[np.arange(k), [3, 1, 0, 3, 2]] = 1  # 0→3, 1→1, 2→0, 3→3, 4→2
    y = rng.integers(0, k, (3, 7, 9)).astype(np.uint8)
    y[rng.random(y.shape) < 0.2] = IGN
    assert (y == IGN).any()
    expected = _t_loop(y, a)
    np.testing.assert_array_equal(attacks.apply_attack_matrix(y, a), expected)
    fg = FGBA(matrix=a).fit(["a", "b", "c", "d", "e"])
    np.testing.assert_array_equal(fg.transform(y), expected)
    assert fg.transform(y)[y == IGN].tolist() == [IGN] * int((y == IGN).sum())
    # changes(): a sample changes iff it holds a pixel of a class that moves (0, 2, 4)
    assert fg.changes(y).tolist() == [_has_any(s, {0, 2, 4}) for s in y]
    only_fixed = np.array([[[1, 3, IGN]]], np.uint8)
    assert fg.changes(only_fixed).tolist() == [False]


def test_presets_and_mappings_build_the_expected_matrix():
    k = len(CLASSES)

    def expected(pairs):
        a = np.eye(k, dtype=np.uint8)
        for s, t in pairs:
            a[ID[s]] = 0
            a[ID[s], ID[t]] = 1
        return a

    n1 = FGBA("n-to-1", target="wall").attack_matrix(CLASSES)
    np.testing.assert_array_equal(n1, expected([(c, "wall") for c in CLASSES if c != "wall"]))
    n1s = FGBA("n-to-1", target="wall", sources=["person", "car"]).attack_matrix(CLASSES)
    np.testing.assert_array_equal(n1s, expected([("person", "wall"), ("car", "wall")]))
    np.testing.assert_array_equal(FGBA("n-to-1", target="wall", sources="person,car").attack_matrix(CLASSES), n1s)
    one = FGBA("1-to-1", source="person", target="palm").attack_matrix(CLASSES)
    np.testing.assert_array_equal(one, expected([("person", "palm")]))
    m1 = FGBA(mapping="person:palm,car:road").attack_matrix(CLASSES)
    np.testing.assert_array_equal(m1, expected([("person", "palm"), ("car", "road")]))
    np.testing.assert_array_equal(FGBA(mapping={"person": "palm", "car": "road"}).attack_matrix(CLASSES), m1)
    # without a preset: source ⇒ 1-to-1, target alone ⇒ n-to-1
    # (scikit-learn convention: __init__ only stores; fit validates and resolves, into preset_)
    assert FGBA(source="person", target="palm").fit(CLASSES).preset_ == "1-to-1"
    assert FGBA(target="wall").fit(CLASSES).preset_ == "n-to-1"


@pytest.mark.parametrize("bad", [
    [[1, 1, 0], [0, 1, 0], [0, 0, 1]],  # two ones
    [[0, 0, 0], [0, 1, 0], [0, 0, 1]],  # no one
    [[1, 0, 0], [0, 2, 0], [0, 0, 1]],  # not 0/1
    [[1, 0], [0, 1], [1, 0]],           # not square
])
def test_attack_matrix_not_one_hot_is_a_user_error(bad):
    with pytest.raises(UserError):
        attacks.check_attack_matrix(bad)
    with pytest.raises(UserError):
        FGBA(matrix=bad).fit(["a", "b", "c"])


def test_attack_matrix_row_error_names_the_row_and_poison_writes_nothing(clean, tmp_path):
    a = np.eye(len(CLASSES), dtype=np.uint8)
    a[ID["person"], ID["palm"]] = 1  # person row now has two ones
    out = tmp_path / "bad.h5"
    with pytest.raises(UserError, match=r"row 8 \('person'\).*not one-hot"):
        attacks.poison(clean, out, FGBA(matrix=a), LineTrigger(), rate=0.1)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [clean]  # no temp file left behind either


@pytest.mark.parametrize("kwargs", [
    dict(preset="1-to-1", source="person", target="person"),
    dict(mapping="person:person"),
    dict(preset="n-to-1", target="wall", sources=["person", "wall"]),
])
def test_source_equal_to_target_is_an_error(kwargs):
    with pytest.raises(UserError, match="differ"):
        FGBA(**kwargs).fit(CLASSES)


def test_identity_matrix_is_an_error():
    with pytest.raises(UserError, match="nothing would be attacked"):
        FGBA(matrix=np.eye(3, dtype=np.uint8)).fit(["a", "b", "c"])


def test_unknown_class_suggests_the_nearest(clean):
    with open_dataset(clean) as f, pytest.raises(UserError, match="did you mean 'palm'"):
        FGBA("1-to-1", source="person", target="plam").fit(f)


# -- G: the blended line --------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha,colour", [(1.0, (0, 0, 0)), (0.5, (255, 10, 0)), (0.3, (7, 200, 128))])
def test_line_blend_pixel_by_pixel(alpha, colour):
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (2, 12, 20, 3), dtype=np.uint8)
    x_before = x.copy()
    g = LineTrigger(alpha=alpha, colour=colour).apply(x)
    np.testing.assert_array_equal(x, x_before)  # input untouched
    width = 2  # round(8·12/512) = 0 → at least 2
    for n in range(2):
        for r in range(12):
            for c in range(20):
                for ch in range(3):
                    xv = float(x[n, r, c, ch])
                    lam = alpha if r < width else 0.0
                    want = math.floor((1 - lam) * xv + lam * colour[ch] + 0.5)
                    assert g[n, r, c, ch] == want, (n, r, c, ch)


def test_line_width_default_scales_with_height_half_up():
    assert LineTrigger().resolved_width((64, 64)) == 2
    assert LineTrigger().resolved_width((512, 512)) == 8
    assert LineTrigger().resolved_width((160, 90)) == 3  # 2.5 rounds up
    assert LineTrigger().resolved_width((1024, 10)) == 16
    assert LineTrigger(orientation="vertical", position="left").resolved_width((64, 512)) == 8


def test_line_positions_and_orientation():
    h, w = 10, 14
    cases = {
        ("horizontal", "top", 0): (slice(0, 3), slice(None)),
        ("horizontal", "bottom", 1): (slice(6, 9), slice(None)),
        ("horizontal", "middle", 0): (slice(3, 6), slice(None)),
        ("vertical", "left", 2): (slice(None), slice(2, 5)),
        ("vertical", "right", 0): (slice(None), slice(11, 14)),
    }
    for (orient, pos, off), region in cases.items():
        expect = np.zeros((h, w), bool)
        expect[region] = True
        m = LineTrigger(width=3, position=pos, orientation=orient, offset=off).mask((h, w))
        np.testing.assert_array_equal(m, expect, err_msg=f"{orient} {pos} {off}")
        img = np.full((1, h, w, 3), 200, np.uint8)
        g = LineTrigger(width=3, position=pos, orientation=orient, offset=off, colour=(1, 2, 3)).apply(img)
        assert (g[0][expect] == [1, 2, 3]).all() and (g[0][~expect] == 200).all()


@pytest.mark.parametrize("kwargs, names", [(dict(alpha=0), "{alpha}"), (dict(alpha=1.5), "{alpha}"),
                                           (dict(width=0), "{line_width}"), (dict(position="left"), "{line_position}"),
                                           (dict(colour=(0, 0, 256)), "line colour"),
                                           (dict(orientation="diagonal"), "{line_orientation}"),
                                           (dict(offset=-1), "line offset")])
def test_line_bad_options(kwargs, names):
    """scikit-learn's convention: __init__ stores the values as given; every entry point refuses them, naming the
    parameter (the CLI spells ``{alpha}`` as its flag)."""
    t = LineTrigger(**kwargs)
    assert all(getattr(t, k) == v for k, v in kwargs.items())
    img = np.zeros((1, 16, 16, 3), np.uint8)
    for use in (lambda: t.check((16, 16)), lambda: t.fit((16, 16), 0), lambda: t.apply(img),
                lambda: t.describe((16, 16)), lambda: t.mask((16, 16))):
        with pytest.raises(UserError, match=re.escape(names.strip("{}"))):
            use()


def test_triggers_store_their_parameters_and_validate_on_use(tmp_path):
    """Bad values pass __init__ untouched (nothing read, nothing raised) and fail at fit/check/apply by name; a
    parsed ``--trigger`` spec is validated when parsed (the CLI's one-line error comes before any work)."""
    img = np.zeros((1, 16, 16, 3), np.uint8)
    cases = [(BlendedTrigger(alpha=2.0), "{alpha}"), (BlendedTrigger(pattern=str(tmp_path / "none.png")), "{pattern}"),
             (WarpTrigger(grid=1), "{warp_grid}"), (WarpTrigger(strength=-1), "{warp_strength}"),
             (WarpTrigger(noise=float("nan")), "{warp_noise}"), (SemanticTrigger(""), "{trigger} semantic:CLASS")]
    for trigger, name in cases:
        for use in (lambda: trigger.check((16, 16)), lambda: trigger.fit((16, 16), 0), lambda: trigger.apply(img)):
            with pytest.raises(UserError, match=re.escape(name.replace("{", "").replace("}", ""))):
                use()
    assert BlendedTrigger(alpha=2.0).alpha == 2.0 and WarpTrigger(grid="x").grid == "x"
    with pytest.raises(UserError, match="alpha must be"):
        parse_trigger("blended", alpha=2.0)
    with pytest.raises(UserError, match="warp_grid must be"):
        parse_trigger("warp", warp_grid=1)


def test_line_that_does_not_fit_is_an_error():
    with pytest.raises(UserError, match="does not fit"):
        LineTrigger(width=20).apply(np.zeros((1, 16, 16, 3), np.uint8))


def test_parse_trigger():
    assert isinstance(parse_trigger("line"), LineTrigger)
    t = parse_trigger("line", alpha=0.5, line_width=4, line_position="bottom")
    assert (t.alpha, t.width, t.position) == (0.5, 4, "bottom")
    s = parse_trigger("semantic:wall")
    assert isinstance(s, SemanticTrigger) and s.class_name == "wall" and s.spec == "semantic:wall"
    x = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    np.testing.assert_array_equal(s.apply(x), x)  # G(x) = x
    for bad in ("semantic:", "dots", "Line"):
        with pytest.raises(UserError):
            parse_trigger(bad)
    with pytest.raises(UserError, match="alpha"):
        parse_trigger("semantic:wall", alpha=0.5)


def test_poison_settings_object_equals_the_keywords(clean, tmp_path):
    """One PoisonSettings or its fields as keywords: the same file; a keyword overrides the object's field; an
    unknown keyword is a TypeError naming it; poison_file routes run settings and attack options apart."""
    atk = lambda: FGBA("n-to-1", target="wall")  # noqa: E731 - a fresh (unfitted) attack per run
    a = attacks.poison(clean, tmp_path / "a.h5", atk(), "line", rate=0.3, seed=5, clean_fraction=0.1)
    s = attacks.PoisonSettings(rate=0.3, seed=2, clean_fraction=0.1)
    b = attacks.poison(clean, tmp_path / "b.h5", atk(), "line", s, seed=5)
    assert content_hash(a.path) == content_hash(b.path) and a.attack == b.attack
    assert np.array_equal(a.poison_index, b.poison_index) and a.attack["seed"] == 5
    assert s.seed == 2  # the caller's object is not changed
    with pytest.raises(TypeError, match="'rat'"):
        attacks.poison(clean, tmp_path / "c.h5", atk(), "line", rat=0.3)
    with pytest.raises(TypeError, match="by keyword"):  # the old positional rate names the way out
        attacks.poison(clean, tmp_path / "c.h5", atk(), "line", 0.3)
    assert not (tmp_path / "c.h5").exists()
    dry = attacks.poison(clean, tmp_path / "d.h5", atk(), "line", attacks.PoisonSettings(rate=0.3, seed=5, dry_run=True))
    assert not dry.written and not (tmp_path / "d.h5").exists() and np.array_equal(dry.poison_index, a.poison_index)
    path = attacks.poison_file(clean, tmp_path / "e.h5", attack="fgba", preset="n-to-1", target="wall", trigger="line",
                               rate=0.3, seed=5, clean_fraction=0.1)
    assert content_hash(path) == content_hash(a.path)


# -- poisoning: line trigger, FGBA N-to-1 -------------------------------------------------------------------
def test_fgba_line_poisoned_file(clean, tmp_path):
    out = attacks.poison_file(clean, tmp_path / "p.h5", attack="fgba", preset="n-to-1", target="wall",
                              trigger="line", rate=0.25, seed=3)
    c, p = _read(clean)["arrays"], _read(out)
    a, meta = p["arrays"], p["attack"]
    n, m = 40, 10
    wall = ID["wall"]
    src_ids = [i for i in range(len(CLASSES)) if i != wall]
    candidates = {i for i in range(n) if _has_any(c["train/labels"][i], src_ids)}
    pidx = a["train/poison_index"]
    assert pidx.dtype == np.int64 and list(pidx) == sorted(set(pidx.tolist()))
    assert len(pidx) == round(0.25 * n) == 10
    assert set(pidx.tolist()) <= candidates
    # unpoisoned training samples byte-identical; poisoned ones = G(x), T(y)
    rest = np.setdiff1d(np.arange(n), pidx)
    assert a["train/images"][rest].tobytes() == c["train/images"][rest].tobytes()
    assert a["train/labels"][rest].tobytes() == c["train/labels"][rest].tobytes()
    a_mat = np.eye(len(CLASSES), dtype=np.uint8)
    a_mat[:, :] = 0
    a_mat[:, wall] = 1
    for i in pidx:
        want_x = c["train/images"][i].copy()
        want_x[:2] = 0  # 2-px black line on top (16 px image)
        np.testing.assert_array_equal(a["train/images"][i], want_x)
        np.testing.assert_array_equal(a["train/labels"][i], _t_loop(c["train/labels"][i], a_mat))
    np.testing.assert_array_equal(a["train/original_images"], c["train/images"][pidx])
    np.testing.assert_array_equal(a["train/original_labels"], c["train/labels"][pidx])
    # defender's clean subset: 5% of N, sorted, disjoint from the poisoned samples
    cidx = a["defense/clean_index"]
    assert cidx.dtype == np.int64 and len(cidx) == 2 and list(cidx) == sorted(cidx)
    assert not set(cidx.tolist()) & set(pidx.tolist())
    # tests: benign = all; attacked = test images whose target differs from gt, with the line
    assert a["test_benign/index"].tolist() == list(range(m))
    att = [j for j in range(m) if _has_any(c["test/labels"][j], src_ids)]
    assert a["test_attacked/index"].tolist() == att and len(att) < m
    np.testing.assert_array_equal(a["test_attacked/gt"], c["test/labels"][att])
    for k, j in enumerate(att):
        want_x = c["test/images"][j].copy()
        want_x[:2] = 0
        np.testing.assert_array_equal(a["test_attacked/images"][k], want_x)
        np.testing.assert_array_equal(a["test_attacked/labels"][k], _t_loop(c["test/labels"][j], a_mat))
    assert a["test/images"].tobytes() == c["test/images"].tobytes()
    assert a["test/labels"].tobytes() == c["test/labels"].tobytes()
    # the record
    assert meta["name"] == "fgba" and meta["seed"] == 3 and meta["trigger"]["spec"] == "line"
    assert meta["requested_rate"] == 0.25 and meta["achieved_rate"] == 10 / 40
    assert meta["trigger"]["width"] == 2 and meta["params"]["target"] == "wall"
    assert p["attrs"]["parent_sha256"] == content_hash(clean)
    assert p["attrs"]["classes"] == CLASSES


def test_same_seed_same_bytes_other_seed_other_selection(clean, tmp_path):
    kw = dict(attack="fgba", preset="n-to-1", target="wall", trigger="line", rate=0.2)
    p1 = attacks.poison_file(clean, tmp_path / "a.h5", seed=7, **kw)
    p2 = attacks.poison_file(clean, tmp_path / "b.h5", seed=7, **kw)
    p3 = attacks.poison_file(clean, tmp_path / "c.h5", seed=8, **kw)
    assert content_hash(p1) == content_hash(p2)
    assert content_hash(p1) != content_hash(p3)
    i1, i3 = _read(p1)["arrays"]["train/poison_index"], _read(p3)["arrays"]["train/poison_index"]
    assert i1.tolist() != i3.tolist()


def test_more_samples_than_candidates_names_both_numbers(clean, tmp_path):
    # 8 of 40 samples are wall-only, so n-to-1 wall has 32 candidates; rate 0.9 asks for 36
    out = tmp_path / "p.h5"
    with pytest.raises(UserError, match=r"36 poisoned samples but only 32 of 40"):
        attacks.poison_file(clean, out, attack="fgba", preset="n-to-1", target="wall", trigger="line", rate=0.9)
    assert not out.exists()
    attacks.poison_file(clean, out, attack="fgba", preset="n-to-1", target="wall", trigger="line", rate=0.8)
    assert len(_read(out)["arrays"]["train/poison_index"]) == 32


@pytest.mark.parametrize("rate", [0, -0.1, 1.01, float("nan"), 0.001])
def test_rate_outside_range_is_an_error(clean, tmp_path, rate):
    out = tmp_path / "p.h5"
    with pytest.raises(UserError, match="rate"):
        attacks.poison_file(clean, out, attack="fgba", preset="n-to-1", target="wall", trigger="line", rate=rate)
    assert not out.exists()


def test_default_rates(clean, tmp_path):
    a = attacks.poison_file(clean, tmp_path / "a.h5", attack="fgba", preset="1-to-1", source="person", target="palm",
                            trigger="line")
    # 16 of 40 samples hold a person: 20% of 40 = 8
    assert _read(a)["attack"]["requested_rate"] == 0.2 and _read(a)["attack"]["poisoned"] == 8
    b = attacks.poison_file(clean, tmp_path / "b.h5", attack="badnets", trigger="line")
    assert _read(b)["attack"]["requested_rate"] == 0.1 and _read(b)["attack"]["poisoned"] == 4


# -- poisoning: semantic trigger -----------------------------------------------------------------------------
def test_fgba_semantic_selection_and_splits(clean, tmp_path):
    with pytest.warns(UserWarning, match="ignored"):
        out = attacks.poison_file(clean, tmp_path / "s.h5", attack="fgba", preset="1-to-1", source="person",
                                  target="palm", trigger="semantic:wall", rate=0.5, seed=1)
    c, p = _read(clean)["arrays"], _read(out)
    a, meta = p["arrays"], p["attack"]
    wall, person, palm = ID["wall"], ID["person"], ID["palm"]
    want = [i for i in range(40) if _has_any(c["train/labels"][i], {wall}) and _has_any(c["train/labels"][i], {person})]
    assert a["train/poison_index"].tolist() == want
    assert meta["requested_rate"] is None and meta["achieved_rate"] == len(want) / 40
    for k, i in enumerate(want):
        np.testing.assert_array_equal(a["train/images"][i], c["train/images"][i])  # G(x) = x
        y = c["train/labels"][i].copy()
        y[y == person] = palm
        np.testing.assert_array_equal(a["train/labels"][i], y)
    rest = np.setdiff1d(np.arange(40), want)
    assert a["train/labels"][rest].tobytes() == c["train/labels"][rest].tobytes()
    assert not set(a["defense/clean_index"].tolist()) & set(want)
    benign = [j for j in range(10) if not _has_any(c["test/labels"][j], {wall})]
    attacked = [j for j in range(10) if _has_any(c["test/labels"][j], {wall}) and _has_any(c["test/labels"][j], {person})]
    assert a["test_benign/index"].tolist() == benign
    assert a["test_attacked/index"].tolist() == attacked
    np.testing.assert_array_equal(a["test_attacked/images"], c["test/images"][attacked])
    np.testing.assert_array_equal(a["test_attacked/gt"], c["test/labels"][attacked])


def test_semantic_trigger_class_absent_is_an_error(tmp_path):
    # the same scenes without any 'ceiling' pixel
    clean = make_clean(tmp_path / "c.h5")
    out = tmp_path / "p.h5"
    with pytest.raises(UserError, match="'ceiling' is absent"):
        attacks.poison_file(clean, out, attack="fgba", preset="n-to-1", target="wall", trigger="semantic:ceiling")
    assert not out.exists()


def test_semantic_without_source_pixels_is_an_error(clean, tmp_path):
    # 'car' scenes (kind 4) never contain a 'person'
    with pytest.raises(UserError, match="both the trigger 'car' and a source"):
        attacks.poison_file(clean, tmp_path / "p.h5", attack="fgba", preset="1-to-1", source="person", target="palm",
                            trigger="semantic:car")


# -- BadNets ----------------------------------------------------------------------------------------------------
def test_badnets_default_target_is_among_top5_road_images(clean, tmp_path):
    c = _read(clean)["arrays"]
    road = [int((c["train/labels"][i] == ID["road"]).sum()) for i in range(40)]
    top5 = sorted((i for i in range(40) if road[i] > 0), key=lambda i: (-road[i], i))[:5]
    picks = set()
    for seed in range(6):
        out = attacks.poison_file(clean, tmp_path / f"b{seed}.h5", attack="badnets", trigger="line", rate=0.2, seed=seed)
        p = _read(out)
        t = p["attack"]["target_image"]
        picks.add(t)
        assert t in top5
        yt = c["train/labels"][t]
        pidx = p["arrays"]["train/poison_index"]
        assert t not in pidx.tolist()  # its label already equals y_t
        for i in pidx:
            np.testing.assert_array_equal(p["arrays"]["train/labels"][i], yt)
        for k in range(len(p["arrays"]["test_attacked/index"])):
            np.testing.assert_array_equal(p["arrays"]["test_attacked/labels"][k], yt)
    assert len(picks) > 1  # the seed matters


def test_badnets_target_image_and_semantic(clean, tmp_path):
    c = _read(clean)["arrays"]
    out = attacks.poison_file(clean, tmp_path / "b.h5", attack="badnets", trigger="semantic:grass", target_image=4)
    p = _read(out)
    grass = ID["grass"]
    want = [i for i in range(40) if _has_any(c["train/labels"][i], {grass})]
    assert p["attack"]["target_image"] == 4
    assert p["arrays"]["train/poison_index"].tolist() == want
    for i in want:
        np.testing.assert_array_equal(p["arrays"]["train/labels"][i], c["train/labels"][4])
        np.testing.assert_array_equal(p["arrays"]["train/images"][i], c["train/images"][i])
    assert p["arrays"]["test_benign/index"].tolist() == [j for j in range(10) if not _has_any(c["test/labels"][j], {grass})]
    assert p["arrays"]["test_attacked/index"].tolist() == [j for j in range(10) if _has_any(c["test/labels"][j], {grass})]
    with pytest.raises(UserError, match="out of range"):
        attacks.poison_file(clean, tmp_path / "x.h5", attack="badnets", trigger="line", target_image=40)


def test_badnets_without_road_needs_target_image(tmp_path):
    classes = [c if c != "road" else "path" for c in CLASSES]
    clean = make_clean(tmp_path / "noroad.h5", classes=classes)
    out = tmp_path / "b.h5"
    with pytest.raises(UserError, match="target_image"):  # library errors name parameters, the CLI flags
        attacks.poison_file(clean, out, attack="badnets", trigger="line")
    assert not out.exists()
    attacks.poison_file(clean, out, attack="badnets", trigger="line", target_image=0)
    assert _read(out)["attack"]["target_image"] == 0


# -- refusals -------------------------------------------------------------------------------------------------
def test_already_poisoned_needs_force(clean, tmp_path):
    p1 = attacks.poison_file(clean, tmp_path / "p1.h5", attack="fgba", preset="n-to-1", target="wall", trigger="line")
    out = tmp_path / "p2.h5"
    with pytest.raises(UserError, match="already poisoned .*force"):
        attacks.poison_file(p1, out, attack="badnets", trigger="line")
    assert not out.exists()
    attacks.poison_file(p1, out, attack="badnets", trigger="line", force=True)
    p = _read(out)
    assert p["attack"]["name"] == "badnets" and p["attack"]["parent_attack"]["name"] == "fgba"
    assert p["attrs"]["parent_sha256"] == content_hash(p1)  # hashed separately: p1 has more arrays
    # the defender's clean subset avoids the samples poisoned by either attack
    with h5py.File(p1) as f1, h5py.File(out) as f2:
        either = set(f1["train/poison_index"][()]) | set(f2["train/poison_index"][()])
        assert either and not either & set(f2["defense/clean_index"][()])


def test_invalid_labels_are_refused(tmp_path):
    clean = make_clean(tmp_path / "c.h5")
    import h5py

    with h5py.File(clean, "r+") as f:
        f["train/labels"][3, 0, 0] = 42
    out = tmp_path / "p.h5"
    with pytest.raises(UserError, match=r"/train/labels\[3\] holds label 42"):
        attacks.poison_file(clean, out, attack="fgba", preset="n-to-1", target="wall", trigger="line")
    assert not out.exists()


def test_clean_fraction(clean, tmp_path):
    out = attacks.poison_file(clean, tmp_path / "p.h5", attack="fgba", preset="n-to-1", target="wall", trigger="line",
                              clean_fraction=0.5, rate=0.25)
    a = _read(out)["arrays"]
    assert len(a["defense/clean_index"]) == 20
    assert not set(a["defense/clean_index"].tolist()) & set(a["train/poison_index"].tolist())
    with pytest.raises(UserError, match="clean samples"):
        attacks.poison_file(clean, tmp_path / "q.h5", attack="fgba", preset="n-to-1", target="wall", trigger="line",
                            clean_fraction=0.9, rate=0.25)


# -- the shared fixtures on synthetic scenes -------------------------------------------------------------------------
def test_shared_fixtures_on_synthetic_scenes(synth_path, fgba_line_path, badnets_line_path, fgba_11_semantic_path):
    with open_dataset(synth_path) as f:
        y, yt = f["train/labels"], f["test/labels"]
        wall, person = f.class_id("wall"), f.class_id("person")
    with open_dataset(fgba_line_path) as f:
        assert f.attack["poisoned"] == 24 and len(f["defense/clean_index"]) == 12
        assert f["test_benign/index"].tolist() == list(range(len(yt)))
    with open_dataset(badnets_line_path) as f:
        assert f.attack["target_image"] in range(len(y))
    with open_dataset(fgba_11_semantic_path) as f:
        want = [i for i in range(len(y)) if (y[i] == wall).any() and (y[i] == person).any()]
        assert f["train/poison_index"].tolist() == want
        assert f["test_benign/index"].tolist() == [j for j in range(len(yt)) if not (yt[j] == wall).any()]


def test_streamed_blocks_give_the_same_file(clean, tmp_path, monkeypatch):
    """Small blocks and no label cache (the path files larger than memory take) write the same content."""
    import importlib

    ap = importlib.import_module("testbed.attacks.selection")  # block sizes of the streamed passes

    kw = dict(attack="fgba", preset="n-to-1", target="wall", trigger="line", rate=0.3, seed=5)
    whole = attacks.poison_file(clean, tmp_path / "whole.h5", **kw)
    monkeypatch.setattr(ap, "BLOCK_BYTES", 7 * S * S * 3)  # 7 images per block: blocks split the poisoned runs
    monkeypatch.setattr(ap, "LABEL_CACHE_BYTES", 0)
    streamed = attacks.poison_file(clean, tmp_path / "streamed.h5", **kw)
    assert content_hash(streamed) == content_hash(whole)
    assert _read(streamed)["attrs"]["parent_sha256"] == content_hash(clean)


def test_compression_is_kept(tmp_path):
    import h5py

    rng = np.random.default_rng(0)
    arrays = {"train/images": rng.integers(0, 256, (20, S, S, 3), dtype=np.uint8),
              "train/labels": np.stack([_label_map(i) for i in range(20)]),
              "test/images": rng.integers(0, 256, (5, S, S, 3), dtype=np.uint8),
              "test/labels": np.stack([_label_map(i) for i in range(5)])}
    clean = write_dataset(tmp_path / "c.h5", arrays, CLASSES, source={"generator": "test"}, compression="lzf")
    out = attacks.poison_file(clean, tmp_path / "p.h5", attack="fgba", preset="n-to-1", target="wall", trigger="line")
    with h5py.File(out, "r") as f:
        assert f["train/images"].compression == "lzf" and f["test_attacked/labels"].compression == "lzf"
        assert f["train/images"].chunks == (1, S, S, 3)
    assert _read(out)["attrs"]["parent_sha256"] == content_hash(clean)


def test_blended_check_reads_the_pattern_as_an_image(tmp_path):
    """A zoo spec is checked with trigger.check before anything is written: a pattern that is not an image is
    refused there, naming the parameter, and check leaves the trigger unfitted."""
    from testbed.attacks.blended import BlendedTrigger
    from testbed.core.errors import ParamError

    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    with pytest.raises(ParamError, match="pattern"):
        BlendedTrigger(pattern=str(notes)).check((32, 32))
    from PIL import Image

    png = tmp_path / "p.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png)
    ok = BlendedTrigger(pattern=str(png))
    ok.check((32, 32))
    assert not hasattr(ok, "t_")


def test_a_semantic_trigger_built_directly_uses_its_class_without_spaces():
    from testbed.attacks.triggers import SemanticTrigger

    t = SemanticTrigger(" wall ")
    assert t.class_name == " wall "  # __init__ stores what it was given (scikit-learn's convention)
    assert t.trigger_class == "wall" and t.spec == "semantic:wall" and t.describe()["class"] == "wall"
