"""Shared fixtures: a tiny generated dataset and a config that trains in seconds on a CPU."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """24 demo shape images with 5 captions each: (captions.csv, image folder)."""
    from data.demo import make_demo_dataset
    folder = tmp_path_factory.mktemp("tiny")
    make_demo_dataset(str(folder / "images"), str(folder / "captions.csv"), n_images=24, seed=1)
    return str(folder / "captions.csv"), str(folder / "images")


@pytest.fixture
def tiny_overrides(tiny_data, tmp_path):
    """--set pairs for a tiny random-weights model on tiny_data, writing under tmp_path."""
    return tiny_settings(tiny_data, tmp_path)


def tiny_settings(tiny_data, folder):
    captions, images = tiny_data
    return [f"data.captions={captions}", f"data.images={images}", "data.val_fraction=0.25", "data.min_word_freq=1",
            "data.image_size=32", "model.encoder=resnet18", "model.encoder_weights=none", "model.embed_size=16",
            "model.hidden_size=32", "model.attention_size=16", "train.epochs=2", "train.batch_size=8",
            "train.val_bleu_images=4", "train.num_workers=0", "train.log_every=2", "train.lr=3e-3",
            f"train.out_dir={folder / 'run'}", f"train.cache_dir={folder / 'cache'}", "decode.max_len=12"]


@pytest.fixture(scope="session")
def tiny_checkpoints(tiny_data, tmp_path_factory):
    """{decoder: checkpoint_best.pth} for tiny trained lstm and attention models (trained once per session)."""
    import train
    paths = {}
    for decoder in ("lstm", "attention"):
        folder = tmp_path_factory.mktemp(decoder)
        train.main(["--set", *tiny_settings(tiny_data, folder), f"model.decoder={decoder}", "train.epochs=1"])
        paths[decoder] = str(folder / "run" / "checkpoint_best.pth")
    return paths


def random_caption_batch(lengths, grid_cells, feature_dim, vocab_size, start_id=1):
    """(features [B,P,C], tokens [B,T] starting with start_id, lengths [B]); positions past a row's length hold pad (0)."""
    torch.manual_seed(1)
    lengths = torch.tensor(lengths)
    features = torch.randn(len(lengths), grid_cells, feature_dim)
    tokens = torch.randint(3, vocab_size, (len(lengths), int(lengths.max())))
    tokens[:, 0] = start_id
    tokens[torch.arange(tokens.size(1)) >= lengths.unsqueeze(1)] = 0
    return features, tokens, lengths


def assert_padding_does_not_change_valid_logits(decoder, features, tokens, lengths):
    """Any token past a row's length (padding) leaves that row's valid logits unchanged."""
    other = tokens.clone()
    other[torch.arange(tokens.size(1)) >= lengths.unsqueeze(1)] = 7
    with torch.no_grad():
        a, _ = decoder(features, tokens, lengths)
        b, _ = decoder(features, other, lengths)
    for i, length in enumerate(lengths.tolist()):
        assert torch.allclose(a[i, :length], b[i, :length], atol=1e-6)


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MB tmpfs at tmp_path/disk, and fill(bytes_left) to leave only that much room; skipped where this
    process cannot mount one (it needs root, as in CI)."""
    import shutil
    import subprocess
    mount = tmp_path / "disk"
    mount.mkdir()
    if not shutil.which("mount") or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)],
                                                   capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root): the full-disk tests need one")

    def fill(bytes_left: int) -> None:
        free = shutil.disk_usage(mount).free
        with open(mount / "filler", "wb") as f:
            f.write(b"\0" * max(0, free - bytes_left))
    try:
        yield mount, fill
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def run_script(main, args, capsys):
    """A script's main(args), run as `python script.py ARGS` runs it (utils.run_main: a user's mistake is one
    line and exit code 2, a refused file operation exit code 1) but in this process, without the seconds a
    new interpreter spends importing torch. Returns .returncode, .stdout and .stderr like subprocess.run."""
    import types

    from utils import run_main
    capsys.readouterr()
    code = 0
    try:
        run_main(lambda: main([str(a) for a in args]))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    out, err = capsys.readouterr()
    return types.SimpleNamespace(returncode=code, stdout=out, stderr=err)
