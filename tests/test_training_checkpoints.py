"""training/checkpoints.py: the run's snapshot and the background checkpoint writer."""
import os
import threading

import pytest
import torch

from config import load_config
from data.text.vocab import Vocabulary
from models.caption_model import build_model
from models.checkpoint import load_checkpoint, load_model
from training import checkpoints
from training.checkpoints import CheckpointWriter, checkpoint_state
from utils import atomic_save

SMALL = ["model.encoder=resnet18", "model.encoder_weights=none", "model.embed_size=8", "model.hidden_size=8"]


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


def test_writer_skips_snapshots_superseded_while_the_disk_is_busy(tmp_path, monkeypatch):
    """Epochs that end faster than a write: the waiting snapshot for a name is replaced by the newest, and
    checkpoint_best.pth keeps the snapshot it was given."""
    writing, disk_free, written = threading.Event(), threading.Event(), []

    def slow_save(state, path, abandon=None):
        writing.set()
        disk_free.wait()
        written.append((os.path.basename(path), state["epoch"]))
        return atomic_save(state, path, abandon=abandon)

    monkeypatch.setattr(checkpoints, "atomic_save", slow_save)
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

    monkeypatch.setattr(checkpoints, "atomic_save", save)
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

    monkeypatch.setattr(checkpoints, "atomic_save", slow_save)
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


def test_a_failed_write_warns_keeps_the_earlier_file_and_is_reported(tmp_path, monkeypatch, capsys):
    writer = CheckpointWriter(str(tmp_path))
    writer.submit({"epoch": 1}, "checkpoint_last.pth")
    assert writer.finish() == []

    def full_disk(state, path, abandon=None):
        raise OSError(28, "No space left on device", path)

    monkeypatch.setattr(checkpoints, "atomic_save", full_disk)
    writer.submit({"epoch": 2}, "checkpoint_last.pth")
    assert writer.finish() == ["checkpoint_last.pth"]        # train.py ends with one line naming it
    err = capsys.readouterr().err
    assert "checkpoint not written" in err and "No space left" in err and "checkpoint_last.pth is kept" in err
    assert torch.load(tmp_path / "checkpoint_last.pth", weights_only=True) == {"epoch": 1}
    monkeypatch.undo()
    writer.submit({"epoch": 3}, "checkpoint_last.pth")       # the disk has room again
    assert writer.finish() == []
    writer.close()


def test_a_checkpoint_with_the_old_name_of_stale_validations_resumes_counting_them(tiny_overrides, tmp_path, capsys):
    """Older checkpoints hold the validations since the last improvement as progress["stale_epochs"]."""
    import train
    settings = tiny_overrides + ["train.epochs=1", "train.select_metric=loss", "train.val_decoded_images=0"]
    train.main(["--set", *settings])
    path = str(tmp_path / "run" / "checkpoint_last.pth")
    old = load_checkpoint(path)
    progress = {k: v for k, v in old["progress"].items() if k != "stale_validations"}
    atomic_save({**old, "progress": {**progress, "stale_epochs": 1, "best": 0.0}}, path)   # no loss beats 0
    train.main(["--resume", str(tmp_path / "run"), "--set", "train.epochs=3", "train.early_stop_patience=2"])
    assert "early stop: no improvement in 2 validations" in capsys.readouterr().err
    resumed = load_checkpoint(path)["progress"]
    assert resumed["epoch"] == 2 and resumed["stale_validations"] == 2 and "stale_epochs" not in resumed
