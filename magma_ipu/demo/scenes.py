"""The demo model's world: procedurally drawn scenes of coloured shapes, with captions and Q/A.

A scene has a background and one to three objects, each a distinct shape and a distinct colour,
small or large, in distinct cells of a 3 x 3 grid. Captions list the objects in reading order,
top row first, left to right ("A picture of a small red circle to the left of a large blue star.");
questions ask for a colour, a shape, a size, the count or the background.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

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
GRID = 3
# Scene notation: one token per grid cell (row-major, top row first), naming the object in it or,
# for an empty cell, the background. The demo model's language model learns to read it from text
# in its first training stage; the image prefix then learns to stand in for it.
NOTATION_TOKENS = tuple(
    [f"<|{size} {colour} {shape}|>" for size in SIZES for colour in COLOURS for shape in SHAPES]
    + [f"<|{background}|>" for background in BACKGROUNDS]
)


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    x: float  # centre, as a fraction of the width
    y: float  # centre, as a fraction of the height

    @property
    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"

    @property
    def row(self) -> int:
        return int(self.y * GRID)

    @property
    def column(self) -> int:
        return int(self.x * GRID)


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[SceneObject, ...]

    def caption(self) -> str:
        objs = sorted(self.objects, key=lambda o: (o.row, o.x))  # reading order: top row first, left to right
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
        qa = [
            ("Q: How many shapes are there? A:", f" {NUMBERS[len(self.objects)]}"),
            ("Q: What colour is the background? A:", f" {self.background}"),
        ]
        for o in self.objects:
            qa.append((f"Q: What colour is the {o.shape}? A:", f" {o.colour}"))
            qa.append((f"Q: What shape is the {o.colour} object? A:", f" {o.shape}"))
            qa.append((f"Q: Is the {o.shape} small or large? A:", f" {o.size}"))
        return qa

    def examples(self) -> list[tuple[str, str]]:
        return [(CAPTION_PROMPT, self.caption())] + self.questions()


def random_scene(rng: random.Random) -> Scene:
    count = rng.randint(1, 3)
    shapes = rng.sample(SHAPES, count)
    colours = rng.sample(list(COLOURS), count)
    cells = rng.sample(range(9), count)
    objects = []
    for shape, colour, cell in zip(shapes, colours, cells):
        x = (cell % 3 + 0.5 + rng.uniform(-0.12, 0.12)) / 3
        y = (cell // 3 + 0.5 + rng.uniform(-0.12, 0.12)) / 3
        objects.append(SceneObject(shape, colour, rng.choice(SIZES), x, y))
    return Scene(rng.choice(list(BACKGROUNDS)), tuple(objects))


def _polygon(cx: float, cy: float, radius: float, corners: int, rotation: float, inner: float = 1.0):
    points = []
    steps = corners * (2 if inner != 1.0 else 1)
    for i in range(steps):
        r = radius if i % 2 == 0 or inner == 1.0 else radius * inner
        angle = rotation + 2 * math.pi * i / steps
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return points


def draw_scene(scene: Scene, size: int = 256, supersample: int = 4) -> Image.Image:
    """The scene as an RGB image of size x size pixels (drawn larger and downsampled: smooth edges)."""
    big = size * supersample
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    pen = ImageDraw.Draw(image)
    for o in scene.objects:
        cx, cy = o.x * big, o.y * big
        r = big * (0.085 if o.size == "small" else 0.14)
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif o.shape == "square":
            s = r * 0.85
            pen.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
        elif o.shape == "triangle":
            pen.polygon(_polygon(cx, cy + r * 0.15, r * 1.1, 3, -math.pi / 2), fill=fill)
        elif o.shape == "star":
            pen.polygon(_polygon(cx, cy, r * 1.15, 5, -math.pi / 2, inner=0.45), fill=fill)
        elif o.shape == "diamond":
            pen.polygon(_polygon(cx, cy, r * 1.1, 4, -math.pi / 2), fill=fill)
        elif o.shape == "hexagon":
            pen.polygon(_polygon(cx, cy, r, 6, 0.0), fill=fill)
    return image.resize((size, size), Image.Resampling.LANCZOS)


def names_objects(text: str, scene: Scene) -> list[bool]:
    """For each object: does `text` name its colour and shape together ("red circle")?"""
    return [f"{o.colour} {o.shape}" in text for o in scene.objects]
