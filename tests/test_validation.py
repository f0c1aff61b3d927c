"""training/validation.py: the decoding that picks checkpoint_best.pth is the one that is reported."""
import torch

from config import load_config
from data.prepare import prepare_splits
from data.text.vocab import Vocabulary
from models.caption_model import build_model
from training import validation
from training.validation import describe_validation, validate


def test_validation_decodes_as_the_decode_section_says(tiny_overrides, monkeypatch):
    config = load_config(None, [*tiny_overrides, "model.decoder=attention", "train.fine_tune_encoder=2",
                                "decode.beam_size=2", "decode.no_repeat_ngram=3", "decode.length_penalty=0.5"])
    vocab = Vocabulary.build(["a red circle", "a blue square"], 1)
    model = build_model(config, len(vocab))
    val = prepare_splits(config, vocab, model.encoder, torch.device("cpu"))["val"]
    calls = []
    real = validation.generate
    monkeypatch.setattr(validation, "generate", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    from data.features.store import FeatureFeed
    loss, scores = validate(model, val, FeatureFeed(val["inputs"], torch.device("cpu"), False), config, vocab,
                            torch.autocast("cpu", enabled=False))
    assert calls and all(s.to_dict() == {"beam_size": 2, "max_len": 12, "length_penalty": 0.5, "no_repeat_ngram": 3}
                         for s in calls)
    assert loss > 0 and 0 <= scores["CIDEr"]
    assert "beam search (beam 2, length penalty 0.5), no 3-gram said twice" in describe_validation(config, 6)


def test_validation_re_ranks_with_the_training_captions_when_the_decode_section_says(tiny_overrides, monkeypatch):
    config = load_config(None, [*tiny_overrides, "decode.rerank_samples=3", "decode.beam_size=1"])
    vocab = Vocabulary.build(["a red circle", "a blue square"], 1)
    model = build_model(config, len(vocab))
    val = prepare_splits(config, vocab, model.encoder, torch.device("cpu"))["val"]
    calls = []
    real = validation.generate
    monkeypatch.setattr(validation, "generate", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    from data.features.store import FeatureFeed
    _, scores = validate(model, val, FeatureFeed(val["inputs"], torch.device("cpu"), False), config, vocab,
                         torch.autocast("cpu", enabled=False))
    assert calls and all(s.rerank_samples == 3 and s.rerank_cider.document_frequency for s in calls)
    assert 0 <= scores["CIDEr"]
    assert "consensus re-ranking of the greedy caption + 3 samples" in describe_validation(config, 6)
