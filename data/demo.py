"""Embedded demo dataset: coloured shapes on plain backgrounds with template captions.

This is the default dataset, so `python train.py` works on a fresh clone without any
download. Every caption names the shape's colour, shape, size and background colour,
and all four vary independently, so a captioning model has to read them off the pixels.

Output is deterministic: only PIL drawing primitives (no antialiasing) and
`random.Random(seed)` are used, and PNGs are saved with fixed settings and no metadata,
so running it twice gives byte-identical files.

The committed demo_images/ and captions.csv were made by make_demo_dataset("demo_images", "captions.csv")
(600 images, seed 0); the tests make small ones the same way.

The CSV has header `image,caption`, 5 captions per image (one per template); `image` is the file name
relative to the images folder (e.g. `shape_0000.png`).
"""
import csv
import itertools
import random
from pathlib import Path

from PIL import Image, ImageDraw

from utils import UserError

# Saturated shape colours, far from each other and from every background colour.
SHAPE_COLOURS = {
    "red": (220, 30, 30),
    "green": (40, 170, 50),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 50, 180),
    "orange": (245, 140, 20),
}
BACKGROUND_COLOURS = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "cross")
# Side of the shape's bounding box as a fraction of the image size (min, max).
SIZES = {"small": (0.25, 0.30), "large": (0.50, 0.60)}

# Every template names all four attributes; size words precede the colour so that
# "a" never has to become "an" (e.g. "an orange").
CAPTION_TEMPLATES = (
    "a {size} {colour} {shape} on a {background} background",
    "a {size} {shape} in {colour} on {background}",
    "there is a {size} {colour} {shape} against a {background} background",
    "a {background} background with a {size} {colour} {shape}",
    "the picture shows a {size} {colour} {shape} on {background}",
)
CAPTIONS_PER_IMAGE = len(CAPTION_TEMPLATES)  # every phrasing, so an exact match is a fair test

SHAPE_JITTER = 12  # max per-channel colour offset, small enough to keep the colour name right
BACKGROUND_JITTER = 8
MARGIN = 2  # pixels kept free between the shape and the image border
CROSS_ARM = 0.2  # cross arm width as a fraction of its side: keeps it thin, unlike a square


def demo_words() -> set[str]:
    """Every word the demo's captions use."""
    words = set(SHAPE_COLOURS) | set(BACKGROUND_COLOURS) | set(SHAPES) | set(SIZES)
    for template in CAPTION_TEMPLATES:
        words |= {w for w in template.split() if not w.startswith("{")}
    return words


def knows_only_shapes(vocabulary: list[str]) -> bool:
    """Whether a model's vocabulary is the demo's: a model trained on generated shapes, which knows nothing else."""
    words = {w for w in vocabulary if not w.startswith("<")}
    return bool(words) and words <= demo_words()


def _jitter(rgb: tuple, amount: int, rng: random.Random) -> tuple:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x0: int, y0: int, side: int, fill: tuple):
    x1, y1 = x0 + side - 1, y0 + side - 1  # inclusive corners
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) // 2, y0), (x0, y1), (x1, y1)], fill=fill)
    elif shape == "cross":
        arm = max(3, round(side * CROSS_ARM))
        a0 = x0 + (side - arm) // 2
        b0 = y0 + (side - arm) // 2
        draw.rectangle([a0, y0, a0 + arm - 1, y1], fill=fill)
        draw.rectangle([x0, b0, x1, b0 + arm - 1], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; use one of {', '.join(SHAPES)}")


def render_image(colour: str, shape: str, background: str, size: str,
                 rng: random.Random, image_size: int = 64) -> Image.Image:
    """Draw one RGB image of a `size` `colour` `shape` on a `background` background."""
    image = Image.new("RGB", (image_size, image_size), _jitter(BACKGROUND_COLOURS[background], BACKGROUND_JITTER, rng))
    low, high = SIZES[size]
    side = rng.randint(round(low * image_size), round(high * image_size))
    # Position jitter: anywhere that keeps the whole shape inside the margin.
    x0 = rng.randint(MARGIN, image_size - MARGIN - side)
    y0 = rng.randint(MARGIN, image_size - MARGIN - side)
    fill = _jitter(SHAPE_COLOURS[colour], SHAPE_JITTER, rng)
    _draw_shape(ImageDraw.Draw(image), shape, x0, y0, side, fill)
    return image


def make_demo_dataset(images_dir, captions_path, n_images: int = 600, seed: int = 0,
                      image_size: int = 64) -> None:
    """Write `n_images` PNGs `shape_0000.png`... to `images_dir` and their captions CSV."""
    if n_images < 1:
        raise UserError(f"make_demo_dataset: n_images must be at least 1, got {n_images}")
    if image_size < 32:
        raise UserError(f"make_demo_dataset: image_size must be at least 32 pixels, got {image_size}")
    rng = random.Random(seed)
    images_dir, captions_path = Path(images_dir), Path(captions_path)
    images_dir.mkdir(parents=True, exist_ok=True)
    captions_path.parent.mkdir(parents=True, exist_ok=True)

    # Walk through shuffled copies of all 144 attribute combinations so every
    # combination appears about equally often.
    combos = list(itertools.product(SHAPE_COLOURS, SHAPES, BACKGROUND_COLOURS, SIZES))
    attributes = []
    while len(attributes) < n_images:
        block = combos[:]
        rng.shuffle(block)
        attributes.extend(block)

    rows = []
    for index, (colour, shape, background, size) in enumerate(attributes[:n_images]):
        name = f"shape_{index:04d}.png"
        image = render_image(colour, shape, background, size, rng, image_size)
        # Fixed compression settings and no metadata chunks keep the bytes reproducible.
        image.save(images_dir / name, format="PNG", compress_level=9, optimize=False)
        for template_index in sorted(rng.sample(range(len(CAPTION_TEMPLATES)), CAPTIONS_PER_IMAGE)):
            caption = CAPTION_TEMPLATES[template_index].format(
                size=size, colour=colour, shape=shape, background=background)
            rows.append((name, caption))

    # Explicit "\n" line endings so the CSV is identical on every platform.
    with open(captions_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(("image", "caption"))
        writer.writerows(rows)
