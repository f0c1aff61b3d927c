"""training/scst.py and train.py's self-critical mode: the baseline, edge cases, and a short run that helps."""
import math

import numpy as np
import pytest
import torch

import train
from models.checkpoint import load_checkpoint, load_model
from training.scst import leave_one_out_baseline


def test_leave_one_out_baseline_by_hand():
    rewards = np.array([1.0, 2.0, 3.0, 0.5, 0.5, 0.5])         # two images, K = 3
    assert np.allclose(leave_one_out_baseline(rewards, 3), [2.5, 2.0, 1.5, 0.5, 0.5, 0.5])
    advantage = rewards - leave_one_out_baseline(rewards, 3)
    assert np.allclose(advantage[3:], 0.0) and not np.isnan(advantage).any()   # equal rewards: no push, no NaN


def ce_settings(tiny_overrides, folder):
    return [o for o in tiny_overrides if not o.startswith(("train.out_dir", "train.epochs"))] + [
        "model.decoder=lstm", "model.dropout=0", "train.epochs=3", "train.lr=5e-3", "train.log_every=100",
        f"train.out_dir={folder}"]


@pytest.fixture(scope="module")
def ce_run(tiny_data, tmp_path_factory):
    from tests.conftest import tiny_settings
    folder = tmp_path_factory.mktemp("ce")
    settings = ce_settings(tiny_settings(tiny_data, folder), folder / "run")
    train.main(["--set", *settings])
    return settings, folder / "run" / "checkpoint_best.pth"


def scst_settings(ce_run, folder, epochs=2):
    settings, checkpoint = ce_run
    return [o for o in settings if not o.startswith(("train.out_dir", "train.epochs", "train.lr", "train.log_every"))] + [
        "train.scst=true", f"train.init_from={checkpoint}", f"train.epochs={epochs}", "train.lr=5e-4",
        "train.lr_schedule=constant", "train.batch_size=6", "train.scst_samples=5", "train.log_every=1",
        f"train.out_dir={folder}"]


def val_rows(folder):
    log = (folder / "loss_log.txt").read_text().splitlines()
    rows = [dict(zip(log[0].split("\t"), line.split("\t"))) for line in log[1:]]
    return [r for r in rows if r["split"] == "val"], [r for r in rows if r["split"] == "train"]


def test_on_the_demo_data_a_short_seeded_run_raises_greedy_cider(tmp_path, capsys):
    """The embedded demo (540 train images, EfficientNet-Lite2 grids at 128 px, as config.yaml): 2 epochs of
    cross-entropy, then one of self-critical training: greedy CIDEr on the 60 validation images rises."""
    small = ["model.hidden_size=128", "model.embed_size=64", "train.select_metric=cider", "train.log_every=1000",
             f"train.cache_dir={tmp_path / 'cache'}"]
    train.main(["--set", *small, "train.epochs=2", f"train.out_dir={tmp_path / 'ce'}"])
    train.main(["--set", *small, "train.scst=true", f"train.init_from={tmp_path / 'ce' / 'checkpoint_best.pth'}",
                "train.epochs=1", "train.lr=1e-4", "train.lr_schedule=constant", "train.batch_size=30",
                "train.log_every=6", f"train.out_dir={tmp_path / 'scst'}"])
    val, steps = val_rows(tmp_path / "scst")
    start, end = float(val[0]["cider"]), float(val[-1]["cider"])
    assert val[0]["step"] == "0" and end > start                           # the starting point is validated first
    assert all(math.isfinite(float(r["reward"])) for r in steps)
    assert "reward=" in capsys.readouterr().err                            # the progress bar shows it


def test_resumed_in_the_middle_equals_uninterrupted(ce_run, tmp_path, monkeypatch):
    from training import scst
    train.main(["--set", *scst_settings(ce_run, tmp_path / "a", epochs=2)])
    real, calls = scst.SelfCritical.loss, {"n": 0}

    def ctrl_c_at_step_4(self, *args, **kwargs):       # 3 steps per epoch: epoch 2, mid-epoch
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(scst.SelfCritical, "loss", ctrl_c_at_step_4)
    with pytest.raises(SystemExit):
        train.main(["--set", *scst_settings(ce_run, tmp_path / "b", epochs=2)])
    assert load_checkpoint(str(tmp_path / "b" / "checkpoint_last.pth"))["progress"]["batch"] == 1
    monkeypatch.setattr(scst.SelfCritical, "loss", real)
    train.main(["--resume", str(tmp_path / "b")])
    a = load_checkpoint(str(tmp_path / "a" / "checkpoint_last.pth"))["model"]
    b = load_checkpoint(str(tmp_path / "b" / "checkpoint_last.pth"))["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_self_critical_needs_a_starting_point_of_the_same_model(ce_run, tmp_path):
    settings = scst_settings(ce_run, tmp_path / "x")
    with pytest.raises(ValueError, match="train.scst=true starts from a trained model: set train.init_from"):
        train.main(["--set", *[o for o in settings if not o.startswith("train.init_from")]])
    with pytest.raises(ValueError, match=r"was trained with model.hidden_size=32, this run has 64"):
        train.main(["--set", *settings, "model.hidden_size=64"])
    with pytest.raises(ValueError, match=r"was trained with model.decoder='lstm', this run has 'attention'"):
        train.main(["--set", *settings, "model.decoder=attention"])


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(ce_run, tmp_path, monkeypatch):
    from training import scst
    train.main(["--set", *scst_settings(ce_run, tmp_path / "n", epochs=1)])
    good = (tmp_path / "n" / "checkpoint_last.pth").read_bytes()
    real = scst.SelfCritical.loss
    monkeypatch.setattr(scst.SelfCritical, "loss",
                        lambda self, *a, **k: (real(self, *a, **k)[0] * float("nan"), float("nan")))
    with pytest.raises(ValueError, match=r"the training loss became nan at step \d+; the last good checkpoint"):
        train.main(["--resume", str(tmp_path / "n"), "--set", "train.epochs=2"])
    assert (tmp_path / "n" / "checkpoint_last.pth").read_bytes() == good
