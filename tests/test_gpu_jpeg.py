"""data/images/gpu_jpeg.py: the CUDA JPEG path, run on the CPU: PIL's pixels, bad files rejected, EXIF left to PIL."""
import os

import pytest
import torch
from PIL import Image

from data.features import cache as features
from data.images import gpu_jpeg
from data.images.reading import ImageFiles
from models.encoder import EncoderCNN

CPU = torch.device("cpu")


@pytest.fixture
def jpegs(tiny_data, tmp_path):
    """4 JPEGs of two sizes, a corrupt .jpg and a missing one."""
    paths = []
    for i in range(4):
        path = str(tmp_path / f"shape_{i}.jpg")
        Image.open(os.path.join(tiny_data[1], f"shape_{i:04d}.png")).resize((96, 72 if i % 2 else 64)).save(path, quality=90)
        paths.append(path)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a JPEG")
    return paths[:2] + [str(tmp_path / "broken.jpg"), str(tmp_path / "missing.jpg")] + paths[2:]


@pytest.mark.parametrize("decode_bytes", [gpu_jpeg.DECODE_BYTES, 1])     # 1: each file decoded on its own
def test_jpeg_path_gives_pils_pixels_and_rejects_bad_files(jpegs, decode_bytes, monkeypatch):
    monkeypatch.setattr(gpu_jpeg, "DECODE_BYTES", decode_bytes)
    images, good, rejected = [], [], []
    for batch, decoded, bad in gpu_jpeg.jpeg_batches(jpegs, 32, 4, CPU):   # the CUDA code path, on the CPU
        images.append(batch)
        good += decoded
        rejected += bad
    assert good == [0, 1, 4, 5] and rejected == [2, 3]
    pil = torch.stack([ImageFiles(jpegs, 32)[i][0] for i in good])
    assert (torch.cat(images).int() - pil.int()).abs().max() <= 1


def test_gpu_path_of_extract_features_skips_and_counts_bad_files(jpegs, monkeypatch, capsys):
    encoder = EncoderCNN("resnet18", "none", 16, True)
    reference, ok = features.extract_features(encoder, jpegs, 32, None, CPU, features.Loading(workers=0))
    monkeypatch.setattr(gpu_jpeg, "gpu_jpeg_available", lambda device: True)
    monkeypatch.setattr(gpu_jpeg, "GPU_DECODE_MIN", 1)
    got, ok_gpu = features.extract_features(encoder, jpegs, 32, None, CPU, features.Loading(workers=0))
    assert ok_gpu == ok == [True, True, False, False, True, True]
    assert torch.allclose(got[:].float(), reference[:].float(), atol=0.05)
    assert capsys.readouterr().err.count("2 of 6 images could not be read") == 2


def test_a_jpeg_turned_by_its_exif_orientation_is_left_to_pil(tmp_path):
    upright = tmp_path / "upright.jpg"
    Image.new("RGB", (80, 40), (200, 30, 30)).save(upright)
    turned = tmp_path / "turned.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6                                   # "rotate 90 degrees clockwise to view"
    Image.new("RGB", (80, 40), (30, 30, 200)).save(turned, exif=exif.tobytes())
    assert gpu_jpeg.exif_orientation(turned.read_bytes()) == 6
    batches = list(gpu_jpeg.jpeg_batches([str(upright), str(turned)], 32, 2, CPU))
    assert [good for _, good, _ in batches] == [[0]] and [bad for _, _, bad in batches] == [[1]]
