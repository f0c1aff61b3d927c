"""train.py end to end on a tiny model: outputs, resume equivalence, Ctrl-C, refusals."""
import os

import pytest
import torch

import train
from models.checkpoint import load_checkpoint
from training import steps


def run(overrides, *extra):
    train.main(["--set", *overrides, *extra])


def weights(path):
    return load_checkpoint(path)["model"]


def test_writes_checkpoints_log_config_vocab(tiny_overrides, tmp_path):
    run(tiny_overrides)
    out = tmp_path / "run"
    assert {"checkpoint_last.pth", "checkpoint_best.pth", "loss_log.txt", "config.yaml", "vocab.json"} <= set(os.listdir(out))
    lines = (out / "loss_log.txt").read_text().splitlines()
    assert lines[0].split("\t") == ["step", "epoch", "split", "loss", "lr", "elapsed", "bleu4", "cider", "reward"]
    rows = [line.split("\t") for line in lines[1:]]
    val = [r for r in rows if r[2] == "val"]
    assert len(val) == 2 and all(0.0 <= float(r[6]) <= 1.0 and float(r[7]) >= 0.0 for r in val)
    train_losses = [float(r[3]) for r in rows if r[2] == "train"]
    assert train_losses[-1] < train_losses[0]
    checkpoint = load_checkpoint(str(out / "checkpoint_last.pth"))
    assert checkpoint["progress"]["epoch"] == 2 and checkpoint["vocab"][:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert {"optimizer", "scheduler", "rng", "config"} <= checkpoint.keys()


def test_epoch_order_is_a_seeded_shuffle_or_batches_of_similar_lengths():
    lengths = torch.randint(3, 40, (1000,), generator=torch.Generator().manual_seed(0))
    plain = steps.epoch_order(lengths, 64, seed=7, by_length=False)
    assert torch.equal(plain, torch.randperm(1000, generator=torch.Generator().manual_seed(7)))   # as before the option
    by_length = steps.epoch_order(lengths, 64, seed=7, by_length=True)
    assert torch.equal(by_length, steps.epoch_order(lengths, 64, seed=7, by_length=True))
    assert not torch.equal(by_length, steps.epoch_order(lengths, 64, seed=8, by_length=True))
    assert sorted(by_length.tolist()) == list(range(1000))
    longest = [lengths[batch].max().item() for batch in by_length.split(64)]
    spread = [(lengths[batch].max() - lengths[batch].min()).item() for batch in by_length.split(64)[:-1]]
    plain_longest = [lengths[batch].max().item() for batch in plain.split(64)]
    assert max(spread) <= 4 and sum(longest) < 0.7 * sum(plain_longest)
    assert longest[:-1] != sorted(longest[:-1])             # full batches come in random order, not shortest first
    assert len(by_length.split(64)[-1]) == 1000 % 64        # the short batch stays last


@pytest.mark.parametrize("by_length, decoder", [(False, "lstm"), (True, "lstm"), (True, "updown")])
def test_interrupted_then_resumed_equals_uninterrupted(tiny_overrides, tmp_path, monkeypatch, by_length, decoder):
    tiny_overrides = tiny_overrides + [f"train.batch_by_length={by_length}", f"model.decoder={decoder}"]
    straight = [o for o in tiny_overrides if not o.startswith("train.out_dir")] + [f"train.out_dir={tmp_path / 'a'}"]
    run(straight)
    interrupted = [o for o in tiny_overrides if not o.startswith("train.out_dir")] + [f"train.out_dir={tmp_path / 'b'}"]
    real_batch_loss, calls = steps.batch_loss, {"n": 0}

    def ctrl_c_at_step_17(*args, **kwargs):     # epoch 2, mid-epoch (12 steps per epoch)
        if not torch.is_grad_enabled():
            return real_batch_loss(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 17:
            raise KeyboardInterrupt
        return real_batch_loss(*args, **kwargs)

    monkeypatch.setattr(steps, "batch_loss", ctrl_c_at_step_17)
    with pytest.raises(SystemExit) as stop:
        run(interrupted)
    assert stop.value.code == 130
    saved = load_checkpoint(str(tmp_path / "b" / "checkpoint_last.pth"))["progress"]
    assert saved["step"] == 16 and saved["epoch"] == 1 and saved["batch"] == 4
    monkeypatch.setattr(steps, "batch_loss", real_batch_loss)
    train.main(["--resume", str(tmp_path / "b")])
    a, b = weights(str(tmp_path / "a" / "checkpoint_last.pth")), weights(str(tmp_path / "b" / "checkpoint_last.pth"))
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_finished_run_is_reported_and_kept(tiny_overrides, tmp_path, capsys):
    run(tiny_overrides + ["train.epochs=1"])
    before = (tmp_path / "run" / "checkpoint_last.pth").read_bytes()
    run(tiny_overrides)                       # the same command again: nothing is trained over
    assert "already holds a finished run" in capsys.readouterr().err
    with pytest.raises(ValueError, match="a resumed run keeps it"):
        train.main(["--resume", str(tmp_path / "run"), "--set", "model.decoder=attention"])
    assert (tmp_path / "run" / "checkpoint_last.pth").read_bytes() == before


def test_an_unfinished_run_is_continued_only_with_resume(tiny_overrides, tmp_path, monkeypatch):
    real_batch_loss, calls = steps.batch_loss, {"n": 0}

    def ctrl_c_in_epoch_2(*args, **kwargs):     # 12 steps per epoch
        calls["n"] += torch.is_grad_enabled()
        if calls["n"] == 15:
            raise KeyboardInterrupt
        return real_batch_loss(*args, **kwargs)

    monkeypatch.setattr(steps, "batch_loss", ctrl_c_in_epoch_2)
    with pytest.raises(SystemExit):
        run(tiny_overrides)
    monkeypatch.setattr(steps, "batch_loss", real_batch_loss)
    before = (tmp_path / "run" / "checkpoint_last.pth").read_bytes()
    with pytest.raises(ValueError, match="holds an unfinished run .* continue it with --resume"):
        run(tiny_overrides)
    assert (tmp_path / "run" / "checkpoint_last.pth").read_bytes() == before


def test_attention_decoder_trains(tiny_overrides, tmp_path):
    run(tiny_overrides + ["model.decoder=attention", "train.epochs=1"])
    assert (tmp_path / "run" / "checkpoint_best.pth").exists()


def test_a_last_batch_of_one_caption_is_left_out(tiny_overrides, tmp_path):
    # 90 captions in batches of 89: a batch of 1 caption would break the LSTM head's BatchNorm.
    run(tiny_overrides + ["train.batch_size=89", "train.epochs=1"])
    assert load_checkpoint(str(tmp_path / "run" / "checkpoint_last.pth"))["progress"]["step"] == 1


def test_ctrl_c_in_feature_extraction_says_how_to_continue(tiny_overrides, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "prepare_splits", interrupted)
    with pytest.raises(SystemExit) as stop:
        run(tiny_overrides)
    assert stop.value.code == 130
    assert "features computed so far are cached; run the same command again" in capsys.readouterr().err


def test_streamed_and_held_features_train_the_same(tiny_overrides, tmp_path):
    """train.cache_on_device=false gathers each batch from the mapped cache; true holds it all: same steps."""
    for mode in ("false", "true"):
        settings = [o for o in tiny_overrides if not o.startswith("train.out_dir")]
        run(settings + ["model.decoder=attention", "model.dropout=0", "train.epochs=1",
                        f"train.cache_on_device={mode}", f"train.out_dir={tmp_path / mode}"])
    a, b = weights(str(tmp_path / "false" / "checkpoint_last.pth")), weights(str(tmp_path / "true" / "checkpoint_last.pth"))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    logs = [(tmp_path / mode / "loss_log.txt").read_text().splitlines() for mode in ("false", "true")]
    assert [r.split("\t")[3] for r in logs[0]] == [r.split("\t")[3] for r in logs[1]]      # the same losses


def test_a_fine_tuned_run_with_mirrors_and_a_weight_average_resumes_as_if_never_stopped(tiny_overrides, tmp_path,
                                                                                        monkeypatch, capsys):
    settings = [o for o in tiny_overrides if not o.startswith("train.out_dir")] + [
        "model.decoder=attention", "train.fine_tune_encoder=2", "train.hflip=true", "train.ema_decay=0.9",
        "train.batch_size=4"]                                     # 4 images a step: 5 steps per epoch over 18
    run(settings + [f"train.out_dir={tmp_path / 'a'}"])
    assert "last 2 CNN blocks trained | mirrored images | weight average 0.9" in capsys.readouterr().err
    real_batch_loss, calls = steps.batch_loss, {"n": 0}

    def ctrl_c_at_step_7(*args, **kwargs):      # epoch 2, its second step
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 7:
                raise KeyboardInterrupt
        return real_batch_loss(*args, **kwargs)

    monkeypatch.setattr(steps, "batch_loss", ctrl_c_at_step_7)
    with pytest.raises(SystemExit):
        run(settings + [f"train.out_dir={tmp_path / 'b'}"])
    assert load_checkpoint(str(tmp_path / "b" / "checkpoint_last.pth"))["progress"]["step"] == 6
    monkeypatch.setattr(steps, "batch_loss", real_batch_loss)
    train.main(["--resume", str(tmp_path / "b")])
    a, b = (load_checkpoint(str(tmp_path / run_dir / "checkpoint_last.pth")) for run_dir in ("a", "b"))
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for x, y in zip(a["weight_average"]["trained"], b["weight_average"]["trained"]):
        assert torch.equal(x, y)
