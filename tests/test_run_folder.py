"""training/run_folder.py and train.py's run folder: a run is where it is, one process trains in it at a time,
and a full disk keeps the last checkpoint whole."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import train
from models.checkpoint import load_checkpoint
from tests.conftest import ROOT, run_script
from training.run_folder import RunFolder


def without_out_dir(overrides):
    return [o for o in overrides if not o.startswith("train.out_dir")]


def run(overrides, *extra):
    train.main(["--set", *overrides, *extra])


def test_resuming_a_copied_run_trains_in_the_copy(tiny_overrides, tmp_path):
    run(tiny_overrides, "train.epochs=1")
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    original = (tmp_path / "run" / "checkpoint_last.pth").read_bytes()
    train.main(["--resume", str(tmp_path / "copy"), "--set", "train.epochs=2"])
    assert load_checkpoint(str(tmp_path / "copy" / "checkpoint_last.pth"))["progress"]["epoch"] == 2
    assert (tmp_path / "run" / "checkpoint_last.pth").read_bytes() == original     # the original is untouched


def start(tiny_overrides, out_dir, epochs):
    settings = [o for o in tiny_overrides if not o.startswith(("train.out_dir", "train.epochs"))]
    return subprocess.Popen([sys.executable, "train.py", "--set", *settings, f"train.epochs={epochs}",
                             f"train.out_dir={out_dir}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_a_second_process_is_refused_and_a_killed_runs_lock_is_taken_over(tiny_overrides, tmp_path, capsys):
    out = tmp_path / "shared_run"
    first = start(tiny_overrides, out, 100_000)
    try:
        deadline = time.monotonic() + 120
        while not (out / "loss_log.txt").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert first.poll() is None, first.stderr.read()
        second = run_script(train.main, ["--set", *without_out_dir(tiny_overrides), f"train.out_dir={out}"], capsys)
        assert second.returncode == 2
        assert second.stderr.strip().splitlines()[-1] == (
            f"error: {out} is in use: process {first.pid} is training in it; wait for it to finish, or train into "
            f"another folder with --set train.out_dir=runs/NEW_NAME")
    finally:
        first.send_signal(signal.SIGKILL)                       # no Ctrl-C handler runs: its lock is left stale
        first.wait()
    third = run_script(train.main, ["--set", *without_out_dir(tiny_overrides), f"train.out_dir={out}", "train.epochs=1"],
                       capsys)
    if (out / "checkpoint_last.pth").exists() and "unfinished run" in third.stderr:   # killed after its first checkpoint
        third = run_script(train.main, ["--resume", out, "--set", "train.epochs=1"], capsys)
    assert third.returncode == 0, third.stderr


def test_an_out_dir_below_a_file_is_one_line(tiny_overrides, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    result = run_script(train.main, ["--set", *without_out_dir(tiny_overrides), f"train.out_dir={tmp_path / 'a_file' / 'run'}"],
                        capsys)
    assert result.returncode == 2
    assert "a part of that path is a file, not a folder" in result.stderr.strip().splitlines()[-1]


def test_a_full_disk_keeps_the_last_checkpoint_and_says_which_write_failed(tiny_overrides, small_disk):
    disk, fill = small_disk
    settings = [o for o in tiny_overrides if not o.startswith(("train.out_dir", "model.encoder", "train.epochs"))]
    settings += ["model.encoder=resnet18", "model.encoder_weights=none", f"train.out_dir={disk / 'run'}"]
    train.main(["--set", *settings, "train.epochs=1"])
    before = (disk / "run" / "checkpoint_last.pth").read_bytes()
    fill(1 << 20)                                           # 1 MB left: the next checkpoint cannot be written
    result = subprocess.run([sys.executable, "train.py", "--resume", str(disk / "run"), "--set", "train.epochs=2"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)        # a process, as a user meets it
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "checkpoint not written:" in result.stderr and "No space left on device" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "checkpoint_last.pth could not be written" in last
    assert (disk / "run" / "checkpoint_last.pth").read_bytes() == before
    assert load_checkpoint(str(disk / "run" / "checkpoint_last.pth"))["progress"]["epoch"] == 1


def test_a_folder_holding_a_file_of_a_runs_name_that_no_run_wrote_is_refused(tmp_path):
    (tmp_path / "config.yaml").write_text("my own notes")
    with pytest.raises(ValueError, match="holds config.yaml, which no run of train.py wrote there"):
        RunFolder(str(tmp_path)).lock()
    assert (tmp_path / "config.yaml").read_text() == "my own notes"


def test_temp_files_a_killed_save_left_are_swept_when_the_run_starts(tmp_path):
    first = RunFolder(str(tmp_path))
    first.lock()
    first.close()
    (tmp_path / ".tmp-abc123.pth").write_bytes(b"\0" * 1000)       # a SIGKILL during a checkpoint save
    (tmp_path / "notes.txt").write_text("kept")
    again = RunFolder(str(tmp_path))
    again.lock()
    again.close()
    assert sorted(os.listdir(tmp_path)) == [".lock", "notes.txt"]
