"""Checkpoint I/O: round trip, every way a checkpoint file can be wrong, and the background writer."""
import os
import pickle
import threading

import pytest
import torch

from config import load_config
from data.vocab import Vocabulary
from models import build_model
import utils
from utils import (CheckpointWriter, atomic_link, atomic_save, checkpoint_state, load_checkpoint, load_model,
                   pick_device)

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


def test_snapshot_copies_trained_weights_and_reuses_unchanging_ones(tmp_path):
    config = load_config(None, SMALL)
    vocab = Vocabulary.build(["a dog"])
    model = build_model(config, len(vocab))
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("encoder.backbone.")}
    state = checkpoint_state(model, vocab, config, frozen)
    assert all(state["model"][k] is v for k, v in frozen.items())
    embedding = next(k for k in state["model"] if k.startswith("decoder.embed"))
    before = state["model"][embedding].clone()
    with torch.no_grad():
        model.state_dict()[embedding].add_(1.0)      # training goes on while the snapshot is written
    assert torch.equal(state["model"][embedding], before)
    atomic_save(state, str(tmp_path / "c.pth"))
    loaded, _, _ = load_model(load_checkpoint(str(tmp_path / "c.pth")))
    assert torch.equal(loaded.state_dict()["encoder.backbone.0.weight"], frozen["encoder.backbone.0.weight"])


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


def test_pick_device():
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            pick_device("cuda")


@pytest.mark.parametrize("links", [True, False])
def test_atomic_link_gives_a_second_name_to_the_same_bytes(tmp_path, monkeypatch, links):
    if not links:                               # a file system without hard links: a copy instead
        monkeypatch.setattr(os, "link", lambda src, dst: (_ for _ in ()).throw(OSError("not supported")))
    make_checkpoint(tmp_path / "last.pth")
    (tmp_path / "best.pth").write_bytes(b"an older best")
    atomic_link(str(tmp_path / "last.pth"), str(tmp_path / "best.pth"))
    assert (tmp_path / "best.pth").read_bytes() == (tmp_path / "last.pth").read_bytes()
    assert os.path.samefile(tmp_path / "best.pth", tmp_path / "last.pth") == links
    assert sorted(os.listdir(tmp_path)) == ["best.pth", "last.pth"]      # no temp file left


def test_writer_skips_snapshots_superseded_while_the_disk_is_busy(tmp_path, monkeypatch):
    """Epochs that end faster than a write: the waiting snapshot for a name is replaced by the newest, and
    checkpoint_best.pth keeps the snapshot it was given."""
    writing, disk_free, written = threading.Event(), threading.Event(), []

    def slow_save(state, path, abandon=None):
        writing.set()
        disk_free.wait()
        written.append((os.path.basename(path), state["epoch"]))
        return atomic_save(state, path, abandon=abandon)

    monkeypatch.setattr(utils, "atomic_save", slow_save)
    writer = CheckpointWriter(str(tmp_path))
    try:
        writer.submit({"epoch": 1}, "checkpoint_last.pth", "checkpoint_best.pth")
        assert writing.wait(timeout=60)                                         # epoch 1 is being written
        writer.submit({"epoch": 2}, "checkpoint_last.pth", "checkpoint_best.pth")
        writer.submit({"epoch": 3}, "checkpoint_last.pth")
        writer.submit({"epoch": 4}, "checkpoint_last.pth")
    finally:
        disk_free.set()                                 # a failed call must not leave the writer blocked
    writer.finish()
    writer.close()
    assert written[0] == ("checkpoint_last.pth", 1)                           # then two files at once
    assert sorted(written[1:]) == [("checkpoint_best.pth", 2), ("checkpoint_last.pth", 4)]
    assert torch.load(tmp_path / "checkpoint_last.pth", weights_only=True) == {"epoch": 4}
    assert torch.load(tmp_path / "checkpoint_best.pth", weights_only=True) == {"epoch": 2}
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_best.pth", "checkpoint_last.pth"]


def test_writer_writes_different_snapshots_at_once(tmp_path, monkeypatch):
    writing, disk_free = threading.Event(), threading.Event()
    both_started = threading.Barrier(2, timeout=60)      # broken, and the test failed, if one waited for the other

    def save(state, path, abandon=None):
        if state["epoch"] == 1:                         # the disk is busy while epochs 2 and 3 end
            writing.set()
            disk_free.wait()
        else:
            both_started.wait()
        return atomic_save(state, path, abandon=abandon)

    monkeypatch.setattr(utils, "atomic_save", save)
    writer = CheckpointWriter(str(tmp_path))
    try:
        writer.submit({"epoch": 1}, "checkpoint_last.pth", "checkpoint_best.pth")
        assert writing.wait(timeout=60)
        writer.submit({"epoch": 2}, "checkpoint_last.pth", "checkpoint_best.pth")
        writer.submit({"epoch": 3}, "checkpoint_last.pth")
    finally:
        disk_free.set()
    writer.finish()
    writer.close()
    assert torch.load(tmp_path / "checkpoint_best.pth", weights_only=True) == {"epoch": 2}
    assert torch.load(tmp_path / "checkpoint_last.pth", weights_only=True) == {"epoch": 3}


@pytest.mark.parametrize("covered", [True, False])
def test_writer_abandons_a_write_the_last_snapshot_replaces(tmp_path, monkeypatch, covered):
    """The run's last snapshot does not wait for an older write of the same names to finish; an older write
    of a name it does not replace (checkpoint_best.pth) is finished."""
    writing, disk_free, saved = threading.Event(), threading.Event(), []

    def slow_save(state, path, abandon=None):
        writing.set()
        disk_free.wait()
        saved.append((os.path.basename(path), state["epoch"], atomic_save(state, path, abandon=abandon)))
        return saved[-1][2]

    monkeypatch.setattr(utils, "atomic_save", slow_save)
    writer = CheckpointWriter(str(tmp_path))
    try:
        writer.submit({"epoch": 1}, "checkpoint_last.pth", *([] if covered else ["checkpoint_best.pth"]))
        assert writing.wait(timeout=60)                                         # epoch 1 is being written
        writer.submit({"epoch": 2}, "checkpoint_last.pth", last=True)
    finally:
        disk_free.set()
    writer.finish()
    writer.close()
    assert saved == [("checkpoint_last.pth", 1, not covered), ("checkpoint_last.pth", 2, True)]
    assert torch.load(tmp_path / "checkpoint_last.pth", weights_only=True) == {"epoch": 2}
    assert sorted(os.listdir(tmp_path)) == ([] if covered else ["checkpoint_best.pth"]) + ["checkpoint_last.pth"]
    if not covered:
        assert torch.load(tmp_path / "checkpoint_best.pth", weights_only=True) == {"epoch": 1}


def test_abandoned_atomic_save_leaves_the_old_file(tmp_path):
    atomic_save({"epoch": 1}, str(tmp_path / "c.pth"))
    abandon = threading.Event()
    abandon.set()
    assert not atomic_save({"epoch": 2, "weights": torch.zeros(1000)}, str(tmp_path / "c.pth"), abandon=abandon)
    assert torch.load(tmp_path / "c.pth", weights_only=True) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["c.pth"]                                    # no temp file left


def test_writer_raises_a_failed_write(tmp_path, monkeypatch):
    def full_disk(state, path, abandon=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(utils, "atomic_save", full_disk)
    writer = CheckpointWriter(str(tmp_path))
    writer.submit({"epoch": 1}, "checkpoint_last.pth")
    with pytest.raises(OSError, match="No space left"):
        writer.finish()
    writer.submit({"epoch": 2}, "checkpoint_last.pth")      # a new round starts after a failed one
    with pytest.raises(OSError, match="No space left"):
        writer.finish()
    writer.close()
