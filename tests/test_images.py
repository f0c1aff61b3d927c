"""data/images/reading.py: reading images as viewers show them, bad files skipped, folders listed."""
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from config import DEFAULTS, merge
from data.images.reading import ImageFiles, collate_images, list_images, load_image
from data.text.captions import load_splits
from tests.conftest import ROOT


def test_image_folder_without_images(tmp_path, tiny_data):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    data = merge(DEFAULTS, {"data": {"captions": tiny_data[0], "images": str(tmp_path / "empty")}}, "test")["data"]
    with pytest.raises(ValueError, match="has no images"):
        load_splits(data)
    with pytest.raises(ValueError, match="no images found"):
        list_images([str(tmp_path / "empty")])


def test_bad_images_are_skipped_not_fatal(tmp_path, tiny_data):
    good = f"{tiny_data[1]}/shape_0000.png"
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(open(good, "rb").read()[:40])
    text = tmp_path / "text.jpg"
    text.write_text("not an image")
    for bad in (corrupt, text, tmp_path / "missing.jpg"):
        with pytest.raises(ValueError, match=str(bad.name)):
            load_image(str(bad))
    files = ImageFiles([good, str(corrupt), str(text)], size=32)
    images, ok, failed = collate_images([files[i] for i in range(3)])
    assert images.shape == (1, 3, 32, 32) and images.dtype == torch.uint8
    assert ok == [0] and failed == [1, 2]


def test_decompression_bomb_is_refused(tmp_path):
    Image.MAX_IMAGE_PIXELS, saved = 10_000, Image.MAX_IMAGE_PIXELS
    try:
        path = tmp_path / "bomb.png"
        Image.new("RGB", (200, 200)).save(path)    # 40,000 pixels > 10,000
        with pytest.raises(ValueError, match="too large"):
            load_image(str(path))
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def test_a_phone_photo_is_turned_by_its_exif_orientation(tmp_path):
    """A sensor's landscape pixels with orientation 6 ("turn 90 degrees clockwise"): a portrait photo."""
    pixels = Image.new("RGB", (80, 40), (0, 0, 255))
    pixels.paste((255, 0, 0), (0, 0, 40, 40))                      # red on the sensor's left half
    exif = Image.Exif()
    exif[0x0112] = 6
    pixels.save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    image = load_image(str(tmp_path / "phone.jpg"))
    assert image.size == (40, 80)                                  # portrait, as a viewer shows it
    top, bottom = image.getpixel((20, 5)), image.getpixel((20, 75))
    assert top[0] > 200 and bottom[2] > 200                        # the left half turned to the top
    tensor, _ = ImageFiles([str(tmp_path / "phone.jpg")], 32)[0]    # training and inference read it the same way
    assert tensor[0, :8].float().mean() > 200 and tensor[2, -8:].float().mean() > 200


def test_names_that_are_not_utf8_are_skipped_and_counted(tmp_path, tiny_data):
    folder = os.fsencode(str(tmp_path / "photos"))
    os.mkdir(folder)
    good = open(os.path.join(tiny_data[1], "shape_0000.png"), "rb").read()
    for name in (b"ok.png", b"caf\xe9.png"):                        # a Latin-1 name from an old camera card
        with open(os.path.join(folder, name), "wb") as f:
            f.write(good)
    files = list_images([os.fsdecode(folder)])
    assert [os.path.basename(f) for f in files] == ["ok.png"]
    # As a user runs it: the other image is captioned, and the one-line warning names the file as bytes allow.
    result = subprocess.run([sys.executable, "-c", "from data.images.reading import list_images; import sys; "
                             "print(len(list_images(sys.argv[1:])))", os.fsdecode(folder)],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "1"
    assert "skipped 1 file whose name is not valid UTF-8 (e.g." in result.stderr and "caf\\xe9.png" in result.stderr


def test_a_folders_other_files_are_counted_and_named(tmp_path, tiny_data, capsys):
    import shutil
    shutil.copy(os.path.join(tiny_data[1], "shape_0000.png"), tmp_path)
    for name in ("notes.txt", "b.pdf", "c.doc", "d.zip"):
        (tmp_path / name).write_text("x")
    (tmp_path / ".DS_Store").write_text("x")                 # hidden files are not the user's
    (tmp_path / "sub").mkdir()
    assert list_images([str(tmp_path)]) == [str(tmp_path / "shape_0000.png")]
    assert capsys.readouterr().err == (f"warning: {tmp_path}: skipped 4 files without an image's extension "
                                       f"(b.pdf, c.doc, d.zip, ...); images are .jpg, .jpeg, .png, .webp, .bmp, .gif\n")


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    import numpy as np
    ramp = (np.arange(256 * 16, dtype=np.uint16).reshape(16, 256) * 16)     # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    pixels = np.asarray(load_image(tmp_path / "deep.png"))
    assert pixels.shape == (16, 256, 3)
    assert pixels.min() == 0 and pixels.max() == 255 and 120 < pixels.mean() < 135   # a ramp, not all white
    assert len(np.unique(pixels)) > 200


@pytest.mark.parametrize("size, reason", [((1, 10_000), "too narrow"), ((100_000, 1), "too large"),
                                          ((20_000, 800), "too large")])
def test_extreme_sizes_are_refused_from_the_header(tmp_path, size, reason):
    from data.images.reading import BadImage, probe_image
    Image.new("L", size).save(tmp_path / "odd.png")
    for read in (probe_image, load_image):
        with pytest.raises(BadImage) as refused:
            read(tmp_path / "odd.png")
        assert refused.value.reason == reason and "odd.png" in str(refused.value)


def test_a_large_image_is_shrunk_as_it_is_read(tmp_path):
    Image.new("RGB", (4000, 3000), "red").save(tmp_path / "big.jpg", quality=80)
    small = load_image(tmp_path / "big.jpg", max_side=1024)
    assert max(small.size) == 1024 and small.size[0] / small.size[1] == pytest.approx(4 / 3, rel=0.01)
    from data.images.reading import BadImage
    with pytest.raises(BadImage, match="too large"):
        load_image(tmp_path / "big.jpg", max_pixels=4_000_000)


def test_broken_links_and_loops_in_a_folder_are_counted_and_named(tmp_path, tiny_data, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "good.png").write_bytes(open(f"{tiny_data[1]}/shape_0000.png", "rb").read())
    (folder / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    (folder / "loop.jpg").symlink_to(folder / "loop.jpg")
    assert list_images([str(folder)]) == [str(folder / "good.png")]
    assert "skipped 2 links to nothing (a target gone, or a loop: gone.jpg, loop.jpg)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="a link to nothing"):
        list_images([str(folder / "gone.jpg")])
