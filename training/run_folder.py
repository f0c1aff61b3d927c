"""A run folder (train.out_dir): one process trains in it at a time, and its log grows one row at a time.

The lock is an advisory file lock (flock) on RUN_DIR/.lock, held while the process lives: the kernel
lets go of it when the process ends, however it ends, so the lock of a killed run is simply taken
over. Where flock is missing (Windows), the lock file holds the owner's pid, and a pid that no
longer runs is a stale lock.
"""
import glob
import os
import sys

from training.loss_log import LossLog
from utils import TEMP_PREFIX, UserError, remove_if_present

try:
    import fcntl
except ImportError:          # Windows
    fcntl = None

LOCK_NAME = ".lock"
# What a run writes into its folder. A folder that holds one of these but no LOCK_NAME (which marks a folder a
# run has used) is someone else's: its files are never replaced.
RUN_FILES = ("checkpoint_last.pth", "checkpoint_best.pth", "loss_log.txt", "config.yaml", "vocab.json")


class RunFolder:
    def __init__(self, out_dir: str):
        self.out_dir, self.lock_file, self.log = out_dir, None, None

    def lock(self) -> None:
        """Make the folder and take its lock, or UserError naming the process that holds it."""
        if os.path.exists(self.out_dir) and not os.path.isdir(self.out_dir):
            raise UserError(f"train.out_dir={self.out_dir} is a file, not a folder; set train.out_dir to a folder")
        try:
            os.makedirs(self.out_dir, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise UserError(f"train.out_dir={self.out_dir}: a part of that path is a file, not a folder; "
                            f"set train.out_dir to a folder") from None
        path = os.path.join(self.out_dir, LOCK_NAME)
        theirs = [name for name in RUN_FILES if os.path.lexists(os.path.join(self.out_dir, name))]
        if theirs and not os.path.exists(path):
            raise UserError(f"train.out_dir={self.out_dir} holds {theirs[0]}, which no run of train.py wrote there; "
                            f"it is never replaced: set train.out_dir to a new folder, e.g. runs/NEW_NAME")
        self.lock_file = open(path, "a+", encoding="utf-8")
        if fcntl:
            try:
                fcntl.flock(self.lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self.lock_file.seek(0)
                owner = self.lock_file.read().strip() or "another process"
                self.lock_file.close()
                self.lock_file = None
                raise UserError(f"{self.out_dir} is in use: process {owner} is training in it; wait for it to "
                                f"finish, or train into another folder with --set train.out_dir=runs/NEW_NAME") from None
        else:
            self.lock_file.seek(0)
            owner = self.lock_file.read().strip()
            if owner.isdigit() and int(owner) != os.getpid() and _running(int(owner)):
                raise UserError(f"{self.out_dir} is in use: process {owner} is training in it; wait for it to "
                                f"finish, or train into another folder with --set train.out_dir=runs/NEW_NAME")
        self.lock_file.seek(0)
        self.lock_file.truncate()
        self.lock_file.write(str(os.getpid()))
        self.lock_file.flush()
        # Holding the lock, this process is the only writer here: a temp file is what a killed save left behind.
        for stale in glob.glob(os.path.join(glob.escape(self.out_dir), TEMP_PREFIX + "*")):
            remove_if_present(stale)

    def report_existing(self, checkpoint) -> str:
        """A folder that holds a run is never trained over: a finished run is reported and kept."""
        progress = checkpoint["progress"]
        if not (progress.get("finished") or progress["epoch"] >= checkpoint["config"]["train"]["epochs"]):
            raise UserError(f"{self.out_dir} holds an unfinished run (epoch {progress['epoch']}); continue it with "
                            f"--resume {self.out_dir}, or start a new one with --set train.out_dir=runs/NEW_NAME")
        print(f"{self.out_dir} already holds a finished run ({progress['epoch']} epochs, best validation "
              f"{checkpoint['config']['train']['select_metric']} {progress['best']}); kept it as it is. To train "
              f"another, add --set train.out_dir=runs/NEW_NAME", file=sys.stderr)
        return self.out_dir

    def open_log(self) -> LossLog:
        """The run's loss_log.txt, for appending rows (training.loss_log)."""
        self.log = LossLog(os.path.join(self.out_dir, "loss_log.txt"))
        return self.log

    def close(self) -> None:
        if self.log:
            self.log.close()
        if self.lock_file:
            self.lock_file.close()        # lets go of the flock
            self.lock_file = None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except OSError:
        return True
