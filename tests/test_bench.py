"""bench.py on a tiny setting, its CUDA refusal, and the feature cache's GPU JPEG path run on the CPU."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import bench
import data.features as features
from data.dataset import ImageFiles
from models.encoder import EncoderCNN

CPU = torch.device("cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def one_thread():
    """Two busy cores run ResNet-50 several times faster on one thread than on two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_quick_run_prints_the_figures_as_json_last(tmp_path, capsys, one_thread):
    out = tmp_path / "bench.json"
    bench.main(["--quick", "--device", "cpu", "--data", "generated", "--images", "3", "--epochs", "1",
                "--image-size", "32", "--out", str(out)])
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result == json.loads(out.read_text())
    assert result["device"] == "cpu" and result["images"] == 3 and result["captions"] == 15
    names = {"extraction_images_per_s", "train_captions_per_s", "epoch_30k_captions_s", "end_to_end_per_epoch_s",
             "infer_greedy_bs1_images_per_s", "infer_beam3_bs1_images_per_s", "infer_greedy_bs3_images_per_s",
             "infer_beam3_bs3_images_per_s", "peak_memory_bytes"}
    assert set(result["figures"]) == names
    for figure in result["figures"].values():
        assert all(math.isfinite(figure[k]) and figure[k] > 0 for k in ("ours", "naive", "ratio"))
    assert result["figures"]["end_to_end_per_epoch_s"]["naive_epochs"] == 1
    assert "epoch_30k_captions_s.naive" in result["extrapolated"]
    assert "extraction_images_per_s" in captured.err          # the table


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_a_one_line_error():
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--device", "cuda"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.startswith("error: ") and "cuda" in run.stderr and run.stderr.count("\n") == 1


def test_cache_of_another_encoder_is_not_reused(tiny_data, tmp_path):
    files = [os.path.join(tiny_data[1], f"shape_{i:04d}.png") for i in range(3)]
    torch.manual_seed(0)
    resnet18, resnet34 = EncoderCNN("resnet18", "none", 16, True), EncoderCNN("resnet34", "none", 16, True)
    features.extract_features(resnet18, files, 32, str(tmp_path), CPU, num_workers=0)
    calls = []
    real = resnet34.extract
    resnet34.extract = lambda images: calls.append(len(images)) or real(images)
    got, _ = features.extract_features(resnet34, files, 32, str(tmp_path), CPU, num_workers=0)
    assert calls == [3] and len(os.listdir(tmp_path)) == 2           # recomputed, into its own folder
    expected = real(torch.stack([ImageFiles(files, 32)[i][0] for i in range(3)])).half()
    assert torch.allclose(got.float(), expected.float(), atol=1e-2)


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


@pytest.mark.parametrize("decode_bytes", [features.DECODE_BYTES, 1])     # 1: each file decoded on its own
def test_jpeg_path_gives_pils_pixels_and_rejects_bad_files(jpegs, decode_bytes, monkeypatch):
    monkeypatch.setattr(features, "DECODE_BYTES", decode_bytes)
    images, good, rejected = [], [], []
    for batch, decoded, bad in features.jpeg_batches(jpegs, 32, 4, CPU):   # the CUDA code path, on the CPU
        images.append(batch)
        good += decoded
        rejected += bad
    assert good == [0, 1, 4, 5] and rejected == [2, 3]
    pil = torch.stack([ImageFiles(jpegs, 32)[i][0] for i in good])
    assert (torch.cat(images).int() - pil.int()).abs().max() <= 1


def test_gpu_path_of_extract_features_skips_and_counts_bad_files(jpegs, monkeypatch, capsys):
    encoder = EncoderCNN("resnet18", "none", 16, True)
    reference, ok = features.extract_features(encoder, jpegs, 32, None, CPU, num_workers=0)
    monkeypatch.setattr(features, "gpu_jpeg_available", lambda device: True)
    monkeypatch.setattr(features, "GPU_DECODE_MIN", 1)
    got, ok_gpu = features.extract_features(encoder, jpegs, 32, None, CPU, num_workers=0)
    assert ok_gpu == ok == [True, True, False, False, True, True]
    assert torch.allclose(got.float(), reference.float(), atol=0.05)
    assert capsys.readouterr().err.count("2 of 6 images could not be read") == 2
