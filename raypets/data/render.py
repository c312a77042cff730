"""Procedural pet pictures: a textured background, a pet-like animal and its trimap (no Ray, no files).

Images are built channel-first in float32, mostly in place: allocating frames costs more than the arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Fur and household tones, mostly fur: pets and backgrounds share this sampler, so colour separates nothing.
_PALETTE = np.array([
    (24, 22, 20), (60, 42, 30), (105, 72, 45), (150, 105, 65), (190, 150, 100), (222, 200, 160),
    (236, 232, 222), (128, 126, 122), (95, 100, 110), (200, 120, 60), (210, 170, 95), (165, 140, 120),
    (90, 110, 70), (140, 70, 55), (80, 95, 130), (180, 175, 150)], np.float32)
_CUMULATIVE = np.cumsum([3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 2])
_MARKS = np.array([(0, 0, 0), (0, 0, 0), (15, 12, 10), (235, 235, 230)], np.float32)  # iris, dark, glint
_IRIS = np.array([(200, 150, 40), (110, 150, 60), (90, 140, 200), (90, 60, 30)], np.float32)
Mark = tuple[int, float, float, float]  # (_MARKS index, x, y, radius) of an eye part or the nose


def sample_colour(rng: np.random.Generator) -> np.ndarray:
    """One RGB colour (float32) from the palette shared by pets and backgrounds, jittered."""
    base = _PALETTE[np.searchsorted(_CUMULATIVE, rng.random() * _CUMULATIVE[-1], side="right")]
    return np.clip(base * rng.uniform(0.8, 1.2) + rng.normal(0, 10, 3), 0, 255).astype(np.float32)


def _noise(rng: np.random.Generator, h: int, w: int, cy: float, cx: float | None = None) -> np.ndarray:
    """Smooth zero-mean noise (std about 0.6), features about cy x cx px: random bytes, upsampled as "L"."""
    cx = cy if cx is None else cx
    gw, gh = int(w / cx) + 2, int(h / cy) + 2
    small = Image.frombytes("L", (gw, gh), rng.bytes(gw * gh))
    up = small.resize((w, h), Image.Resampling.BILINEAR, box=(0, 0, w / cx, h / cy))
    return _scaled(np.asarray(up, np.float32), 1 / 74, -127.5 / 74)


def _grain(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Per-pixel uniform grain in [-1, 1]."""
    return _scaled(np.frombuffer(rng.bytes(h * w), np.uint8).reshape(h, w).astype(np.float32), 1 / 127.5, -1)


def _scaled(x: np.ndarray, a: float, b: float = 0.0) -> np.ndarray:
    """x * a + b, computed in place in float32; returns x."""
    x *= np.float32(a)
    x += np.float32(b)
    return x


def _fbm(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Two octaves of noise, features about `cell` and `cell` / 4 px."""
    out = _scaled(_noise(rng, h, w, max(3.0, cell / 4)), 0.6)
    out += _noise(rng, h, w, cell)
    return out


def _ramp(h: int, w: int, angle: float) -> np.ndarray:
    """x cos(angle) + y sin(angle) over an h x w frame."""
    return np.float32(np.cos(angle)) * np.arange(w, dtype=np.float32)[None] \
        + np.float32(np.sin(angle)) * np.arange(h, dtype=np.float32)[:, None]


def _soften(a: np.ndarray) -> np.ndarray:
    """A [1, 2, 1] x [1, 2, 1] / 16 blur over the last two axes, edges replicated; float32."""
    v = a * np.float32(2)
    v[..., 1:, :] += a[..., :-1, :]
    v[..., :1, :] += a[..., :1, :]
    v[..., :-1, :] += a[..., 1:, :]
    v[..., -1:, :] += a[..., -1:, :]
    v *= np.float32(1 / 16)
    out = v * np.float32(2)
    out[..., 1:] += v[..., :-1]
    out[..., :1] += v[..., :1]
    out[..., :-1] += v[..., 1:]
    out[..., -1:] += v[..., -1:]
    return out


def _rgb(c: np.ndarray) -> np.ndarray:
    return c[:, None, None]


def _gradient(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    c1, c2 = sample_colour(rng), sample_colour(rng)
    t = _ramp(h, w, rng.uniform(0, 2 * np.pi))
    t -= t.min()
    t *= np.float32(1 / (t.max() + 1e-6))
    out = _rgb(c2 - c1) * t[None]
    out += _rgb(c1)
    return out


def _planks(rng: np.random.Generator, h: int, w: int, vertical: bool) -> np.ndarray:
    """Boards or stripes: per-board colours from two samples, grain along the boards, dark seams."""
    length = w if vertical else h
    period = rng.uniform(0.06, 0.25) * length
    t = np.arange(length, dtype=np.float32) + np.float32(rng.uniform(0, period))
    idx = (t * np.float32(1 / period)).astype(np.int32)
    k = int(idx[-1]) + 1
    colours = np.where(rng.random(k)[:, None] < rng.uniform(0.2, 0.8), sample_colour(rng), sample_colour(rng))
    colours = (colours * rng.uniform(0.85, 1.15, (k, 1))).astype(np.float32)[idx].T
    colours *= np.where(np.mod(t, period) < max(1.0, period * 0.06), np.float32(0.6), np.float32(1.0))
    along = rng.uniform(10, 40)
    grain = _scaled(_noise(rng, h, w, *((along, 1.5) if vertical else (1.5, along))), 0.15, 1)
    return (colours[:, None, :] if vertical else colours[:, :, None]) * grain[None]


def _blobs(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Soft blobs of sampled colours (cushions, bushes, out-of-focus clutter)."""
    cell = 8.0
    sw, sh = int(w / cell) + 2, int(h / cell) + 2
    canvas = Image.new("RGB", (sw, sh), tuple(int(v) for v in sample_colour(rng)))
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(4, 14)):
        x, y, r = rng.uniform(0, sw), rng.uniform(0, sh), rng.uniform(0.05, 0.35) * sw
        colour = tuple(int(v) for v in sample_colour(rng))
        draw.ellipse((x - r, y - r * rng.uniform(0.5, 1.5), x + r, y + r), fill=colour)
    canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.5)))
    out = np.empty((3, h, w), np.float32)
    for c, band in enumerate(canvas.split()):
        out[c] = np.asarray(band.resize((w, h), Image.Resampling.BILINEAR, box=(0, 0, w / cell, h / cell)))
    return out


def _pattern(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    kind = rng.integers(3)
    if kind == 0:
        return _gradient(rng, h, w)
    return _planks(rng, h, w, vertical=bool(rng.random() < 0.4)) if kind == 1 else _blobs(rng, h, w)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A textured background (3 x H x W float32): one pattern or a wall above a floor, then clutter."""
    img = _pattern(rng, h, w)
    if rng.random() < 0.35:
        y0, slope = rng.uniform(0.25, 0.7) * h, rng.uniform(-0.15, 0.15)
        below = np.arange(h)[:, None] > y0 + slope * (np.arange(w)[None] - w / 2)
        np.copyto(img, _pattern(rng, h, w), where=below[None])
    img *= _scaled(_fbm(rng, h, w, rng.uniform(0.02, 0.2) * max(h, w)), rng.uniform(0.04, 0.2), 1)[None]
    for _ in range(rng.integers(0, 4)):
        x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.05, 0.3) * max(h, w)
        if rng.random() < 0.5:  # a rug or blanket with a fur-like texture
            _paint(img, _draw([_blob_polygon(rng, x, y, r)], (w, h)),
                   lambda ch, cw: _rgb(sample_colour(rng)) * _fur(rng, ch, cw, max(h, w) / 3, 1, 3)[None])
        else:
            _paint(img, _draw([_blob_polygon(rng, x, y, r)], (w, h)), lambda ch, cw: _flat(rng, ch, cw))
    return img


def _flat(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return _rgb(sample_colour(rng)) * _scaled(_noise(rng, h, w, 3.0), 0.08, 1)[None]


def _fur(rng: np.random.Generator, h: int, w: int, size: float, sy: float, sx: float) -> np.ndarray:
    """Fur brightness (H x W, about 1) of a thing `size` px across: soft patches, hairs stretched (sy, sx)."""
    cell = max(2.0, size * rng.uniform(0.05, 0.15))
    light = _scaled(_noise(rng, h, w, cell * sy, cell * sx), 0.5)
    light += _noise(rng, h, w, 1.2 * sy, 1.2 * sx)
    return _scaled(light, rng.uniform(0.12, 0.25), 1)


def _paint(img: np.ndarray, mask: Image.Image, colour: Callable[[int, int], np.ndarray]) -> None:
    """Composite colour(h, w) over `img` in place where `mask` (mode L) is set, edges softened."""
    box = mask.getbbox()
    if box is None:
        return
    x0, y0 = max(box[0] - 1, 0), max(box[1] - 1, 0)
    x1, y1 = min(box[2] + 1, mask.width), min(box[3] + 1, mask.height)
    alpha = _scaled(_soften(np.asarray(mask.crop((x0, y0, x1, y1)), np.float32)), 1 / 255)
    _blend(img[:, y0:y1, x0:x1], colour(y1 - y0, x1 - x0), alpha)


def _blend(region: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> None:
    """region += (colour - region) * alpha, in place; `colour` is consumed."""
    colour -= region
    colour *= alpha[None]
    region += colour


def _blob_polygon(rng: np.random.Generator, cx: float, cy: float, r: float, n: int = 24) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    radius = r * (1 + 0.25 * np.sin(t * rng.integers(2, 5) + rng.uniform(0, 6)) + rng.uniform(-0.1, 0.1, n))
    return np.stack([cx + radius * np.cos(t), cy + radius * rng.uniform(0.4, 1.0) * np.sin(t)], 1)


def _ellipse(cx: float, cy: float, a: float, b: float, rot: float = 0.0, n: int = 32) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x, y = a * np.cos(t), b * np.sin(t)
    return np.stack([cx + np.cos(rot) * x - np.sin(rot) * y, cy + np.sin(rot) * x + np.cos(rot) * y], 1)


def _capsule(p0: tuple[float, float], p1: tuple[float, float], r0: float, r1: float,
             n: int = 10) -> np.ndarray:
    """A limb: half-discs of radii r0 and r1 around p0 and p1, joined."""
    a, b = np.asarray(p0, float), np.asarray(p1, float)
    phi = np.arctan2(b[1] - a[1], b[0] - a[0])
    t1, t0 = phi + np.linspace(-np.pi / 2, np.pi / 2, n), phi + np.linspace(np.pi / 2, 3 * np.pi / 2, n)
    return np.concatenate([b + r1 * np.stack([np.cos(t1), np.sin(t1)], 1),
                           a + r0 * np.stack([np.cos(t0), np.sin(t0)], 1)])


def _head(rng: np.random.Generator, hx: float, hy: float, rh: float, cat: bool,
          front: bool) -> tuple[list[np.ndarray], list[np.ndarray], list[Mark]]:
    """Head; ears and muzzle; eyes and nose. Faces +x in profile, the viewer when `front`."""
    ears, marks, drop = [], [], not cat and rng.random() < 0.5
    spread, turn = rng.uniform(0.45, 0.7), 0.0 if front else 0.25
    for side in (-1, 1):
        ang = side * spread + turn
        if drop:  # hanging ears
            ex = hx + (side * 0.8 + turn) * rh
            ears.append(_ellipse(ex, hy + 0.2 * rh, 0.28 * rh, 0.7 * rh, 0.35 * side))
        else:
            d, nrm = np.array([np.sin(ang), -np.cos(ang)]), np.array([np.cos(ang), np.sin(ang)])
            base, half = np.array([hx, hy]) + 0.7 * rh * d, rh * rng.uniform(0.45, 0.65) / 2
            tip = base + rh * rng.uniform(0.6, 1.0) * d
            ears.append(np.stack([base - half * nrm, tip, base + half * nrm]))
    length = rh * (rng.uniform(0.25, 0.35) if cat else rng.uniform(0.3, 0.65))
    mx, ma = (hx, 0.4 * rh) if front else (hx + 0.75 * rh, length)
    er = rh * (0.15 if cat else 0.11)
    for x in (hx - 0.38 * rh, hx + 0.38 * rh) if front else (hx + 0.15 * rh, hx + 0.6 * rh):
        ey = hy - 0.1 * rh
        marks += [(1, x, ey, er), (2, x, ey, er * 0.5), (3, x + er * 0.3, ey - 0.1 * rh, er * 0.2)]
    marks.append((2, mx + (0 if front else ma * 0.85), hy + 0.3 * rh, rh * 0.11))
    head = _ellipse(hx, hy, rh, rh * rng.uniform(0.8, 0.95))
    return [head], [*ears, _ellipse(mx, hy + 0.35 * rh, ma, 0.3 * rh)], marks


def _tail(rng: np.random.Generator, x: float, y: float, cat: bool) -> list[np.ndarray]:
    length, r = (rng.uniform(0.9, 1.4), rng.uniform(0.06, 0.09)) if cat \
        else (rng.uniform(0.25, 0.8), rng.uniform(0.07, 0.13))
    ang, curl, parts = rng.uniform(-2.8, -1.8), rng.uniform(-0.5, 0.5), []
    for _ in range(4):
        nx, ny = x + length / 4 * np.cos(ang), y + length / 4 * np.sin(ang)
        parts.append(_capsule((x, y), (nx, ny), r, r * 0.9))
        x, y, ang, r = nx, ny, ang + curl, r * 0.9
    return parts


def _pet_shape(rng: np.random.Generator, cat: bool) -> tuple[list[np.ndarray], list[np.ndarray], list[Mark]]:
    """A pet in body units (body half-length 1) facing +x: silhouette polygons, extremities, face marks."""
    pose = rng.choice(["stand", "lie", "sit", "portrait"], p=[0.3, 0.25, 0.25, 0.2])
    b = rng.uniform(0.36, 0.52)
    rh, leg, lw = rng.uniform(0.32, 0.45), rng.uniform(0.35, 0.9), rng.uniform(0.09, 0.15)
    if pose == "portrait":
        head, extra, marks = _head(rng, 0, 0, 1.0, cat, front=True)
        return [_ellipse(0, 1.6, rng.uniform(1.0, 1.4), 1.2), *head, *extra], extra, marks
    if pose == "stand":
        hx, hy = 1.05 + rng.uniform(0, 0.2), -b - rng.uniform(0, 0.3)
        body = [_ellipse(0, 0, 1, b), _capsule((0.7, -0.2 * b), (hx, hy), rh * 0.6, rh * 0.6)]
        limbs = [_capsule((x, 0.2 * b), (x + rng.uniform(-0.15, 0.15), b + leg), lw, lw * 0.85)
                 for x in (-0.72, -0.5, 0.5, 0.72)]
        tail = _tail(rng, -0.95, -0.2 * b, cat)
    elif pose == "lie":
        hx, hy = 1.0, -0.45 * b - 0.3
        body = [_ellipse(0, 0, 1, 0.85 * b), _ellipse(-0.55, 0.1 * b, 0.5, 0.95 * b)]
        limbs = [_capsule((0.5, 0.5 * b + dy), (1.3 + dy, 0.75 * b + dy), lw, lw * 0.9) for dy in (0, 0.06)]
        tail = _tail(rng, -0.95, 0.4 * b, cat)
    else:  # sitting
        hx, hy = 0.35, -1.0
        body = [_ellipse(0, 0, 0.5 + 0.3 * b, 0.95, rng.uniform(-0.5, -0.2)),
                _ellipse(-0.25, 0.55, 0.5, 0.45)]
        limbs = [_capsule((x, 0.2), (x + 0.05, 1.25), lw, lw * 0.85) for x in (0.25, 0.42)]
        tail = _tail(rng, -0.45, 0.9, cat)
    head, extra, marks = _head(rng, hx, hy, rh, cat, front=bool(rng.random() < 0.4))
    return [*body, *limbs, *tail, *head, *extra], [*limbs, *tail, *extra], marks


def _draw(polys: list[np.ndarray], size: tuple[int, int]) -> Image.Image:
    """Polygons filled with 255 on a black mode-L image of `size`."""
    mask = Image.new("L", size)
    draw = ImageDraw.Draw(mask)
    for p in polys:
        draw.polygon([tuple(q) for q in p.tolist()], fill=255)
    return mask


def render_sample(rng: np.random.Generator, width: int, height: int,
                  cat: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One image and its trimap in memory: uint8 H x W x 3 RGB and H x W (1 pet, 2 background, 3 border).

    Frames of 300 px and more are painted at half size and enlarged (training shrinks them further anyway),
    their pet mask with them; the trimap is made at full size.
    """
    step = 2 if min(width, height) >= 300 else 1
    img, pet, box = _compose(rng, -(-width // step), -(-height // step), cat)
    rgb = _finish(rng, img)
    if step > 1:
        rgb = np.asarray(Image.fromarray(rgb).resize((width, height), Image.Resampling.BILINEAR))
        mask = Image.fromarray(pet.view(np.uint8) * np.uint8(255))
        pet = np.asarray(mask.resize((width, height), Image.Resampling.BILINEAR)) > 127
    trimap = np.full((height, width), 2, np.uint8)  # it changes only near the pet
    r = max(1, round(min(width, height) / 180))
    x0, y0, x1, y1 = (max(step * box[0] - r - 1, 0), max(step * box[1] - r - 1, 0),
                      step * box[2] + r + 1, step * box[3] + r + 1)
    trimap[y0:y1, x0:x1] = _trimap(pet[y0:y1, x0:x1], r)
    return rgb, trimap


def _compose(rng: np.random.Generator, w: int, h: int,
             cat: bool | None) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """The picture before lighting (3 x h x w float32), the visible pet (h x w bool) and a box around it."""
    cat = bool(rng.random() < 0.5) if cat is None else cat
    img = _background(rng, h, w)
    sil, extremities, marks = _pet_shape(rng, cat)
    theta = rng.normal(0, 0.25) + (rng.uniform(-1.6, 1.6) if rng.random() < 0.1 else 0.0)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]) \
        @ np.diag([rng.choice([-1, 1]), 1])
    # Scale to a target pet area (15-70% of the frame), then place it, sometimes over an edge.
    unit_area = np.asarray(_draw([p * 20 + 100 for p in sil], (200, 200))).mean() / 255 * 100
    scale = float(np.sqrt((0.15 + 0.55 * rng.random() ** 1.5) * w * h / unit_area))
    ref = np.concatenate(sil) @ rot.T
    inside = 0.92 * float(np.min(np.array([w, h]) / np.ptp(ref, 0)))  # the largest scale that fits the frame
    if rng.random() < 0.5 and inside ** 2 * unit_area > 0.15 * w * h:
        scale = min(scale, inside)
    lo, hi = ref.min(0) * scale, ref.max(0) * scale
    free = np.array([w, h]) - hi
    centre = np.array([rng.uniform(min(-lo[i], free[i]), max(-lo[i], free[i])) for i in (0, 1)])
    if rng.random() < 0.2:
        centre += rng.uniform(-0.3, 0.3, 2) * (hi - lo)
    middle = centre + (lo + hi) / 2  # keep the middle of the pet's box in the middle of the frame
    centre += np.clip(middle, [0.2 * w, 0.2 * h], [0.8 * w, 0.8 * h]) - middle
    fuzz = max(0.6, 0.006 * min(w, h))
    margin = int(3 * fuzz) + 2
    x0, y0 = (np.maximum(lo + centre, 0) - margin).astype(int).clip(0)
    x1, y1 = np.minimum(hi + centre + margin + 1, [w, h]).astype(int)
    pet = np.zeros((h, w), bool)
    if x1 > x0 + 1 and y1 > y0 + 1:  # else it was pushed out of the frame
        _shadow(rng, img, lo + centre, hi + centre)
        off = np.array([x0, y0])
        place = [p @ rot.T * scale + centre - off for p in sil]
        blurred = _draw(place, (x1 - x0, y1 - y0)).filter(ImageFilter.BoxBlur(fuzz))
        soft = _scaled(np.asarray(blurred, np.float32), 1 / 255)
        edge = 1 - soft  # a furry outline: grain flips pixels where the blurred silhouette is ambiguous
        edge *= soft
        edge *= _grain(rng, *soft.shape)
        edge *= np.float32(0.5)
        edge += soft
        pet[y0:y1, x0:x1] = crop = edge > 0.5
        colour = _pet_colour(rng, [p @ rot.T * scale + centre - off for p in extremities], scale, theta, soft)
        _mark_face(rng, colour, marks, lambda q: q @ rot.T * scale + centre - off, scale)
        _blend(img[:, y0:y1, x0:x1], colour, _soften(crop))
        if rng.random() < 0.3:
            pet = _occlude(rng, img, pet)
    return img, pet, (int(x0), int(y0), int(x1), int(y1))


def _mark_face(rng: np.random.Generator, colour: np.ndarray, marks: list[Mark],
               place: Callable[[np.ndarray], np.ndarray], scale: float) -> None:
    """Paint eyes (iris, pupil, glint) and nose into the pet's colour box."""
    at = np.array([place(np.array([x, y])) for _, x, y, _ in marks])
    radius = np.array([m[3] for m in marks]) * scale
    x0, y0 = np.floor(np.maximum((at - radius[:, None]).min(0), 0)).astype(int)
    canvas = Image.new("L", colour.shape[:0:-1])
    draw = ImageDraw.Draw(canvas)
    for (kind, *_), (px, py), pr in zip(marks, at, radius, strict=True):
        draw.ellipse((px - pr, py - pr, px + pr, py + pr), fill=kind)
    idx = np.asarray(canvas)[y0:, x0:]
    ys, xs = np.nonzero(idx)
    palette = _MARKS.copy()
    palette[1] = _IRIS[rng.integers(len(_IRIS))]
    colour[:, ys + y0, xs + x0] = palette[idx[ys, xs]].T


def _shadow(rng: np.random.Generator, img: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
    """Darken the ground under the pet's bounding box (corners lo, hi) with a soft elliptic shadow."""
    h, w = img.shape[1:]
    cx, cy, ax, ay = (lo[0] + hi[0]) / 2, hi[1], 0.55 * (hi[0] - lo[0]) + 1, 0.12 * (hi[1] - lo[1]) + 1
    xs = np.arange(max(0, int(cx - 2 * ax)), min(w, int(cx + 2 * ax) + 1))
    ys = np.arange(max(0, int(cy - 3 * ay)), min(h, int(cy + 3 * ay) + 1))
    if len(xs) and len(ys):
        gy = (rng.uniform(0.2, 0.5) * np.exp(-2 * ((ys - cy) / ay) ** 2)).astype(np.float32)
        dark = gy[:, None] * np.exp(-2 * ((xs - cx) / ax) ** 2).astype(np.float32)[None]
        np.subtract(1, dark, out=dark)
        img[:, ys[0]:ys[-1] + 1, xs[0]:xs[-1] + 1] *= dark


def _pet_colour(rng: np.random.Generator, extremities: list[np.ndarray], scale: float, theta: float,
                soft: np.ndarray) -> np.ndarray:
    """Fur colour over the pet's box: a coat, one coat pattern, hairs along the body and rounded shading."""
    h, w = soft.shape
    hairs = rng.uniform(2, 5)
    light = _fur(rng, h, w, scale, *((1.0, hairs) if abs(np.cos(theta)) > 0.7 else (hairs, 1.0)))
    if min(h, w) >= 8:  # rounded body: darker towards the outline
        small = Image.fromarray((soft * 255).astype(np.uint8)).reduce(4)
        small = small.filter(ImageFilter.BoxBlur(max(1.0, scale / 20)))
        small = small.resize((w, h), Image.Resampling.BILINEAR)
        light *= _scaled(np.asarray(small, np.float32), 0.4 / 255, 0.6)
    coat, kind = _rgb(sample_colour(rng)), rng.integers(5)
    if kind == 2:  # tabby stripes across the body
        phase = _ramp(h, w, theta) * np.float32(2 * np.pi / (scale * rng.uniform(0.1, 0.2)))
        phase += 2.5 * _noise(rng, h, w, scale * 0.15)
        light *= _scaled(_soften(np.sin(phase) > 0.3), -0.45, 1)
    if kind in (0, 2):
        return coat * light[None]
    if kind == 1:  # colourpoint, socks or dark ears: extremities in a second colour
        points = _draw(extremities, (w, h)).filter(ImageFilter.BoxBlur(1.5))
        weight = _scaled(_soften(np.asarray(points, np.float32)), 1 / 255)
    else:  # patches
        weight = _soften(_noise(rng, h, w, scale * rng.uniform(0.1, 0.3)) > rng.uniform(-0.1, 0.4))
    out = _rgb(sample_colour(rng) - coat[:, 0, 0]) * weight[None]
    out += coat
    out *= light[None]
    return out


def _occlude(rng: np.random.Generator, img: np.ndarray, pet: np.ndarray) -> np.ndarray:
    """Put an object (ball, box, bars) in front of the pet, hiding at most 40%; returns the visible pet."""
    h, w = pet.shape
    ys, xs = np.nonzero(pet)
    if len(xs) == 0:
        return pet
    cx, cy = xs.mean() + rng.normal(0, xs.std()), ys.max() - rng.uniform(0, 0.4) * np.ptp(ys)
    r, kind = rng.uniform(0.05, 0.2) * min(h, w), rng.integers(3)
    if kind == 0:
        polys = [_ellipse(cx, cy, r, r)]
    elif kind == 1:
        polys = [_ellipse(cx, cy, 2 * r, r, rng.uniform(-0.4, 0.4), n=4)]
    else:
        gap = rng.uniform(1.0, 2.0) * r
        bar = max(r / 5, 2.0)
        polys = [_capsule((cx + k * gap, -10), (cx + k * gap + rng.normal(0, 3), h + 10), bar, bar)
                 for k in range(-2, 3)]
    mask = _draw(polys, (w, h))
    covered = np.asarray(mask) > 127
    if (pet & covered).sum() > 0.4 * pet.sum():
        return pet
    _paint(img, mask, lambda ch, cw: _flat(rng, ch, cw))
    return pet & ~covered


def _finish(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Uneven light, a colour cast, sensor noise, sometimes blur; returns uint8 H x W x 3 RGB."""
    _, h, w = img.shape
    img *= (_profile(rng, h, rng.uniform(0.75, 1.2))[:, None] * _profile(rng, w, 1.0)[None])[None]
    img *= _rgb(rng.normal(1, 0.04, 3).astype(np.float32))
    img += _scaled(_grain(rng, h, w), rng.uniform(1, 6))[None]
    if rng.random() < 0.4:
        img = _soften(img)
    np.clip(img, 0, 255, out=img)
    return np.asarray(Image.merge("RGB", [Image.fromarray(c) for c in img.astype(np.uint8)]))


def _profile(rng: np.random.Generator, n: int, mean: float) -> np.ndarray:
    """A smooth random 1-D light profile of length n around `mean` (+-15%)."""
    knots = mean * (1 + rng.uniform(-0.15, 0.15, 4))
    return np.interp(np.arange(n), np.linspace(0, n - 1, 4), knots).astype(np.float32)


def _trimap(pet: np.ndarray, r: int) -> np.ndarray:
    """Official trimap values from a pet mask: the border band is a dilation minus an erosion by r px."""
    trimap = _grow(pet, r).view(np.uint8) + np.uint8(2)  # 3 within r of the pet, else 2
    trimap -= (~_grow(~pet, r)).view(np.uint8) * np.uint8(2)  # 1 where the whole r-square is pet
    return trimap


def _grow(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation by a (2r+1)-square; pixels beyond the frame count as unset."""
    out = mask.copy()
    for d in range(1, r + 1):
        out[:, d:] |= mask[:, :-d]
        out[:, :-d] |= mask[:, d:]
    rows = out.copy()
    for d in range(1, r + 1):
        out[d:] |= rows[:-d]
        out[:-d] |= rows[d:]
    return out
