"""utils.py: atomic writes (a full disk included), hard links, device choice."""
import os
import threading

import pytest
import torch

from tests.test_checkpoint import make_checkpoint
from utils import UserError, atomic_link, atomic_save, pick_device, run_main


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


def test_abandoned_atomic_save_leaves_the_old_file(tmp_path):
    atomic_save({"epoch": 1}, str(tmp_path / "c.pth"))
    abandon = threading.Event()
    abandon.set()
    assert not atomic_save({"epoch": 2, "weights": torch.zeros(1000)}, str(tmp_path / "c.pth"), abandon=abandon)
    assert torch.load(tmp_path / "c.pth", weights_only=True) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["c.pth"]                                    # no temp file left


def test_a_full_disk_is_an_oserror_naming_the_file_and_the_old_file_stays(small_disk):
    disk, fill = small_disk
    path = str(disk / "c.pth")
    atomic_save({"epoch": 1}, path)
    fill(64 * 1024)
    with pytest.raises(OSError) as error:
        atomic_save({"epoch": 2, "weights": torch.zeros(4_000_000)}, path)      # 16 MB: torch.save's RuntimeError
    assert error.value.filename == path and error.value.errno == 28
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert sorted(os.listdir(disk)) == ["c.pth", "filler"]                      # no temp file left behind


def test_run_main_tells_a_users_mistake_in_one_line_and_keeps_a_bugs_traceback(capsys):
    def users_mistake():
        raise UserError("captions.csv: no such file; pass --captions")

    with pytest.raises(SystemExit) as stopped:
        run_main(users_mistake)
    assert stopped.value.code == 2 and capsys.readouterr().err == "error: captions.csv: no such file; pass --captions\n"

    def our_bug():                              # torch's own ValueError, raised by a bug of ours
        torch.zeros(2, 3).view(4, 4)

    with pytest.raises(RuntimeError):
        run_main(our_bug)

    def our_value_bug():
        int("twelve")

    with pytest.raises(ValueError, match="invalid literal"):
        run_main(our_value_bug)
