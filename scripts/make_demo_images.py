#!/usr/bin/env python3
"""Draw demo_example_images/: scenes the demo model knows, and richer pictures for the real model.

    python scripts/make_demo_images.py

Writes PNG files and scenes.json (each scene image's caption and objects, the ground truth).
"""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from magma_ipu.demo.scenes import draw_scene, random_scene  # noqa: E402

OUT = ROOT / "demo_example_images"
SCENE_SEEDS = (101, 202, 303, 404, 505, 606, 707)


def sky_gradient(w: int, h: int, top, bottom) -> Image.Image:
    t = np.linspace(0, 1, h)[:, None, None]
    rows = (1 - t) * np.array(top) + t * np.array(bottom)
    return Image.fromarray(np.repeat(rows, w, axis=1).astype(np.uint8))


def cabin_by_a_lake(w=640, h=448) -> Image.Image:
    img = sky_gradient(w, h, (120, 170, 230), (250, 210, 170))
    d = ImageDraw.Draw(img)
    d.polygon([(0, 250), (140, 120), (260, 230), (380, 100), (520, 220), (640, 150), (640, 300), (0, 300)], fill=(90, 110, 140))
    d.rectangle((0, 300, w, h), fill=(40, 90, 150))  # lake
    for x in range(0, w, 23):  # ripples
        d.line((x, 330 + (x * 7) % 90, x + 14, 330 + (x * 7) % 90), fill=(140, 180, 220), width=2)
    d.polygon([(0, 300), (0, 250), (260, 270), (300, 300)], fill=(60, 120, 50))  # shore
    d.rectangle((70, 215, 170, 285), fill=(130, 80, 40))  # cabin
    d.polygon([(60, 218), (120, 170), (180, 218)], fill=(90, 40, 30))
    d.rectangle((110, 245, 132, 285), fill=(60, 35, 20))
    d.rectangle((142, 230, 160, 246), fill=(250, 230, 140))
    for x in (215, 245, 270):  # pines
        d.polygon([(x, 200), (x - 18, 285), (x + 18, 285)], fill=(25, 80, 40))
    return img.filter(ImageFilter.SMOOTH_MORE)


def sunny_house(w=512, h=512) -> Image.Image:
    img = sky_gradient(w, h, (90, 160, 240), (200, 230, 255))
    d = ImageDraw.Draw(img)
    d.ellipse((380, 40, 460, 120), fill=(255, 220, 40))
    for k in range(12):
        a = 2 * math.pi * k / 12
        d.line((420 + 50 * math.cos(a), 80 + 50 * math.sin(a), 420 + 70 * math.cos(a), 80 + 70 * math.sin(a)),
               fill=(255, 200, 40), width=4)
    d.rectangle((0, 360, w, h), fill=(80, 170, 60))
    d.rectangle((120, 230, 300, 380), fill=(230, 230, 220))
    d.polygon([(100, 235), (210, 150), (320, 235)], fill=(190, 40, 40))
    d.rectangle((190, 300, 230, 380), fill=(110, 70, 40))
    d.rectangle((140, 260, 175, 290), fill=(150, 200, 250))
    d.rectangle((245, 260, 280, 290), fill=(150, 200, 250))
    d.rectangle((380, 280, 400, 380), fill=(100, 60, 30))
    d.ellipse((340, 200, 440, 300), fill=(40, 130, 50))
    return img


def fruit_bowl(w=512, h=384) -> Image.Image:
    img = Image.new("RGB", (w, h), (235, 225, 205))
    d = ImageDraw.Draw(img)
    d.rectangle((0, 250, w, h), fill=(150, 100, 60))  # table
    d.ellipse((150, 150, 250, 250), fill=(220, 30, 30))  # apple
    d.line((200, 150, 205, 130), fill=(80, 50, 20), width=4)
    d.ellipse((240, 160, 330, 250), fill=(250, 150, 20))  # orange
    d.chord((300, 120, 420, 260), 200, 340, fill=(250, 225, 60))  # banana-ish
    d.chord((110, 180, 400, 300), 0, 180, fill=(60, 90, 170))  # bowl
    return img


def night_city(w=640, h=400) -> Image.Image:
    img = sky_gradient(w, h, (10, 15, 40), (40, 40, 80))
    d = ImageDraw.Draw(img)
    rng = random.Random(4)
    for _ in range(60):
        x, y = rng.randrange(w), rng.randrange(150)
        d.point((x, y), fill=(255, 255, 230))
    d.ellipse((520, 40, 570, 90), fill=(245, 245, 220))
    x = 0
    while x < w:
        bw, bh = rng.randint(40, 90), rng.randint(120, 300)
        d.rectangle((x, h - bh, x + bw, h), fill=(25, 25, 35))
        for wy in range(h - bh + 10, h - 10, 18):
            for wx in range(x + 6, x + bw - 10, 14):
                if rng.random() < 0.45:
                    d.rectangle((wx, wy, wx + 6, wy + 9), fill=(250, 210, 90))
        x += bw + rng.randint(2, 10)
    return img


def main() -> None:
    OUT.mkdir(exist_ok=True)
    scenes = {}
    for n, seed in enumerate(SCENE_SEEDS, start=1):
        scene = random_scene(random.Random(seed))
        name = f"scene_{n}.png"
        draw_scene(scene, size=320).save(OUT / name, optimize=True)
        scenes[name] = {
            "seed": seed,
            "caption": scene.caption(),
            "background": scene.background,
            "objects": [{"colour": o.colour, "shape": o.shape, "size": o.size} for o in scene.objects],
        }
    for name, draw in (("cabin_by_a_lake.png", cabin_by_a_lake), ("sunny_house.png", sunny_house),
                       ("fruit_bowl.png", fruit_bowl), ("night_city.png", night_city)):
        draw().save(OUT / name, optimize=True)
    (OUT / "scenes.json").write_text(json.dumps(scenes, indent=1) + "\n")
    print(f"wrote {len(scenes) + 4} images to {OUT}")


if __name__ == "__main__":
    main()
