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
    assert capsys.readouterr().err == (f"warning: {tmp_path}: skipped 4 files that are not images by their extension "
                                       f"(b.pdf, c.doc, d.zip, ...); images are .jpg, .jpeg, .png, .webp, .bmp, .gif\n")
