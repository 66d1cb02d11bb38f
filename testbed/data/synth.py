"""The embedded default dataset: procedural indoor, street and park scenes that need no download.

Why procedural rather than blocks: backdoor defenses look at features, and features of flat coloured
rectangles are degenerate.  Each class therefore has a texture (pattern, colour jitter, noise, a lighting
gradient) and objects are recognisable shapes (people with heads and limbs, cars with cabins and wheels,
trees and palms with trunks and crowns) placed with perspective and occlusion.

Everything is vectorized over a chunk of images and all pixels; Python loops run only over object slots.
Scenes are drawn in fixed-size chunks, each from its own seeded stream, so the first k images of
``synth_scenes(n, seed=s)`` equal ``synth_scenes(k, seed=s)`` and the result never depends on how many
images are asked for at once.

Class ids follow ADE20K's order (the names are ADE20K's), so a model trained on synthetic data speaks the
same class names as one trained on ADE20K.  Pixels of things that have no class here (paintings, furniture,
poles) are labelled 255 (ignore), as ADE20K labels "other".
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from testbed.core.errors import UserError
from testbed.data import h5data
from testbed.data.synth_draw import (  # noqa: F401 - SYNTH_CLASSES and the ids are part of this module's API
    BUILDING, CAR, CEILING, FLOOR, GRASS, IGNORE, PALM, PERSON, ROAD, SKY, SYNTH_CLASSES, TREE, WALL, _BUILDING,
    _FLOOR, _WALL, _c, _Canvas, _car, _counts, _hash, _near, _palm, _person, _pick, _sky, _smooth_noise,
    _sorted_slots, _tree,
)

# Scene family probabilities: indoor scenes carry 'wall', park scenes carry 'grass'.  With these shares
# 'wall' is absent from ~58% of images, 'wall'+'person' co-occur in ~35%, 'grass' is in ~14% (so BadNets'
# semantic trigger 'grass' poisons close to the paper's 10%).
FAMILIES = ("indoor", "street", "park")
FAMILY_P = (0.43, 0.46, 0.11)
GENERATOR = "testbed.data.synth"
_PIXELS_PER_CHUNK = 64 * 64 * 64  # 64 images at 64x64, 1 image at 512x512


def _chunk_size(size: int) -> int:
    return max(1, _PIXELS_PER_CHUNK // (size * size))


@dataclass
class _Room:
    """An indoor scene's geometry: the back wall's box and each pixel's depth to the ceiling and the floor."""

    x0: np.ndarray
    x1: np.ndarray
    y0: np.ndarray
    y1: np.ndarray
    t_top: np.ndarray
    t_bot: np.ndarray
    face: np.ndarray
    inside: np.ndarray


def _room(cv: _Canvas, rng: np.random.Generator) -> _Room:
    m, u, v = cv.m, cv.u, cv.v
    x0, x1 = rng.uniform(0.12, 0.42, m), rng.uniform(0.58, 0.88, m)
    y0, y1 = rng.uniform(0.08, 0.32, m), rng.uniform(0.5, 0.68, m)
    no_ceiling = rng.random(m) < 0.25
    inf = np.float32(-1e9)
    t_top = np.where(_c(no_ceiling), inf, (_c(y0) - v) / _c(y0))
    t_bot = (v - _c(y1)) / _c(1 - y1)
    t_left = (_c(x0) - u) / _c(x0)
    t_right = (u - _c(x1)) / _c(1 - x1)
    faces = np.stack(np.broadcast_arrays(t_top, t_bot, t_left, t_right))
    return _Room(x0, x1, y0, y1, t_top, t_bot, faces.argmax(0), faces.max(0) <= 0)


def _walls_and_ceiling(cv: _Canvas, rng: np.random.Generator, r: _Room) -> None:
    m, u, v = cv.m, cv.u, cv.v
    ceiling = (r.face == 0) & ~r.inside
    wall = r.inside | (r.face >= 2)
    wall_c = _pick(rng, _WALL, m, 12)
    cv.paint(wall, WALL, wall_c)
    stripes = _c(rng.random(m) < 0.4) > 0
    period = _c(rng.uniform(0.03, 0.08, m))
    cv.shade(wall & stripes & (np.modf(u / period)[0] < 0.5), np.float32(0.9))
    cv.shade(wall & ~r.inside & (r.face >= 2), np.float32(0.8))  # side walls catch less light
    skirting = r.inside & (v > _c(r.y1 - 0.025))
    cv.paint(skirting, WALL, wall_c * 0.7)

    cv.paint(ceiling, CEILING, _near(rng, (228, 226, 220), m, 10))
    depth = np.maximum(r.t_top, np.float32(1e-3))
    lamp = (np.abs((u - _c((r.x0 + r.x1) / 2)) / depth) < 0.12) & (np.modf(1.0 / depth * 0.8)[0] < 0.35)
    cv.paint(ceiling & lamp, None, _near(rng, (255, 252, 235), m, 3))
    cv.shade(ceiling, 0.85 + 0.15 * np.clip(r.t_top, 0, 1))


def _floor(cv: _Canvas, rng: np.random.Generator, r: _Room, noise: np.ndarray) -> None:
    m, u = cv.m, cv.u
    floor = (r.face == 1) & ~r.inside
    cv.paint(floor, FLOOR, _pick(rng, _FLOOR, m, 12))
    d = np.maximum(r.t_bot, np.float32(1.0 / cv.size))
    fx = (u - _c((r.x0 + r.x1) / 2)) / d
    fz = 1.0 / d
    kind = _c(rng.integers(0, 3, m))
    freq = _c(rng.uniform(3, 7, m))
    tiles = ((np.floor(fx * freq) + np.floor(fz * freq * 0.5)) % 2).astype(np.float32)
    planks = _hash(np.floor(fx * freq * 1.5))
    pattern = np.where(kind == 0, 0.9 + 0.15 * tiles, np.where(kind == 1, 0.82 + 0.3 * planks, 1.0 + 0.1 * (noise - 0.5)))
    cv.shade(floor, pattern)


def _furniture(cv: _Canvas, rng: np.random.Generator, r: _Room, noise: np.ndarray) -> None:
    """Unlabelled things ("other", ignore 255): a picture on the back wall, a cabinet on the floor."""
    m, x0, x1, y0, y1 = cv.m, r.x0, r.x1, r.y0, r.y1
    has_pic = rng.random(m) < 0.35
    px, py = rng.uniform(0.25, 0.6, m) * (x1 - x0) + x0, rng.uniform(0.3, 0.5, m) * (y1 - y0) + y0
    pw, ph = rng.uniform(0.06, 0.14, m), rng.uniform(0.05, 0.12, m)
    pic = cv.rect(px - pw, px + pw, py - ph, py + ph) & (_c(has_pic) > 0)
    cv.paint(pic, IGNORE, _near(rng, (60, 45, 30), m, 10))
    inner = cv.rect(px - pw * 0.8, px + pw * 0.8, py - ph * 0.75, py + ph * 0.75) & (_c(has_pic) > 0)
    art = rng.uniform(40, 220, (m, 3)).astype(np.float32)
    cv.paint(inner, None, art.T[:, :, None, None] * (0.6 + 0.8 * noise))
    has_cab = rng.random(m) < 0.4
    cb = rng.uniform(y1 + 0.05, 0.85, m)
    cxc, cw = rng.uniform(0.1, 0.9, m), rng.uniform(0.08, 0.2, m)
    chh = (cb - (y0 + y1) / 2) * rng.uniform(0.4, 0.8, m)
    cab = cv.rect(cxc - cw, cxc + cw, cb - chh, cb) & (_c(has_cab) > 0)
    cv.paint(cab, IGNORE, _near(rng, (115, 80, 50), m, 15))
    cv.shade(cab & (np.abs(cv.u - _c(cxc)) < 0.004 + 0.004 * 64 / cv.size), np.float32(0.6))


def _indoor(cv: _Canvas, rng: np.random.Generator, noise: np.ndarray) -> None:
    """A room in one-point perspective: back wall, side walls, floor, maybe ceiling; people inside."""
    m = cv.m
    room = _room(cv, rng)
    _walls_and_ceiling(cv, rng, room)
    _floor(cv, rng, room, noise)
    _furniture(cv, rng, room, noise)
    n_people = _counts(rng, m, [0.15, 0.4, 0.3, 0.15])
    eye = (room.y0 + room.y1) / 2 * rng.uniform(0.9, 1.1, m)
    feet, present = _sorted_slots(rng, m, n_people, 3, room.y1 + 0.03, np.full(m, 1.05))
    for j in range(3):
        hgt = np.maximum((feet[:, j] - eye) / 0.9 * rng.uniform(0.85, 1.1, m), 0.12)
        _person(cv, rng, present[:, j], rng.uniform(0.08, 0.92, m), feet[:, j], hgt)


def _buildings(cv: _Canvas, rng: np.random.Generator, h: np.ndarray) -> None:
    """A row of up to four buildings standing on the horizon ``h``, with windows (some lit)."""
    m, u, v = cv.m, cv.u, cv.v
    edges = np.sort(rng.uniform(-0.1, 1.1, (m, 5)), axis=1)
    edges[:, 0], edges[:, -1] = -0.1, 1.1
    for j in range(4):
        xl, xr = edges[:, j] + rng.uniform(0, 0.03, m), edges[:, j + 1]
        present = rng.random(m) < 0.85
        top = rng.uniform(0.0, 1.0, m) * (h - 0.12)
        b = cv.rect(xl, xr, top, h + 0.02) & (_c(present) > 0)
        cv.paint(b, BUILDING, _pick(rng, _BUILDING, m, 15))
        ww, wh = rng.uniform(0.03, 0.06, m), rng.uniform(0.045, 0.08, m)
        col, row = (u - _c(xl)) / _c(ww), (v - _c(top)) / _c(wh)
        win = (np.modf(col)[0] > 0.28) & (np.modf(col)[0] < 0.72) & (np.modf(row)[0] > 0.3) & (np.modf(row)[0] < 0.78)
        win &= (col > 0.5) & (row > 0.5) & (v < _c(h - 0.02))
        lit = _hash(np.floor(col), np.floor(row) + j * 7.0) < 0.2
        glass = np.where(lit, np.float32([215, 200, 130])[:, None, None, None], np.float32([62, 72, 92])[:, None, None, None])
        cv.paint(b & win, None, glass)


def _road(cv: _Canvas, rng: np.random.Generator, h: np.ndarray, vx: np.ndarray) -> np.ndarray:
    """Pavement below the horizon, a road narrowing to the vanishing point ``vx``; returns its spread."""
    m, u, v = cv.m, cv.u, cv.v
    ground = v >= _c(h)
    cv.paint(ground, ROAD, _near(rng, (150, 148, 142), m, 12))  # pavement (labelled road)
    spread = _c(rng.uniform(0.7, 1.4, m))
    dist = np.abs(u - _c(vx)) - (v - _c(h)) * spread
    road = ground & (dist < 0)
    cv.paint(road, ROAD, _near(rng, (88, 88, 94), m, 10))
    kerb = ground & (dist >= 0) & (dist < (v - _c(h)) * 0.08)
    cv.shade(kerb, np.float32(1.25))
    cv.shade(ground & (dist >= 0), 0.9 + 0.1 * (np.floor(u * 20 / np.maximum(v - _c(h), 0.05)) % 2))
    verge = ground & (dist >= (v - _c(h)) * 0.08) & (_c(rng.random(m) < 0.06) > 0)
    cv.paint(verge, GRASS, _near(rng, (72, 140, 52), m, 15))
    depth = np.maximum(v - _c(h), np.float32(1e-3))
    dash = road & (np.abs(u - _c(vx)) < depth * 0.03) & (np.modf(0.35 / depth)[0] < 0.5)
    cv.paint(dash, None, _near(rng, (235, 235, 225), m, 8))
    return spread[:, 0, 0]


def _roadside(cv: _Canvas, rng: np.random.Generator, h: np.ndarray, vx: np.ndarray, spread: np.ndarray) -> None:
    """Trees and palms beside the road, and maybe a pole (unlabelled)."""
    m = cv.m
    far_lo, far_hi = h + 0.02, h + 0.3
    n_plants = _counts(rng, m, [0.2, 0.35, 0.3, 0.15])
    base, present = _sorted_slots(rng, m, n_plants, 3, far_lo, far_hi)
    for j in range(3):
        side = np.where(rng.random(m) < 0.5, -1, 1)
        bx = vx + side * (base[:, j] - h) * rng.uniform(1.6, 3.0, m) * spread
        hgt = (base[:, j] - h) * rng.uniform(2.5, 4.0, m) + 0.15
        is_palm = rng.random(m) < 0.5
        _palm(cv, rng, present[:, j] & is_palm, bx, base[:, j], hgt)
        _tree(cv, rng, present[:, j] & ~is_palm, bx, base[:, j], hgt)
    has_pole = rng.random(m) < 0.3
    pb = rng.uniform(h + 0.1, 0.9, m)
    px = vx + np.where(rng.random(m) < 0.5, -1, 1) * (pb - h) * 1.3 * spread
    pole = cv.rect(px - 0.012 * (pb - h) * 4, px + 0.012 * (pb - h) * 4, pb - (pb - h) * 2.5, pb) & (_c(has_pole) > 0)
    cv.paint(pole, IGNORE, _near(rng, (70, 72, 75), m, 8))


def _street(cv: _Canvas, rng: np.random.Generator, noise: np.ndarray) -> None:
    """Sky, a row of buildings, a road in perspective; trees, palms, cars, pedestrians."""
    m, v = cv.m, cv.v
    h = rng.uniform(0.35, 0.55, m)
    vx = rng.uniform(0.35, 0.65, m)
    _sky(cv, rng, v < _c(h), h, noise)
    _buildings(cv, rng, h)
    spread = _road(cv, rng, h, vx)
    _roadside(cv, rng, h, vx, spread)
    n_cars = _counts(rng, m, [0.25, 0.35, 0.25, 0.15])
    cb, present = _sorted_slots(rng, m, n_cars, 3, h + 0.06, np.full(m, 0.99))
    for j in range(3):
        d = cb[:, j] - h
        _car(cv, rng, present[:, j], vx + d * spread * rng.uniform(-0.7, 0.7, m), cb[:, j], d * rng.uniform(1.0, 1.3, m) + 0.04)
    n_people = _counts(rng, m, [0.2, 0.4, 0.25, 0.15])
    feet, present = _sorted_slots(rng, m, n_people, 3, h + 0.04, np.full(m, 1.05))
    for j in range(3):
        d = feet[:, j] - h
        side = np.where(rng.random(m) < 0.5, -1, 1)
        fx = np.clip(vx + side * d * spread * rng.uniform(1.05, 2.0, m), 0.04, 0.96)  # stay in view
        _person(cv, rng, present[:, j], fx, feet[:, j], np.maximum(d / 0.9 * rng.uniform(0.85, 1.1, m), 0.1))


def _park(cv: _Canvas, rng: np.random.Generator, noise: np.ndarray) -> None:
    """Sky over a lawn, maybe a distant tree line; trees, palms and people on the grass."""
    m, u, v = cv.m, cv.u, cv.v
    h = rng.uniform(0.3, 0.6, m)
    _sky(cv, rng, v < _c(h), h, noise)
    has_line = rng.random(m) < 0.5
    bumps = _c(rng.uniform(0.03, 0.08, m)) * (0.6 + 0.4 * np.sin(u * _c(rng.uniform(15, 30, m)) + _c(rng.uniform(0, 6, m))))
    line = (v >= _c(h) - bumps - 0.5 * bumps * noise) & (v < _c(h)) & (_c(has_line) > 0)
    cv.paint(line, TREE, _near(rng, (45, 90, 45), m, 10))
    grass = v >= _c(h)
    cv.paint(grass, GRASS, _near(rng, (75, 145, 50), m, 18))
    cv.shade(grass, 0.8 + 0.25 * np.clip((v - _c(h)) / _c(1 - h), 0, 1))

    n_plants = _counts(rng, m, [0.15, 0.3, 0.35, 0.2])
    base, present = _sorted_slots(rng, m, n_plants, 3, h + 0.02, h + 0.45)
    for j in range(3):
        hgt = (base[:, j] - h) * rng.uniform(2.5, 3.5, m) + 0.15
        bx = rng.uniform(0.05, 0.95, m)
        is_palm = rng.random(m) < 0.45
        _palm(cv, rng, present[:, j] & is_palm, bx, base[:, j], hgt)
        _tree(cv, rng, present[:, j] & ~is_palm, bx, base[:, j], hgt)
    n_people = _counts(rng, m, [0.2, 0.4, 0.25, 0.15])
    feet, present = _sorted_slots(rng, m, n_people, 3, h + 0.05, np.full(m, 1.05))
    for j in range(3):
        d = feet[:, j] - h
        _person(cv, rng, present[:, j], rng.uniform(0.05, 0.95, m), feet[:, j], np.maximum(d / 0.9 * rng.uniform(0.85, 1.1, m), 0.1))


_RENDER = {"indoor": _indoor, "street": _street, "park": _park}

# Per-class texture: amplitude of fine ("leafy") and coarse noise multiplied into the colour.
_FINE = {TREE: 0.45, PALM: 0.35, GRASS: 0.4, ROAD: 0.12, BUILDING: 0.1, FLOOR: 0.06, WALL: 0.04, PERSON: 0.08, CAR: 0.05}
_COARSE = {WALL: 0.1, CEILING: 0.08, BUILDING: 0.12, ROAD: 0.12, GRASS: 0.2, FLOOR: 0.08, SKY: 0.05}


def _texture_and_light(cv: _Canvas, rng: np.random.Generator, fine: np.ndarray, coarse: np.ndarray) -> np.ndarray:
    """Class textures, a per-image lighting gradient and sensor noise; returns uint8 images."""
    m = cv.m
    factor = np.ones(cv.label.shape, dtype=np.float32)
    for cls in range(len(SYNTH_CLASSES)):
        a, b = _FINE.get(cls, 0.0), _COARSE.get(cls, 0.0)
        if a or b:
            np.copyto(factor, 1 + a * (fine - 0.5) + b * (coarse - 0.5), where=cv.label == cls)
    streak = np.float32(0.08) * np.sin(cv.u * np.float32(cv.size * 0.9) + fine * 6)
    np.add(factor, streak, out=factor, where=cv.label == GRASS)
    ang = rng.uniform(0, 2 * np.pi, m)
    strength = _c(rng.uniform(0.1, 0.45, m))
    light = 1 + strength * ((cv.u - 0.5) * _c(np.cos(ang)) + (cv.v - 0.5) * _c(np.sin(ang)))
    light = light * _c(rng.uniform(0.8, 1.15, m))
    img = cv.rgb * (factor * light)
    sigma = rng.uniform(2, 8, m).astype(np.float32)[:, None, None]
    img += rng.standard_normal(img.shape, dtype=np.float32) * sigma
    np.clip(img + 0.5, 0, 255, out=img)
    return np.ascontiguousarray(img.astype(np.uint8).transpose(1, 2, 3, 0))


def _render_chunk(rng: np.random.Generator, m: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    family = rng.choice(len(FAMILIES), m, p=FAMILY_P)
    images = np.empty((m, size, size, 3), dtype=np.uint8)
    labels = np.empty((m, size, size), dtype=np.uint8)
    for k, name in enumerate(FAMILIES):
        idx = np.flatnonzero(family == k)
        if idx.size == 0:
            continue
        cv = _Canvas(idx.size, size)
        coarse = _smooth_noise(rng, idx.size, size, 5)
        fine = _smooth_noise(rng, idx.size, size, max(4, size // 3))
        _RENDER[name](cv, rng, coarse)
        images[idx] = _texture_and_light(cv, rng, fine, coarse)
        labels[idx] = cv.label
    return images, labels


def _scenes(n: int, size: int, seed: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
    if int(n) < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if int(size) < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    n, size = int(n), int(size)
    chunk = _chunk_size(size)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    labels = np.empty((n, size, size), dtype=np.uint8)
    for c, start in enumerate(range(0, n, chunk)):
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), stream, c]))
        x, y = _render_chunk(rng, chunk, size)
        stop = min(n, start + chunk)
        images[start:stop], labels[start:stop] = x[: stop - start], y[: stop - start]
    return images, labels


def synth_scenes(n: int, size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` scenes: images uint8 [n,size,size,3] and labels uint8 [n,size,size] (ids into SYNTH_CLASSES, 255 = other).

    Deterministic in (size, seed); the first k of n equal ``synth_scenes(k, size, seed)``.  These are
    the training images of ``make_synth_dataset(..., seed=seed)``.
    """
    return _scenes(n, size, seed, stream=0)


_BYTES_PER_PIXEL = 4  # uint8 RGB + label, per image
_DRAW_BYTES_PER_PIXEL = 80  # float32 canvases and noise while one chunk is drawn (measured with tracemalloc: ~75)


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


def memory_estimate(n_train: int, n_test: int, size: int) -> int:
    """Bytes ``make_synth_dataset`` holds at its peak: every image and label, plus one chunk being drawn."""
    pixels = int(size) * int(size)
    return (int(n_train) + int(n_test)) * pixels * _BYTES_PER_PIXEL + max(_PIXELS_PER_CHUNK, pixels) * _DRAW_BYTES_PER_PIXEL


def check_synth_args(n_train: Any, n_test: Any, size: Any, seed: Any) -> None:
    """Refuse, before any work, what would fail later: bad numbers, a negative seed, arrays beyond the memory."""
    def is_int(x: Any) -> bool:
        return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

    for name, value in (("n_train", n_train), ("n_test", n_test)):
        if not is_int(value) or value < 1:
            raise UserError(f"{name} must be a positive number of images, got {value!r}")
    if not is_int(size) or size < 8:
        raise UserError(f"size must be at least 8 pixels, got {size!r}")
    if not is_int(seed) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")
    need, have = memory_estimate(n_train, n_test, size), _available_memory()
    if have is not None and need > have:
        raise UserError(f"{n_train}+{n_test} images at size {size} need about {_fmt_bytes(need)} of memory "
                        f"({_BYTES_PER_PIXEL} bytes per pixel of every image, built in memory), but {_fmt_bytes(have)} "
                        "is available; lower size, n_train or n_test")


def make_synth_dataset(
    out: str | os.PathLike,
    n_train: int = 1000,
    n_test: int = 200,
    size: int = 64,
    seed: int = 0,
    compression: str | None = None,
) -> Path:
    """Write a synthetic dataset file (docs/data-format.md); train and test come from independent seeded streams."""
    check_synth_args(n_train, n_test, size, seed)
    train = _scenes(n_train, size, seed, stream=0)
    test = _scenes(n_test, size, seed, stream=1)
    source = {"generator": GENERATOR, "n_train": int(n_train), "n_test": int(n_test), "size": int(size), "seed": int(seed)}
    arrays = {h5data.TRAIN_IMAGES: train[0], h5data.TRAIN_LABELS: train[1], h5data.TEST_IMAGES: test[0], h5data.TEST_LABELS: test[1]}
    return h5data.write_dataset(out, arrays, SYNTH_CLASSES, source=source, compression=compression)
