"""torchrun with 2 CPU processes (gloo) trains to the same weights as 1 process with the same global batch."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import train
from tests.conftest import ROOT
from utils import load_checkpoint


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
                    reason="torchrun not installed")
def test_two_ranks_equal_one_process(tiny_overrides, tmp_path):
    # No dropout and no BatchNorm (attention decoder): then the only difference is float summation order.
    settings = [o for o in tiny_overrides if not o.startswith("train.out_dir")] + [
        "model.decoder=attention", "model.dropout=0", "train.epochs=1", "train.val_bleu_images=0"]
    train.main(["--set", *settings, f"train.out_dir={tmp_path / 'one'}"])
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    result = subprocess.run([torchrun if os.path.exists(torchrun) else "torchrun", "--standalone", "--nproc_per_node=2",
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
