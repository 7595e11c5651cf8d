"""A second, independent drawing procedure: the held-out pictures the demo model is judged on.

Written for the evaluation only and never used in training, it shares no geometry with scenes.py.
Shapes are coverage masks computed on a pixel grid (a radius test for the circle, half-planes for the
convex polygons, a folded polar test for the star), anti-aliased by averaging 3 x 3 samples per
pixel; an outline is the shape minus the same shape moved inwards by the stroke. It has its own
shades, size bands, turns, canvases (common photo and screen aspect ratios), resampling and JPEG
settings. Each drawing carries its own description, the truth it is scored against: the objects in
the order a caption must name them (by the cell of the 3 x 3 grid over the seen square that holds
each centre: top row first, then left to right) and the answers to the questions.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .scenes import QUESTIONS, SHAPES

SHADES = {
    "red": ((205, 25, 45), (235, 60, 50)),
    "green": ((40, 150, 60), (20, 175, 30)),
    "blue": ((25, 75, 200), (50, 50, 235)),
    "yellow": ((250, 220, 40), (230, 200, 0)),
    "purple": ((150, 50, 180), (120, 30, 150)),
    "orange": ((250, 140, 30), (235, 115, 10)),
}
BACKDROPS = {"white": ((255, 255, 255), (236, 236, 228)), "grey": ((128, 128, 128), (165, 165, 170)),
             "black": ((0, 0, 0), (35, 32, 30))}
ASPECTS = ((4, 3), (3, 4), (16, 9), (9, 16), (1, 1), (3, 2), (2, 3))
# Sizes as the span of the circumscribed circle over the short side. Between the bands an object is
# neither clearly small nor clearly large: no size question is asked about it.
SMALL_SPANS, MIDDLE_SPANS, LARGE_SPANS, PAIR_LARGE_SPANS = (0.12, 0.18), (0.19, 0.27), (0.28, 0.50), (0.28, 0.32)
COUNT_WORDS = {1: "one", 2: "two"}
SUBSAMPLES = 3


@dataclass(frozen=True)
class Drawn:
    """One drawn object: what it is, and where, as fractions of the seen square (the canvas's centre square)."""

    shape: str
    colour: str
    size: str | None  # None: between the size bands
    cx: float
    cy: float
    span: float
    turn: float  # radians
    outline: float  # stroke as a fraction of the seen square's side; 0: filled


@dataclass(frozen=True)
class Drawing:
    image: Image.Image
    background: str
    objects: tuple[Drawn, ...]  # in the order a caption names them

    def questions(self) -> list[tuple[str, str]]:
        qa = [(QUESTIONS["count"], COUNT_WORDS[len(self.objects)]), (QUESTIONS["background"], self.background)]
        for o in self.objects:
            qa.append((QUESTIONS["colour"].format(shape=o.shape), o.colour))
            qa.append((QUESTIONS["shape"].format(colour=o.colour), o.shape))
            if o.size:
                qa.append((QUESTIONS["size"].format(shape=o.shape), o.size))
        return qa


def held_out_drawings(singles: int, pairs: int, seed: int) -> list[Drawing]:
    """`singles` one-object drawings, then `pairs` two-object drawings, the same for the same seed."""
    rng = random.Random(seed)
    return [_single(rng) for _ in range(singles)] + [_pair(rng) for _ in range(pairs)]


def _single(rng: random.Random) -> Drawing:
    band = rng.choice(("small", "large", None))
    span = rng.uniform(*{"small": SMALL_SPANS, "large": LARGE_SPANS, None: MIDDLE_SPANS}[band])
    room = span / 2 + 0.02
    cx, cy = rng.uniform(room, 1 - room), rng.uniform(room, 1 - room)
    obj = _object(rng, rng.choice(SHAPES), rng.choice(list(SHADES)), band, cx, cy, span)
    return _render(rng, (obj,))


def _pair(rng: random.Random) -> Drawing:
    """Two objects with centres well inside two cells of the grid, half of them side by side."""
    shapes, colours = rng.sample(SHAPES, 2), rng.sample(list(SHADES), 2)
    while True:
        row = rng.randrange(3)
        cells = [(row, c) for c in rng.sample(range(3), 2)] if rng.random() < 0.5 else \
            [divmod(cell, 3) for cell in rng.sample(range(9), 2)]
        sizes = [rng.choice(("small", "large")) for _ in cells]
        spans = [rng.uniform(*(SMALL_SPANS if s == "small" else PAIR_LARGE_SPANS)) for s in sizes]
        centres = [((c + 0.5 + rng.uniform(-0.2, 0.2)) / 3, (r + 0.5 + rng.uniform(-0.2, 0.2)) / 3) for r, c in cells]
        inside = all(s / 2 < x < 1 - s / 2 and s / 2 < y < 1 - s / 2 for s, (x, y) in zip(spans, centres))
        if inside and math.dist(*centres) > (spans[0] + spans[1]) / 2 + 0.02:
            break
    objs = [_object(rng, *spec) for spec in zip(shapes, colours, sizes, *zip(*centres), spans)]
    in_reading_order = sorted(zip(cells, objs), key=lambda cell_and_object: cell_and_object[0])
    return _render(rng, tuple(obj for _, obj in in_reading_order))


def _object(rng: random.Random, shape: str, colour: str, size: str | None, cx: float, cy: float, span: float) -> Drawn:
    little_turn = shape in ("square", "diamond")  # a square turned by 45 degrees is a diamond
    turn = math.radians(rng.uniform(-12, 12) if little_turn else rng.uniform(-25, 25))
    outline = rng.uniform(0.025, 0.04) if rng.random() < 0.2 else 0.0
    return Drawn(shape, colour, size, cx, cy, span, turn, outline)


def _render(rng: random.Random, objects: tuple[Drawn, ...]) -> Drawing:
    short = rng.randint(72, 560)
    across, down = rng.choice(ASPECTS)
    width, height = (round(short * across / down), short) if across >= down else (short, round(short * down / across))
    background = rng.choice(list(BACKDROPS))
    canvas = np.empty((height, width, 3), np.float32)
    canvas[:] = rng.choice(BACKDROPS[background])
    for o in objects:
        _paint(canvas, o, rng.choice(SHADES[o.colour]), rng)
    image = Image.fromarray(np.round(canvas).astype(np.uint8), "RGB")
    if rng.random() < 0.5:  # resampled, as pictures are when shared
        scale = rng.uniform(0.6, 1.5)
        size = (max(32, round(width * scale)), max(32, round(height * scale)))
        image = image.resize(size, rng.choice((Image.Resampling.NEAREST, Image.Resampling.BICUBIC)))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=rng.randint(45, 90))
    return Drawing(Image.open(buffer).convert("RGB"), background, objects)


def _paint(canvas: np.ndarray, o: Drawn, rgb, rng: random.Random) -> None:
    """Blend the object's coverage mask into the canvas, within its bounding box."""
    height, width, _ = canvas.shape
    short = min(width, height)
    radius = o.span * short / 2
    centre_x = (width - short) / 2 + o.cx * short
    centre_y = (height - short) / 2 + o.cy * short
    x0, x1 = max(0, int(centre_x - radius) - 2), min(width, int(centre_x + radius) + 3)
    y0, y1 = max(0, int(centre_y - radius) - 2), min(height, int(centre_y + radius) + 3)
    offsets = (np.arange(SUBSAMPLES) + 0.5) / SUBSAMPLES
    xs = (np.arange(x0, x1)[:, None] + offsets).ravel()
    ys = (np.arange(y0, y1)[:, None] + offsets).ravel()
    # sample points in the object's own frame: unit circumradius, turned back upright
    dx, dy = (xs[None, :] - centre_x) / radius, (ys[:, None] - centre_y) / radius
    cos, sin = math.cos(o.turn), math.sin(o.turn)
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    shape_params = _shape_params(o.shape, rng)
    covered = _inside(o.shape, u, v, 0.0, shape_params)
    if o.outline:
        covered &= ~_inside(o.shape, u, v, o.outline * short / radius, shape_params)
    coverage = covered.reshape(y1 - y0, SUBSAMPLES, x1 - x0, SUBSAMPLES).mean(axis=(1, 3))[..., None]
    box = canvas[y0:y1, x0:x1]
    box[:] = box * (1 - coverage) + np.array(rgb, np.float32) * coverage


def _shape_params(shape: str, rng: random.Random) -> dict:
    if shape == "star":
        return {"inner": rng.uniform(0.38, 0.5)}
    if shape == "diamond":
        return {"squeeze": rng.uniform(0.7, 0.95)}
    if shape == "hexagon":
        return {"first_corner": rng.choice((0.0, math.pi / 6))}  # flat or pointed top
    return {}


def _inside(shape: str, u: np.ndarray, v: np.ndarray, inset: float, params: dict) -> np.ndarray:
    """Which sample points (u, v), in units of the circumradius, lie inside the shape shrunk by `inset`."""
    if shape == "circle":
        return np.hypot(u, v) <= 1 - inset
    if shape == "star":
        return _inside_star(u, v, inset, params["inner"])
    if shape == "diamond":
        return _inside_regular(u / params["squeeze"], v, inset, corners=4, first_corner=0.0)
    corners, first_corner = {"square": (4, math.pi / 4), "triangle": (3, -math.pi / 2),
                             "hexagon": (6, params.get("first_corner", 0.0))}[shape]
    return _inside_regular(u, v, inset, corners, first_corner)


def _inside_regular(u, v, inset: float, corners: int, first_corner: float) -> np.ndarray:
    """A convex regular polygon is the intersection of its sides' half-planes."""
    apothem = math.cos(math.pi / corners)
    inside = np.ones(np.broadcast_shapes(u.shape, v.shape), bool)
    for k in range(corners):
        normal = first_corner + math.pi / corners + 2 * math.pi * k / corners
        inside &= u * math.cos(normal) + v * math.sin(normal) <= apothem - inset
    return inside


def _inside_star(u, v, inset: float, inner: float) -> np.ndarray:
    """A five-pointed star, one tip up. Folding every point into the half-wedge between a tip (angle 0)
    and the next inner corner (angle pi/5) leaves one edge to test against."""
    wedge = 2 * math.pi / 5
    angle = np.mod(np.arctan2(v, u) + math.pi / 2, wedge)  # from the nearest tip anticlockwise
    folded = np.minimum(angle, wedge - angle)
    r = np.hypot(u, v)
    px, py = r * np.cos(folded), r * np.sin(folded)
    tip = np.array([1.0, 0.0])
    corner = inner * np.array([math.cos(wedge / 2), math.sin(wedge / 2)])
    edge = corner - tip
    outward = np.array([edge[1], -edge[0]]) / np.linalg.norm(edge)
    if outward @ -tip > 0:  # point it away from the centre
        outward = -outward
    return (px - tip[0]) * outward[0] + (py - tip[1]) * outward[1] <= -inset
