"""The demo model's world: procedurally drawn scenes of coloured shapes, with captions and Q/A.

A scene has a background and one to three objects, each a distinct shape and a distinct colour, of any
size from a few percent of the picture to most of it, anywhere, a little rotated, filled or outlined.
Positions are fractions of the centre square of the canvas: the part the model sees after CLIP's
center crop. An object belongs to the cell of the 3 x 3 grid that holds its centre, however many
cells it covers, and no two objects share a cell. Captions list the objects once each in reading
order, by the cells of their centres: top row first, left to right ("A picture of a small red circle
to the left of a large blue star."); questions ask for a colour, a shape, a size, the count or the
background.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
BACKGROUNDS = {"white": (245, 245, 245), "grey": (150, 150, 150), "black": (15, 15, 15)}
SIZES = ("small", "large")
NUMBERS = ("zero", "one", "two", "three")
CAPTION_PROMPT = "A picture of"
QUESTIONS = {
    "count": "Q: How many shapes are there? A:",
    "background": "Q: What colour is the background? A:",
    "colour": "Q: What colour is the {shape}? A:",
    "shape": "Q: What shape is the {colour} object? A:",
    "size": "Q: Is the {shape} small or large? A:",
}
GRID = 3
# An object is "large" from this extent on: its circumscribed circle's diameter as a fraction of the
# short side of the picture.
LARGE_FROM = 0.22
# Scene notation: one token per grid cell (row-major, top row first), naming the object whose centre
# lies in it or, for every other cell, the background. The demo model's language model learns to read
# it from text in its first training stage; the image prefix then learns to stand in for it.
NOTATION_TOKENS = tuple(
    [f"<|{size} {colour} {shape}|>" for size in SIZES for colour in COLOURS for shape in SHAPES]
    + [f"<|{background}|>" for background in BACKGROUNDS]
)
# Width / height before turning, drawn from these ranges. A circle squeezed to 0.87 has a hexagon's proportions
# (flat to flat over corner to corner), the one cue that tells them apart when they are a dozen pixels across:
# both stay regular.
STRETCH = {"circle": (1.0, 1.0), "square": (0.85, 1.15), "triangle": (0.85, 1.15), "star": (0.85, 1.15),
           "diamond": (0.6, 1.0), "hexagon": (1.0, 1.0)}
# Turning a square by 45 degrees makes a diamond, so those two turn only a little; the others turn
# freely within their symmetry (a triangle up to half of it: turned by 60 degrees it points down).
TURN_DEGREES = {"circle": 180.0, "square": 20.0, "diamond": 20.0, "triangle": 30.0, "star": 36.0, "hexagon": 30.0}


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    x: float  # centre, as a fraction of the seen square's width
    y: float  # centre, as a fraction of its height
    extent: float = 0.3  # circumscribed diameter, as a fraction of the seen square's side
    angle: float = 0.0  # degrees, clockwise
    stretch: float = 1.0  # width / height before turning
    outline: float = 0.0  # stroke width as a fraction of the square's side; 0: filled

    @property
    def size(self) -> str:
        return "large" if self.extent >= LARGE_FROM else "small"

    @property
    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"

    @property
    def row(self) -> int:
        return min(int(self.y * GRID), GRID - 1)

    @property
    def column(self) -> int:
        return min(int(self.x * GRID), GRID - 1)


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[SceneObject, ...]

    def caption(self) -> str:
        objs = sorted(self.objects, key=lambda o: (o.row, o.column))  # reading order by the centres' cells
        if len(objs) == 1:
            body = objs[0].phrase
        elif len(objs) == 2:
            a, b = objs
            body = f"{a.phrase} {'to the left of' if a.row == b.row else 'above'} {b.phrase}"
        else:
            body = ", ".join(o.phrase for o in objs[:-1]) + f" and {objs[-1].phrase}"
        return f" {body}."

    def notation(self) -> str:
        """The scene in scene notation: GRID * GRID tokens, the cell in row r, column c at r * GRID + c."""
        cells = [f"<|{self.background}|>"] * GRID**2
        for o in self.objects:
            cells[o.row * GRID + o.column] = f"<|{o.size} {o.colour} {o.shape}|>"
        return "".join(cells)

    def questions(self) -> list[tuple[str, str]]:
        """(question prompt, answer) pairs; the prompt ends with 'A:' and the answer starts with a space."""
        qa = [(QUESTIONS["count"], f" {NUMBERS[len(self.objects)]}"), (QUESTIONS["background"], f" {self.background}")]
        for o in self.objects:
            qa.append((QUESTIONS["colour"].format(shape=o.shape), f" {o.colour}"))
            qa.append((QUESTIONS["shape"].format(colour=o.colour), f" {o.shape}"))
            qa.append((QUESTIONS["size"].format(shape=o.shape), f" {o.size}"))
        return qa

    def examples(self) -> list[tuple[str, str]]:
        return [(CAPTION_PROMPT, self.caption())] + self.questions()


def random_scene(rng: random.Random) -> Scene:
    """One to three objects, small or large in equal measure, placed anywhere without overlapping."""
    while True:
        count = rng.randint(1, 3)
        objects = _place(rng, rng.sample(SHAPES, count), rng.sample(list(COLOURS), count))
        if objects:
            return Scene(rng.choice(list(BACKGROUNDS)), objects)


def _place(rng: random.Random, shapes, colours) -> tuple[SceneObject, ...] | None:
    largest = (0.8, 0.45, 0.36)[len(shapes) - 1]  # room for the others
    placed: list[SceneObject] = []
    for shape, colour in zip(shapes, colours):
        extent = rng.uniform(0.1, LARGE_FROM) if rng.random() < 0.5 else rng.uniform(LARGE_FROM, largest)
        margin = 0.4 * extent  # a little may be cut off by the picture's edge
        for _ in range(30):
            x, y = rng.uniform(margin, 1 - margin), rng.uniform(margin, 1 - margin)
            candidate = _random_object(rng, shape, colour, x, y, extent)
            if all(_apart(candidate, o) for o in placed):
                placed.append(candidate)
                break
        else:
            return None
    return tuple(placed)


def _random_object(rng: random.Random, shape: str, colour: str, x: float, y: float, extent: float) -> SceneObject:
    turn = TURN_DEGREES[shape]
    stretch = rng.uniform(*STRETCH[shape])
    outline = rng.uniform(0.015, 0.05) if rng.random() < 0.25 else 0.0
    return SceneObject(shape, colour, x, y, extent, rng.uniform(-turn, turn), stretch, outline)


def _apart(a: SceneObject, b: SceneObject) -> bool:
    """Different cells, and the circumscribed circles (nearly) clear of each other."""
    return (a.row, a.column) != (b.row, b.column) and math.dist((a.x, a.y), (b.x, b.y)) >= 0.5 * (a.extent + b.extent)


def _outline_points(o: SceneObject, cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    """The shape's corners around (cx, cy) for a circumscribed radius, stretched, then turned."""
    if o.shape == "circle":
        corners = [(math.cos(2 * math.pi * i / 48), math.sin(2 * math.pi * i / 48)) for i in range(48)]
    elif o.shape == "star":
        corners = [(0.45 ** (i % 2) * math.cos(-math.pi / 2 + math.pi * i / 5),
                    0.45 ** (i % 2) * math.sin(-math.pi / 2 + math.pi * i / 5)) for i in range(10)]
    else:
        sides, start = {"square": (4, math.pi / 4), "diamond": (4, 0.0), "triangle": (3, -math.pi / 2),
                        "hexagon": (6, 0.0)}[o.shape]
        corners = [(math.cos(start + 2 * math.pi * i / sides), math.sin(start + 2 * math.pi * i / sides))
                   for i in range(sides)]
    turn = math.radians(o.angle)
    cos, sin = math.cos(turn), math.sin(turn)
    points = []
    for u, v in corners:
        u *= o.stretch
        points.append((cx + radius * (u * cos - v * sin), cy + radius * (u * sin + v * cos)))
    return points


def _draw_objects(image: Image.Image, scene: Scene, colour_of) -> None:
    """Draw the objects into the centre square of `image`; colour_of(name) gives each RGB."""
    side = min(image.size)
    left, top = (image.width - side) / 2, (image.height - side) / 2
    pen = ImageDraw.Draw(image)
    for o in scene.objects:
        points = _outline_points(o, left + o.x * side, top + o.y * side, o.extent * side / 2)
        if o.outline:
            pen.polygon(points, outline=colour_of(o.colour), width=max(1, round(o.outline * side)))
        else:
            pen.polygon(points, fill=colour_of(o.colour))


def draw_scene(scene: Scene, size: int = 256, supersample: int = 4) -> Image.Image:
    """The scene as a clean RGB image of size x size pixels in the palette's own colours (drawn larger
    and downsampled: smooth edges)."""
    image = Image.new("RGB", (size * supersample,) * 2, BACKGROUNDS[scene.background])
    _draw_objects(image, scene, COLOURS.get)
    return image.resize((size, size), Image.Resampling.LANCZOS)


def draw_varied(scene: Scene, rng: random.Random) -> Image.Image:
    """The scene as users' pictures come: a canvas of any size and aspect ratio (the scene in its
    centre square), shifted shades, a background gradient, resampling and, mostly, JPEG artefacts."""
    short = rng.randint(64, 320)
    long = round(short * math.exp(rng.uniform(0, math.log(2.2))))
    width, height = (long, short) if rng.random() < 0.5 else (short, long)
    supersample = rng.choice((1, 2, 2, 3))
    image = _background(rng, BACKGROUNDS[scene.background], width * supersample, height * supersample)
    shades = {name: _jitter(rng, rgb, 30) for name, rgb in COLOURS.items()}
    _draw_objects(image, scene, shades.get)
    filter_ = rng.choice((Image.Resampling.LANCZOS, Image.Resampling.BILINEAR, Image.Resampling.BOX))
    image = image.resize((width, height), filter_)
    if rng.random() < 0.7:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=rng.randint(20, 95))
        image = Image.open(buffer).convert("RGB")
    return image


def _jitter(rng: random.Random, rgb, spread: int) -> tuple[int, ...]:
    return tuple(min(255, max(0, c + rng.randint(-spread, spread))) for c in rgb)


def _background(rng: random.Random, rgb, width: int, height: int) -> Image.Image:
    """A shade of the background with a gentle linear gradient in a random direction."""
    shift = rng.uniform(-25, 25)  # mostly lighter or darker; a faint tint at most
    base = np.array(_jitter(rng, rgb, 8), np.float32) + shift
    slope = rng.uniform(-25, 25)
    angle = rng.uniform(0, 2 * math.pi)
    across = (np.arange(width, dtype=np.float32) / width - 0.5) * (slope * math.cos(angle))  # W
    down = (np.arange(height, dtype=np.float32) / height - 0.5) * (slope * math.sin(angle))  # H
    pixels = np.clip(down[:, None, None] + across[None, :, None] + base, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def names_objects(text: str, scene: Scene) -> list[bool]:
    """For each object: does `text` name its colour and shape together ("red circle")?"""
    return [f"{o.colour} {o.shape}" in text for o in scene.objects]
