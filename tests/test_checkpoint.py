"""models/checkpoint.py: round trip, and every way a file given as a checkpoint can be wrong."""
import os
import pickle

import pytest
import torch

from config import load_config
from data.vocab import Vocabulary
from models import build_model
from models.checkpoint import load_checkpoint, load_model
from training.checkpoints import checkpoint_state
from utils import atomic_save

SMALL = ["model.encoder=resnet18", "model.encoder_weights=none", "model.embed_size=8", "model.hidden_size=8"]


def make_checkpoint(path, decoder="lstm", words=("a", "dog")):
    config = load_config(None, SMALL + [f"model.decoder={decoder}", "model.attention_size=8"])
    vocab = Vocabulary.build([" ".join(words)])
    model = build_model(config, len(vocab))
    atomic_save(checkpoint_state(model, vocab, config, progress={"epoch": 1}), str(path))
    return model, vocab


def test_round_trip_needs_only_the_checkpoint(tmp_path):
    model, vocab = make_checkpoint(tmp_path / "c.pth")
    checkpoint = load_checkpoint(str(tmp_path / "c.pth"))
    loaded, loaded_vocab, config = load_model(checkpoint)
    assert loaded_vocab.itos == vocab.itos and config["model"]["decoder"] == "lstm"
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]   # atomic write left no temp file


def test_run_folder_means_its_last_checkpoint(tmp_path):
    make_checkpoint(tmp_path / "checkpoint_last.pth")
    assert load_checkpoint(str(tmp_path))["progress"] == {"epoch": 1}


def test_truncated_checkpoint(tmp_path):
    make_checkpoint(tmp_path / "c.pth")
    data = (tmp_path / "c.pth").read_bytes()
    (tmp_path / "c.pth").write_bytes(data[:len(data) // 3])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_checkpoint(str(tmp_path / "c.pth"))


class Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickled_code_is_refused_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"format": 1, "model": {}, "vocab": [], "config": {}, "evil": Payload()}, "evil.pth")
    with open("evil2.pth", "wb") as f:
        pickle.dump(Payload(), f)
    for name in ("evil.pth", "evil2.pth"):
        with pytest.raises(ValueError, match="refused|corrupt"):
            load_checkpoint(name)
    assert not os.path.exists("pwned")


def test_other_architecture_or_vocabulary_is_named(tmp_path):
    make_checkpoint(tmp_path / "attention.pth", decoder="attention")
    checkpoint = load_checkpoint(str(tmp_path / "attention.pth"))
    checkpoint["config"]["model"]["decoder"] = "lstm"           # weights of one model, config of another
    with pytest.raises(ValueError, match="different vocabulary or architecture"):
        load_model(checkpoint)
    make_checkpoint(tmp_path / "lstm.pth", words=("a", "dog", "cat", "runs"))
    checkpoint = load_checkpoint(str(tmp_path / "lstm.pth"))
    checkpoint["vocab"] = checkpoint["vocab"][:-1]               # vocabulary of another run
    with pytest.raises(ValueError, match=r"shape of .* different vocabulary"):
        load_model(checkpoint)


def test_not_a_checkpoint(tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "x.pth")
    with pytest.raises(ValueError, match="not a checkpoint written by"):
        load_checkpoint(str(tmp_path / "x.pth"))
    with pytest.raises(ValueError, match="no such checkpoint"):
        load_checkpoint(str(tmp_path / "none.pth"))
