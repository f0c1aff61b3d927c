"""Tests for data/demo.py: the committed demo dataset is reproducible and its captions match the pixels."""
import colorsys
import csv
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from PIL import Image

from data.demo import make_demo_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
COMMITTED_CAPTIONS = REPO_ROOT / "captions.csv"
COMMITTED_IMAGES = REPO_ROOT / "demo_images"

# Independent of the generator's palette: typical hue (degrees) of each colour name.
HUES = {"red": 0, "orange": 30, "yellow": 55, "green": 125, "blue": 225, "purple": 285}


def read_captions(path: Path) -> dict:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        assert next(reader) == ["image", "caption"]
        captions = defaultdict(list)
        for image, caption in reader:
            captions[image].append(caption)
    return captions


def describe(path: Path) -> tuple:
    """Read (colour, shape, background, size) straight off an image's pixels."""
    image = Image.open(path).convert("RGB")
    width, height = image.size
    pixels = image.load()
    background_rgb = pixels[0, 0]  # the shape never touches the corners
    shape_xy = [(x, y) for y in range(height) for x in range(width)
                if sum(abs(a - b) for a, b in zip(pixels[x, y], background_rgb)) > 60]
    shape_rgb = Counter(pixels[x, y] for x, y in shape_xy).most_common(1)[0][0]

    hue = colorsys.rgb_to_hsv(*(c / 255 for c in shape_rgb))[0] * 360
    colour = min(HUES, key=lambda name: min(abs(hue - HUES[name]), 360 - abs(hue - HUES[name])))

    brightness = sum(background_rgb) / 3
    background = "white" if brightness > 200 else "black" if brightness < 50 else "gray"

    xs, ys = [x for x, _ in shape_xy], [y for _, y in shape_xy]
    side = max(max(xs) - min(xs), max(ys) - min(ys)) + 1
    size = "large" if side > width * 0.4 else "small"

    # Fraction of the bounding box the shape covers: ~1 square, ~0.78 circle,
    # ~0.5 triangle, ~0.35 thin cross.
    fill = len(shape_xy) / ((max(xs) - min(xs) + 1) * (max(ys) - min(ys) + 1))
    shape = ("square" if fill > 0.92 else "circle" if fill > 0.66
             else "triangle" if fill > 0.43 else "cross")
    return colour, shape, background, size


def test_regenerating_matches_committed_files(tmp_path):
    make_demo_dataset(tmp_path / "images", tmp_path / "captions.csv")
    assert (tmp_path / "captions.csv").read_bytes() == COMMITTED_CAPTIONS.read_bytes()
    generated = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert generated == sorted(p.name for p in COMMITTED_IMAGES.glob("shape_*.png"))
    for name in generated[::37]:
        assert (tmp_path / "images" / name).read_bytes() == (COMMITTED_IMAGES / name).read_bytes(), name


def test_committed_csv_references_valid_images_with_three_captions():
    captions = read_captions(COMMITTED_CAPTIONS)
    assert len(captions) == 600
    for name, image_captions in captions.items():
        assert len(image_captions) == 5, name
        assert len(set(image_captions)) == 5, name  # five different phrasings
        with Image.open(COMMITTED_IMAGES / name) as image:
            assert image.size == (64, 64) and image.mode == "RGB", name


def test_captions_agree_with_pixels():
    captions = read_captions(COMMITTED_CAPTIONS)
    for name in sorted(captions)[::5]:
        for attribute in describe(COMMITTED_IMAGES / name):
            for caption in captions[name]:
                assert attribute in caption.split(), (name, attribute, caption)


def test_dataset_varies_every_attribute_and_keeps_vocabulary_small():
    captions = read_captions(COMMITTED_CAPTIONS)
    words = {word for image_captions in captions.values() for c in image_captions for word in c.split()}
    assert len(words) < 40
    first_captions = [image_captions[0].split() for image_captions in captions.values()]
    for values in (HUES, ("circle", "square", "triangle", "cross"), ("white", "black", "gray"), ("small", "large")):
        for value in values:
            assert sum(value in c for c in first_captions) >= 600 // 144, value


def test_other_seed_gives_different_images(tmp_path):
    make_demo_dataset(tmp_path / "a", tmp_path / "a.csv", n_images=5, seed=0)
    make_demo_dataset(tmp_path / "b", tmp_path / "b.csv", n_images=5, seed=1)
    assert (tmp_path / "a.csv").read_text() != (tmp_path / "b.csv").read_text()
    assert (tmp_path / "a" / "shape_0000.png").read_bytes() != (tmp_path / "b" / "shape_0000.png").read_bytes()


def test_rejects_empty_dataset(tmp_path):
    with pytest.raises(ValueError, match="n_images"):
        make_demo_dataset(tmp_path / "images", tmp_path / "captions.csv", n_images=0)
