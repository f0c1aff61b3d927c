"""The small things every script and module needs: atomic file writes, device choice, seeding,
warnings, and the one-line error handler around each script's main().

Nothing here imports the project's packages, so any module can use it.
"""
import argparse
import errno
import os
import random
import shutil
import signal
import sys
import tempfile
import threading

import torch

TEMP_PREFIX = ".tmp-"  # atomic_write's files before their rename: a folder's readers skip them
REPO_ROOT = os.path.dirname(os.path.abspath(__file__))     # the repository: utils.py lies at its top


class UserError(ValueError):
    """A mistake of the user's (a bad path, config value or file), told in one line that names the fix.
    run_main prints it without a traceback; any other exception is a bug of ours and keeps its traceback.
    A ValueError, so that code which checks a value can catch either."""


def plural(count: int, noun: str, verb: str = "") -> str:
    """ "1 file", "2 files"; with a verb, "1 file that is", "2 files that are" (verb: "is" or "was")."""
    words = f"{count:,} {noun}{'' if count == 1 else 's'}"
    if verb:
        words += " that " + (verb if count == 1 else {"is": "are", "was": "were"}[verb])
    return words


def printable(name: str) -> bool:
    """Whether a file name can be printed, and written to CSV and HTML: names that are not valid UTF-8
    reach Python as lone surrogates, which no UTF-8 output accepts."""
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def shown_name(name: str) -> str:
    """A file name as it may be printed in one line of a terminal, a TSV or a log: tabs, line breaks, terminal
    escape codes and other control characters (and bytes that are not UTF-8) are written as escapes."""
    if not printable(name):
        name = os.fsencode(name).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode("ascii") for c in name)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def atomic_write(path: str, write, binary: bool = True, durable: bool = True) -> bool:
    """Write a file through a temp file in the same folder and a rename: a crash or a full disk never
    leaves half a file, and the file that was there before stays as it was until the new one is complete.

    write(f) writes the content to the open file f; it may return False to abandon the write (nothing is
    renamed into place). durable=False skips the fsync, for files whose readers detect damage and rebuild
    them (the feature cache). Returns whether the file was written. A full disk raises OSError, naming path.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=os.path.splitext(path)[1], dir=folder)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8", "newline": ""})) as f:
            if write(f) is False:
                os.remove(tmp)
                return False
            f.flush()
            if durable:          # else a power cut may leave a renamed file that is not all on disk
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; these are ordinary files, meant to be shared
        os.replace(tmp, path)
        return True
    except RuntimeError as e:
        # torch.save reports a failed write of its file as RuntimeError, the OSError (a full disk) behind it
        remove_if_present(tmp)
        if isinstance(e.__context__, OSError):
            raise _named(e.__context__, path) from None
        raise
    except OSError as e:
        remove_if_present(tmp)
        raise _named(e, path) from None
    except BaseException:
        remove_if_present(tmp)
        raise


def atomic_save(obj, path: str, durable: bool = True, abandon: threading.Event | None = None) -> bool:
    """torch.save through atomic_write. abandon: once it is set, the rest is not written and nothing is
    renamed into place. Returns whether the file was written."""
    def write(f):
        torch.save(obj, _Abandonable(f, abandon) if abandon else f)
        return not (abandon and abandon.is_set())
    return atomic_write(path, write, durable=durable)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), binary=False)


def disk_error(error: OSError) -> str:
    """One line for a failed file operation: which file, why, and what to do about a full disk."""
    where = f"{error.filename}: " if error.filename else ""
    advice = "; free some disk space or write to another disk" if error.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return f"{where}{error.strerror or error}{advice}"


def _named(error: OSError, path: str) -> OSError:
    return OSError(error.errno, error.strerror or str(error), path)


def remove_if_present(path: str) -> None:
    """os.remove, where the file may be gone already (another process removed it first)."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


class _Abandonable:
    """A file that drops what torch.save gives it once `abandon` is set: torch.save then ends in a fraction of
    the time, and atomic_write deletes the part written."""

    def __init__(self, file, abandon: threading.Event):
        self.file, self.abandon = file, abandon

    def write(self, data) -> int:
        return len(memoryview(data)) if self.abandon.is_set() else self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def atomic_link(src: str, dst: str) -> None:
    """Make dst a hard link to src (a copy where the file system has none), atomically: one write, two names."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(dst)), f"{TEMP_PREFIX}link-{os.getpid()}-{os.path.basename(dst)}")
    try:
        remove_if_present(tmp)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except OSError as e:
        remove_if_present(tmp)
        raise _named(e, dst) from None
    except BaseException:
        remove_if_present(tmp)
        raise


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda was asked for, but this machine has no CUDA GPU (or this torch build has no CUDA); use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("device mps was asked for, but MPS is not available here; use auto or cpu")
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or mps")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def int_at_least(lowest: int):
    """An argparse type: an integer of at least `lowest`, else argparse's one-line usage error naming the flag."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"must be at least {lowest}, got {value}")
        return value
    return parse


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, `kill`, a closing terminal): stops like Ctrl-C, with exit code 143."""


def raise_terminated(signum, frame):
    raise Terminated()


def run_main(main) -> None:
    """Run a script's main(). A user's mistake (UserError) ends with one line and exit code 2; a file
    operation the machine refused (a full disk, say) with one line and exit code 1; Ctrl-C with one line and
    exit code 130, SIGTERM 143 (the script keeps what it has made: its message says what). Anything else is a
    bug, and keeps its traceback. Nothing written earlier is lost: every file is written by atomic_write."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, raise_terminated)
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        kept = f": {e.args[0]}" if e.args else ""
        print(f"\n{'terminated' if isinstance(e, Terminated) else 'interrupted'}{kept}", file=sys.stderr)
        sys.exit(143 if isinstance(e, Terminated) else 130)
    except OSError as e:
        if isinstance(e, BrokenPipeError):    # `script | head` closed our stdout: stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(0)
        print(f"error: {disk_error(e)}", file=sys.stderr)
        sys.exit(1)
