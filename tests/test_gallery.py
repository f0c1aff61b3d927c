"""Tests for gallery.py: captioned images, attention overlays, data URIs and the HTML gallery."""
import base64
import io
import os

import pytest
import torch
from PIL import Image

from reports import gallery


def make_image(width=200, height=100):
    image = Image.new("RGB", (width, height), (30, 120, 200))
    image.putpixel((0, 0), (255, 0, 0))
    return image


def test_caption_image_scales_and_adds_band():
    captioned = gallery.caption_image(make_image(200, 100), "a dog runs on the grass", width=400)
    assert captioned.mode == "RGB" and captioned.width == 400
    assert captioned.height > 200  # 200 px of scaled picture plus the caption band
    band = captioned.crop((0, 200, 400, captioned.height))
    colors = {color for _, color in band.getcolors(maxcolors=1 << 16)}
    assert (255, 255, 255) in colors and len(colors) > 1  # white band with drawn text


def test_long_caption_wraps_instead_of_cutting_off():
    image = make_image(300, 300)
    short = gallery.caption_image(image, "a dog", width=256)
    long = gallery.caption_image(image, " ".join(["a brown dog jumps over a fence"] * 8), width=256)
    unbroken = gallery.caption_image(image, "x" * 300, width=256)
    assert long.width == short.width == 256
    assert long.height > short.height
    assert unbroken.height > short.height  # a single overlong word is broken too


def test_caption_image_accepts_non_rgb_input():
    captioned = gallery.caption_image(Image.new("RGBA", (64, 32), (0, 0, 0, 0)), "transparent", width=128)
    assert captioned.mode == "RGB" and captioned.width == 128


@pytest.mark.parametrize("weights", [torch.softmax(torch.randn(12), 0), [0.0] * 11 + [1.0]])
def test_attention_overlay_size_and_heat(weights):
    overlay = gallery.attention_overlay(make_image(), weights, (3, 4), size=96)
    assert overlay.size == (96, 96) and overlay.mode == "RGB"
    plain = make_image().resize((96, 96))
    assert overlay.tobytes() != plain.tobytes()


def test_attention_overlay_follows_the_weights():
    gray = Image.new("RGB", (64, 64), (128, 128, 128))
    top_left = gallery.attention_overlay(gray, [1.0, 0.0, 0.0, 0.0], (2, 2), size=64)
    bottom_right = gallery.attention_overlay(gray, [0.0, 0.0, 0.0, 1.0], (2, 2), size=64)
    assert top_left.getpixel((2, 2)) == bottom_right.getpixel((61, 61))
    assert top_left.getpixel((2, 2)) != top_left.getpixel((61, 61))


def test_attention_overlay_rejects_wrong_grid():
    with pytest.raises(ValueError, match="3x3"):
        gallery.attention_overlay(make_image(), [0.1] * 8, (3, 3))


def test_image_to_data_uri_is_a_small_thumbnail():
    uri = gallery.image_to_data_uri(make_image(800, 400).convert("RGBA"), max_side=100)
    prefix = "data:image/jpeg;base64,"
    assert uri.startswith(prefix)
    with Image.open(io.BytesIO(base64.b64decode(uri[len(prefix):]))) as thumbnail:
        assert thumbnail.size == (100, 50)
    assert gallery.image_to_data_uri(make_image(), format="PNG").startswith("data:image/png;base64,")


def gallery_rows():
    thumbnail = gallery.image_to_data_uri(make_image())
    heat = gallery.image_to_data_uri(gallery.attention_overlay(make_image(), [1.0, 2.0, 3.0, 4.0], (2, 2)))
    return [
        {"image": 'we"ird&<name>.jpg', "thumbnail": thumbnail, "caption": "<script>alert(1)</script>",
         "references": ["a dog on grass", "puppy & ball"], "beams": [("a dog", -1.25), ("the dog", -2.5)],
         "attention": [("dog", heat), ("<b>grass</b>", heat)]},
        {"image": "plain.jpg", "thumbnail": thumbnail, "caption": "a cat", "references": []},
    ]


def test_write_gallery_escapes_and_is_self_contained(tmp_path):
    path = tmp_path / "out" / "gallery.html"
    gallery.write_gallery(str(path), gallery_rows(), "Val <gallery>")
    page = path.read_text(encoding="utf-8")
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert 'we"ird&<name>.jpg' not in page
    assert "we&quot;ird&amp;&lt;name&gt;.jpg" in page
    assert "<b>grass</b>" not in page and "&lt;b&gt;grass&lt;/b&gt;" in page
    assert "http://" not in page and "https://" not in page
    assert "Val &lt;gallery&gt;" in page and "2 images" in page
    assert "a dog on grass" in page and "puppy &amp; ball" in page
    assert "-1.250" in page and ">dog</figcaption>" in page
    assert page.count('class="card"') == 2
    assert os.listdir(path.parent) == ["gallery.html"]  # no temp file left behind


def test_write_gallery_rejects_external_image_urls(tmp_path):
    rows = [{"image": "x.jpg", "thumbnail": "https://example.com/x.jpg", "caption": "x", "references": []}]
    with pytest.raises(ValueError, match="data URI"):
        gallery.write_gallery(str(tmp_path / "g.html"), rows, "t")
    assert not os.listdir(tmp_path)


def test_captioned_images_are_bounded_on_both_sides():
    for size in ((20, 500), (500, 20), (3000, 2000)):
        drawn = gallery.caption_image(Image.new("RGB", size, "gray"), "a caption " * 200)
        assert drawn.width == 512 and drawn.height <= 1024 + 400, size
