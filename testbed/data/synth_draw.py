"""Drawing primitives of the synthetic scenes: class ids, textures, the canvas, and the objects.

People with heads and limbs, cars with cabins and wheels, trees and palms with trunks and crowns, the sky;
every function draws one kind of object into a chunk of images at once (vectorized over images and pixels;
Python loops run only over object slots).  :mod:`testbed.data.synth` composes them into scene families.
"""

from __future__ import annotations

import numpy as np

from testbed.data import h5data

SYNTH_CLASSES: list[str] = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "grass", "person", "car", "palm",
]  # fmt: skip
WALL, BUILDING, SKY, FLOOR, TREE, CEILING, ROAD, GRASS, PERSON, CAR, PALM = range(len(SYNTH_CLASSES))
IGNORE = h5data.IGNORE_INDEX


def _c(x: np.ndarray) -> np.ndarray:
    """Per-image parameter [m] → [m,1,1] so it broadcasts against the pixel grid."""
    return np.asarray(x, dtype=np.float32)[:, None, None]


def _hash(*xs: np.ndarray) -> np.ndarray:
    """A cheap deterministic pseudo-random value in [0,1) per integer cell (for per-window/tile variation)."""
    h = np.zeros(np.broadcast_shapes(*(np.shape(x) for x in xs)), dtype=np.float32)
    for k, x in enumerate(xs):
        h = h + np.asarray(x, dtype=np.float32) * np.float32((12.9898, 78.233, 37.719)[k % 3])
    return np.modf(np.abs(np.sin(h)) * np.float32(43758.547))[0].astype(np.float32)


def _interp_matrix(size: int, cells: int) -> np.ndarray:
    """[size, cells] bilinear weights that upsample a cells-long signal to size samples."""
    pos = (np.arange(size) + 0.5) / size * (cells - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, cells - 2)
    t = (pos - lo).astype(np.float32)
    t = t * t * (3 - 2 * t)  # smoothstep: no visible grid creases
    m = np.zeros((size, cells), dtype=np.float32)
    m[np.arange(size), lo] = 1 - t
    m[np.arange(size), lo + 1] = t
    return m


def _smooth_noise(rng: np.random.Generator, m: int, size: int, cells: int) -> np.ndarray:
    """Value noise in [0,1], [m,size,size]: a random cells×cells grid upsampled with two matmuls."""
    cells = max(2, cells)
    grid = rng.random((m, cells, cells), dtype=np.float32)
    mat = _interp_matrix(size, cells)
    return mat @ grid @ mat.T


class _Canvas:
    """Label map + colour image of a chunk of m scenes; painting later occludes earlier."""

    def __init__(self, m: int, size: int) -> None:
        self.m, self.size = m, size
        self.label = np.full((m, size, size), IGNORE, dtype=np.uint8)
        self.rgb = np.zeros((3, m, size, size), dtype=np.float32)  # channel planes: fast masked writes
        g = (np.arange(size, dtype=np.float32) + 0.5) / size
        self.u = g[None, None, :]  # x in [0,1], left → right
        self.v = g[None, :, None]  # y in [0,1], top → bottom

    def subset(self, present: np.ndarray) -> tuple["_Canvas | None", np.ndarray]:
        """A canvas of only the images where ``present`` (objects are drawn there, then :meth:`merge`d)."""
        idx = np.flatnonzero(present)
        if idx.size == 0 or idx.size == self.m:
            return (self if idx.size else None), idx
        sub = _Canvas.__new__(_Canvas)
        sub.m, sub.size, sub.u, sub.v = idx.size, self.size, self.u, self.v
        sub.label, sub.rgb = self.label[idx], self.rgb[:, idx]
        return sub, idx

    def merge(self, sub: "_Canvas", idx: np.ndarray) -> None:
        if sub is not self:
            self.label[idx] = sub.label
            self.rgb[:, idx] = sub.rgb

    def paint(self, mask: np.ndarray, cls: int | None, colour: np.ndarray) -> None:
        """Set label ``cls`` (None: leave labels) and colour ([m,3] or planes [3,m,H,W]) where ``mask``."""
        mask = np.broadcast_to(mask, self.label.shape)
        if cls is not None:
            np.putmask(self.label, mask, np.uint8(cls))
        colour = np.asarray(colour, dtype=np.float32)
        if colour.ndim == 2:
            colour = colour.T[:, :, None, None]
        np.copyto(self.rgb, colour, where=mask[None])

    def shade(self, mask: np.ndarray, factor: np.ndarray) -> None:
        """Multiply colours by ``factor`` ([m,H,W] or broadcastable) where ``mask``; labels unchanged."""
        mask = np.broadcast_to(mask, self.label.shape)
        f = np.asarray(factor, dtype=np.float32)
        np.multiply(self.rgb, f, out=self.rgb, where=mask[None])

    # -- shapes: boolean masks [m,H,W] --------------------------------------------------------
    def rect(self, x0, x1, y0, y1) -> np.ndarray:
        u, v = self.u, self.v
        return (u >= _c(x0)) & (u < _c(x1)) & (v >= _c(y0)) & (v < _c(y1))

    def ellipse(self, cx, cy, rx, ry) -> np.ndarray:
        du = (self.u - _c(cx)) / _c(rx)
        dv = (self.v - _c(cy)) / _c(ry)
        return du * du + dv * dv <= 1.0


# -- colours -------------------------------------------------------------------------------------
_WALL = np.array([[205, 195, 175], [180, 192, 205], [215, 205, 185], [175, 165, 155], [195, 175, 150], [160, 180, 160]])
_FLOOR = np.array([[145, 100, 60], [175, 172, 165], [120, 80, 72], [95, 70, 50]])
_BUILDING = np.array([[155, 115, 95], [182, 172, 160], [122, 122, 134], [205, 185, 150], [140, 150, 160]])
_SKIN = np.array([[240, 200, 170], [205, 155, 115], [145, 98, 68], [95, 62, 42]])
_HAIR = np.array([[30, 22, 15], [90, 60, 30], [200, 170, 100], [60, 60, 60]])
_CAR = np.array([[190, 30, 30], [30, 60, 160], [230, 230, 230], [25, 25, 30], [160, 165, 170], [225, 190, 40], [40, 110, 70]])


def _pick(rng: np.random.Generator, table: np.ndarray, m: int, jitter: float) -> np.ndarray:
    """A colour per image from ``table`` with uniform per-channel jitter, float32 [m,3]."""
    base = table[rng.integers(0, len(table), m)].astype(np.float32)
    return base + rng.uniform(-jitter, jitter, (m, 3)).astype(np.float32)


def _near(rng: np.random.Generator, rgb, m: int, jitter: float) -> np.ndarray:
    return np.asarray(rgb, np.float32)[None] + rng.uniform(-jitter, jitter, (m, 3)).astype(np.float32)


def _counts(rng: np.random.Generator, m: int, p: list[float]) -> np.ndarray:
    return rng.choice(len(p), m, p=p)


# -- objects: each draws one slot (one object per image) on the images where ``present`` -----------
def _person(cv: _Canvas, rng: np.random.Generator, present, fx, fv, hgt) -> None:
    """A standing person with feet at (fx, fv) and height hgt: legs, torso, arms, head with hair."""
    full, (sub, idx) = cv, cv.subset(present)
    if sub is None:
        return
    cv = sub
    fx, fv, hgt = np.asarray(fx)[idx], np.asarray(fv)[idx], np.asarray(hgt)[idx]
    m = cv.m
    skin, hair = _pick(rng, _SKIN, m, 10), _pick(rng, _HAIR, m, 10)
    shirt = rng.uniform(20, 235, (m, 3)).astype(np.float32)
    trousers = _pick(rng, np.array([[40, 45, 70], [30, 30, 30], [90, 80, 60], [60, 70, 110]]), m, 12)
    r = 0.075 * hgt
    hip = fv - 0.47 * hgt
    shoulder = fv - hgt + 2.05 * r
    stride = rng.uniform(0.0, 0.06, m) * hgt
    leg_w = 0.055 * hgt
    for side in (-1, 1):
        cx = fx + side * (0.045 * hgt)
        # legs slant by ``stride`` towards the feet
        t = np.clip((cv.v - _c(hip)) / _c(fv - hip), 0, 1)
        lx = _c(cx) + side * _c(stride) * t
        leg = (np.abs(cv.u - lx) < _c(leg_w)) & (cv.v >= _c(hip)) & (cv.v < _c(fv))
        cv.paint(leg, PERSON, trousers)
    torso = cv.ellipse(fx, (shoulder + hip) / 2 + 0.02 * hgt, 0.11 * hgt, (hip - shoulder) / 2 + 0.04 * hgt)
    torso |= cv.rect(fx - 0.11 * hgt, fx + 0.11 * hgt, shoulder + 0.03 * hgt, hip + 0.02 * hgt)
    cv.paint(torso, PERSON, shirt)
    for side in (-1, 1):
        ax = fx + side * 0.135 * hgt
        arm = cv.rect(ax - 0.032 * hgt, ax + 0.032 * hgt, shoulder + 0.02 * hgt, hip + 0.03 * hgt)
        hand = cv.ellipse(ax, hip + 0.04 * hgt, 0.035 * hgt, 0.035 * hgt)
        cv.paint(arm, PERSON, shirt * 0.85)
        cv.paint(hand, PERSON, skin)
    neck = cv.rect(fx - 0.03 * hgt, fx + 0.03 * hgt, shoulder - 0.03 * hgt, shoulder + 0.01 * hgt)
    cv.paint(neck, PERSON, skin)
    hy = fv - hgt + r
    head = cv.ellipse(fx, hy, r * 0.85, r)
    cv.paint(head, PERSON, skin)
    cv.paint(head & (cv.v < _c(hy - 0.35 * r)), PERSON, hair)
    full.merge(cv, idx)


def _car(cv: _Canvas, rng: np.random.Generator, present, cx, cb, length) -> None:
    """A side-view car with bottom at cb: body, cabin with windows, two wheels with hubs."""
    full, (sub, idx) = cv, cv.subset(present)
    if sub is None:
        return
    cv = sub
    cx, cb, length = np.asarray(cx)[idx], np.asarray(cb)[idx], np.asarray(length)[idx]
    m = cv.m
    body_c = _pick(rng, _CAR, m, 12)
    hc = 0.42 * length
    x0, x1 = cx - length / 2, cx + length / 2
    body = cv.rect(x0, x1, cb - 0.62 * hc, cb - 0.18 * hc)
    body &= ~(cv.ellipse(x0, cb - 0.62 * hc, 0.06 * length, 0.12 * hc) & (cv.u < _c(x0 + 0.06 * length)))
    body &= ~(cv.ellipse(x1, cb - 0.62 * hc, 0.06 * length, 0.12 * hc) & (cv.u > _c(x1 - 0.06 * length)))
    cv.paint(body, CAR, body_c)
    # cabin: trapezoid, narrower at the roof; forward or backward facing at random
    top, base = cb - hc, cb - 0.6 * hc
    t = np.clip((cv.v - _c(top)) / _c(base - top), 0, 1)
    flip = _c(rng.random(m) < 0.5)
    front = np.where(flip, 0.12, 0.2).astype(np.float32)
    rear = np.where(flip, 0.2, 0.12).astype(np.float32)
    left = _c(x0 + 0.12 * length) + front * _c(length) * (1 - t)
    right = _c(x1 - 0.12 * length) - rear * _c(length) * (1 - t)
    cabin = (cv.u >= left) & (cv.u < right) & (cv.v >= _c(top)) & (cv.v < _c(base))
    cv.paint(cabin, CAR, body_c)
    glass = cabin & (cv.u >= left + _c(0.03 * length)) & (cv.u < right - _c(0.03 * length)) & (cv.v >= _c(top + 0.07 * hc))
    pillar = np.abs(cv.u - _c(cx)) < _c(0.02 * length)
    cv.paint(glass & ~pillar, None, _near(rng, (70, 90, 115), m, 15))
    light = cv.rect(x1 - 0.05 * length, x1, cb - 0.55 * hc, cb - 0.45 * hc)
    cv.paint(light, None, _near(rng, (235, 225, 170), m, 10))
    for wx in (x0 + 0.22 * length, x1 - 0.22 * length):
        wheel = cv.ellipse(wx, cb - 0.17 * hc, 0.17 * hc, 0.17 * hc)
        cv.paint(wheel, CAR, _near(rng, (25, 25, 28), m, 5))
        cv.paint(cv.ellipse(wx, cb - 0.17 * hc, 0.08 * hc, 0.08 * hc), CAR, _near(rng, (150, 150, 155), m, 10))
    full.merge(cv, idx)


def _tree(cv: _Canvas, rng: np.random.Generator, present, bx, bv, hgt) -> None:
    """A broadleaf tree standing at (bx, bv): a trunk and a crown of three overlapping blobs."""
    full, (sub, idx) = cv, cv.subset(present)
    if sub is None:
        return
    cv = sub
    bx, bv, hgt = np.asarray(bx)[idx], np.asarray(bv)[idx], np.asarray(hgt)[idx]
    m = cv.m
    tw = 0.045 * hgt
    trunk = cv.rect(bx - tw, bx + tw, bv - 0.55 * hgt, bv)
    cv.paint(trunk, TREE, _near(rng, (92, 62, 38), m, 12))
    leaf = _near(rng, (50, 110, 45), m, 18)
    cy = bv - 0.68 * hgt
    crown = cv.ellipse(bx, cy, 0.26 * hgt, 0.3 * hgt)
    for dx, dy, s in ((-0.17, 0.08, 0.19), (0.17, 0.06, 0.2), (0.02, -0.15, 0.2)):
        jx = rng.uniform(-0.04, 0.04, m)
        crown |= cv.ellipse(bx + (dx + jx) * hgt, cy + dy * hgt, s * hgt, s * hgt * 0.9)
    cv.paint(crown, TREE, leaf)
    full.merge(cv, idx)


def _palm(cv: _Canvas, rng: np.random.Generator, present, bx, bv, hgt) -> None:
    """A palm: a thin, ringed, bending trunk and a star-shaped crown of drooping fronds."""
    full, (sub, idx) = cv, cv.subset(present)
    if sub is None:
        return
    cv = sub
    bx, bv, hgt = np.asarray(bx)[idx], np.asarray(bv)[idx], np.asarray(hgt)[idx]
    m = cv.m
    bend = _c(rng.uniform(-0.25, 0.25, m) * hgt)
    s = np.clip((_c(bv) - cv.v) / _c(hgt * 0.8), 0, 1)  # 0 at the foot, 1 at the crown
    tx = _c(bx) + bend * s * s
    tw = _c(0.028 * hgt) * (1.2 - 0.4 * s)
    trunk = (np.abs(cv.u - tx) < tw) & (cv.v < _c(bv)) & (cv.v >= _c(bv - 0.8 * hgt))
    cv.paint(trunk, PALM, _near(rng, (135, 105, 72), m, 12))
    rings = np.modf(s * 14)[0] < 0.25
    cv.shade(trunk & rings, np.float32(0.75))
    cx = bx + bend[:, 0, 0]
    cy = bv - 0.8 * hgt
    du = (cv.u - _c(cx)) / _c(0.34 * hgt)
    dv = (cv.v - _c(cy)) / _c(0.24 * hgt)
    rho = np.sqrt(du * du + dv * dv)
    theta = np.arctan2(dv, du)
    nf = _c(rng.integers(6, 9, m))
    phase = _c(rng.uniform(0, np.pi, m))
    frond = np.abs(np.cos(nf * theta / 2 + phase))
    frond = frond * frond * frond
    reach = 0.18 + 0.82 * frond * (0.75 + 0.25 * np.sin(theta))  # lower fronds droop further
    crown = rho < reach
    cv.paint(crown, PALM, _near(rng, (72, 135, 52), m, 15))
    cv.shade(crown, 0.8 + 0.4 * np.clip(1 - rho, 0, 1))
    full.merge(cv, idx)


def _sorted_slots(rng: np.random.Generator, m: int, counts: np.ndarray, slots: int, lo, hi):
    """Per image, ``slots`` depth positions in [lo,hi] sorted far→near, and which slots are present."""
    depth = np.sort(rng.uniform(0, 1, (m, slots)), axis=1) * (np.asarray(hi) - np.asarray(lo))[:, None]
    depth = (depth + np.asarray(lo)[:, None]).astype(np.float32)
    order = rng.permuted(np.tile(np.arange(slots), (m, 1)), axis=1)
    present = order < counts[:, None]
    return depth, present


# -- scene families ------------------------------------------------------------------------------
def _sky(cv: _Canvas, rng: np.random.Generator, mask: np.ndarray, horizon: np.ndarray, noise: np.ndarray) -> None:
    m = cv.m
    overcast = rng.random(m) < 0.2
    top = np.where(overcast[:, None], _near(rng, (165, 170, 180), m, 10), _near(rng, (85, 140, 225), m, 15))
    low = np.where(overcast[:, None], _near(rng, (200, 202, 208), m, 8), _near(rng, (185, 215, 242), m, 10))
    t = np.clip(cv.v / _c(np.maximum(horizon, 0.05)), 0, 1)
    colour = top.T[:, :, None, None] * (1 - t) + low.T[:, :, None, None] * t
    cv.paint(mask, SKY, colour)
    cloud = np.clip((noise - _c(rng.uniform(0.45, 0.75, m))) * 3.0, 0, 1)
    cloud_rgb = np.float32(240) - np.float32(25) * noise
    cv.paint(mask, None, cv.rgb * (1 - cloud) + cloud_rgb * cloud)
