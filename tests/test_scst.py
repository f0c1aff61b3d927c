"""training/scst.py and train.py's self-critical mode: the baseline, edge cases, and a short run that helps."""
import contextlib

import numpy as np
import pytest
import torch

import train
from config import load_config
from data.text.vocab import Vocabulary
from models.caption_model import build_model
from models.checkpoint import load_checkpoint
from training.scst import SelfCritical, leave_one_out_baseline


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


def expected_reward(scst, model, features, names, draws=8):
    """The mean CIDEr-D of draws x K fresh samples per image: the quantity SCST climbs."""
    torch.manual_seed(123)
    with torch.no_grad():
        return float(np.mean([scst.loss(model, model, features, names, 1.0, contextlib.nullcontext())[1]
                              for _ in range(draws)]))


@pytest.mark.parametrize("decoder, lr", [("lstm", 5e-2), ("attention", 3e-3), ("transformer", 3e-3), ("updown", 3e-3)])
def test_self_critical_steps_raise_the_expected_reward_of_samples(decoder, lr):
    """Policy-gradient steps on four images (fixed random features, two references each) raise the mean
    reward of fresh samples well beyond the noise of its estimate, for every decoder (the LSTM, which sees the
    image only as its first input, needs a larger step)."""
    references = {"a": ["a red circle on the left", "a red circle"], "b": ["two blue squares", "blue squares side by side"],
                  "c": ["a green line", "one green line at the top"], "d": ["a small yellow star", "a yellow star"]}
    vocab = Vocabulary.build([c for captions in references.values() for c in captions])
    config = load_config(None, ["model.encoder=resnet18", "model.encoder_weights=none", "model.embed_size=32",
                                "model.hidden_size=64", "model.attention_size=32", f"model.decoder={decoder}",
                                "model.dropout=0", "train.scst_samples=5", "decode.max_len=8"])
    torch.manual_seed(0)
    model = build_model(config, len(vocab))
    scst = SelfCritical(references, vocab, config)
    names = list(references)
    features = torch.randn(len(names), 4, model.encoder.feature_dim)
    before = expected_reward(scst, model, features, names)
    optimizer = torch.optim.Adam(model.decoder.parameters(), lr=lr)
    for _ in range(40):
        loss, _ = scst.loss(model, model, features, names, len(names) * scst.k, contextlib.nullcontext())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = expected_reward(scst, model, features, names)
    assert after > 1.5 * before, (before, after)


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
    with pytest.raises(ValueError, match=r"the training loss became nan at step \d+; the last good checkpoint") as stop:
        train.main(["--resume", str(tmp_path / "n"), "--set", "train.epochs=2"])
    assert "damaged cached features" in str(stop.value) and "train.lr" in str(stop.value)   # the likely causes
    assert (tmp_path / "n" / "checkpoint_last.pth").read_bytes() == good


def test_self_critical_steps_reach_a_fine_tuned_cnn_tail():
    """On a model whose CNN tail trains, the trunk's output comes in and the policy gradient reaches the tail's
    blocks too (each image's tail runs once for its K samples)."""
    references = {"a": ["a red circle"], "b": ["two blue squares"]}
    vocab = Vocabulary.build([c for captions in references.values() for c in captions])
    config = load_config(None, ["model.encoder=resnet18", "model.encoder_weights=none", "model.embed_size=16",
                                "model.hidden_size=32", "model.attention_size=16", "model.decoder=attention",
                                "model.dropout=0", "train.fine_tune_encoder=2", "decode.max_len=6"])
    torch.manual_seed(0)
    model = build_model(config, len(vocab))
    stored = model.encoder.trunk(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))
    assert stored.dim() == 4                                      # the map entering the tail, not a grid
    scst = SelfCritical(references, vocab, config)
    loss, reward = scst.loss(model, model, stored, ["a", "b"], 2 * scst.k, contextlib.nullcontext())
    loss.backward()
    assert reward >= 0 and all(p.grad is not None for p in model.encoder.tail_parameters())
    assert all(p.grad is None for p in model.encoder.backbone.parameters() if not p.requires_grad)
