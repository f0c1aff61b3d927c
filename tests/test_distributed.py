"""torchrun with 2 CPU processes (gloo): the same weights as 1 process with the same global batch, and a killed
rank ends the run without leaving processes behind."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from models.checkpoint import load_checkpoint
from tests.conftest import ROOT

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
TORCHRUN = TORCHRUN if os.path.exists(TORCHRUN) else shutil.which("torchrun")
needs_torchrun = pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed")


@needs_torchrun
def test_two_ranks_equal_one_process(tiny_overrides, tmp_path):
    # No dropout and no BatchNorm (attention decoder): then the only difference is float summation order.
    settings = [o for o in tiny_overrides if not o.startswith("train.out_dir")] + [
        "model.decoder=attention", "model.dropout=0", "train.epochs=1", "train.val_decoded_images=0",
        "train.batch_size=6"]   # 90 captions: whole batches, so both runs take the same steps
    train.main(["--set", *settings, f"train.out_dir={tmp_path / 'one'}"])
    result = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2",
                             "train.py", "--set", *settings, f"train.out_dir={tmp_path / 'two'}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    one = load_checkpoint(str(tmp_path / "one" / "checkpoint_last.pth"))
    two = load_checkpoint(str(tmp_path / "two" / "checkpoint_last.pth"))
    assert two["progress"]["step"] == one["progress"]["step"]
    for key, value in one["model"].items():
        assert torch.allclose(value.float(), two["model"][key].float(), atol=2e-5), key
    assert not any(key.startswith("module.") for key in two["model"])   # rank 0 saved the bare model


def _children(pid):
    """{child pid: its RANK} for the processes torchrun started (Linux /proc)."""
    ranks = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            if parent == pid:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
                ranks[int(entry)] = int(env.get(b"RANK", b"-1"))
        except (OSError, ValueError, IndexError):
            continue
    return ranks


@needs_torchrun
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds torchrun's workers through Linux /proc")
def test_killing_one_rank_ends_the_others_and_the_run_resumes(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    settings = [o for o in tiny_overrides if not o.startswith("train.epochs")] + ["train.epochs=100000",
                                                                                  "train.val_decoded_images=0"]
    process = subprocess.Popen([TORCHRUN, "--standalone", "--nproc_per_node=2", "train.py", "--set", *settings], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 240
        while not (run / "checkpoint_last.pth").exists():          # training is past its first epoch
            if process.poll() is not None:
                pytest.fail(f"torchrun ended before its first epoch:\n{process.stderr.read()[-3000:]}")
            assert time.time() < deadline, "torchrun did not finish its first epoch in 240 s"
            time.sleep(0.5)
        workers = _children(process.pid)
        assert sorted(workers.values()) == [0, 1]
        os.kill(next(pid for pid, rank in workers.items() if rank == 1), signal.SIGKILL)
        _, stderr = process.communicate(timeout=120)                # the other rank must not hang
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode != 0
    assert "Signal 9 (SIGKILL) received" in stderr
    assert not any(os.path.exists(f"/proc/{pid}") for pid in workers)
    # Started again, the run continues from its last checkpoint.
    epoch = load_checkpoint(str(run / "checkpoint_last.pth"))["progress"]["epoch"]
    train.main(["--resume", str(run), "--set", f"train.epochs={epoch + 1}"])
    assert load_checkpoint(str(run / "checkpoint_last.pth"))["progress"]["epoch"] == epoch + 1


@needs_torchrun
def test_self_critical_training_under_torchrun_samples_each_ranks_share(tiny_overrides, tmp_path):
    settings = [o for o in tiny_overrides if not o.startswith(("train.out_dir", "train.epochs"))] + [
        "model.decoder=attention", "model.dropout=0", "train.val_decoded_images=0", "train.batch_size=6"]
    train.main(["--set", *settings, "train.epochs=1", f"train.out_dir={tmp_path / 'ce'}"])
    result = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", "train.py", "--set", *settings,
                             "train.scst=true", f"train.init_from={tmp_path / 'ce' / 'checkpoint_best.pth'}",
                             "train.epochs=1", "train.lr=1e-4", "train.lr_schedule=constant",
                             f"train.out_dir={tmp_path / 'scst'}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    checkpoint = load_checkpoint(str(tmp_path / "scst" / "checkpoint_last.pth"))
    assert checkpoint["progress"]["step"] == 3            # 18 images in global batches of 6: 3 per rank each step
    assert "self-critical" in result.stderr and "reward=" in result.stderr
