"""Checkpoint I/O, device choice, seeding and the one-line error handler every script uses."""
import os
import pickle
import random
import shutil
import sys
import tempfile
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor

import torch

CHECKPOINT_FORMAT = 1
TEMP_PREFIX = ".tmp-"  # atomic_save's and atomic_link's files before their rename: a folder's readers skip them


def atomic_save(obj, path: str, durable: bool = True, abandon: threading.Event | None = None) -> bool:
    """torch.save to a temp file in the same folder, then rename: a crash never leaves half a file.
    durable=False skips the fsync, for files whose readers detect damage and rebuild them (the feature cache).
    abandon: once it is set, the rest is not written and nothing is renamed into place. Returns whether it was."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, _Abandonable(f, abandon) if abandon else f)
            f.flush()
            if abandon and abandon.is_set():
                os.remove(tmp)
                return False
            if durable:          # else a power cut may leave a renamed file that is not all on disk
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; checkpoints are ordinary files
        os.replace(tmp, path)
        return True
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class _Abandonable:
    """A file that drops what torch.save gives it once `abandon` is set: torch.save then ends in a fraction of the
    time (a ResNet-50's 112 MB: 0.03 s instead of 0.1-0.2 s), and atomic_save deletes the part written."""

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
        if os.path.exists(tmp):
            os.remove(tmp)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class CheckpointWriter:
    """Writes checkpoints on a background thread while training goes on. When epochs end faster than a
    checkpoint is written (a GPU's short epochs, a ResNet-50 in every file), the snapshot still waiting for a
    file name is replaced by the newer one: only the newest is written, and training never waits for the disk.
    A name keeps the snapshot it was given, so checkpoint_best.pth stays the best epoch's."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.waiting = {}       # file name -> the newest snapshot for it, not yet being written
        self.writing = []       # (names, abandon event) of each write in progress
        self.running = False    # whether the thread is in _write_waiting (guarded by lock, as are the two above)
        self.lock = threading.Lock()
        self.thread = ThreadPoolExecutor(1)
        # Different snapshots go to different files, so they are written at once: at a run's end the last
        # epoch's checkpoint_last.pth and an older epoch's checkpoint_best.pth are often both still to write.
        self.files = ThreadPoolExecutor(2)
        self.writes = []        # futures of the thread's writing rounds

    def submit(self, state: dict, name: str, *same_as: str, last: bool = False) -> None:
        """Write `state` to `name` soon; the names in same_as become links to the same file.
        last: the run's last snapshot, which the run waits for. A write in progress whose every name this
        snapshot replaces is abandoned rather than finished: its file would be replaced at once."""
        for done in [w for w in self.writes if w.done()]:
            self.writes.remove(done)
            done.result()       # a failed write (a full disk) raises here
        with self.lock:
            for n in (name, *same_as):
                self.waiting[n] = state
            for names, abandon in self.writing if last else []:
                if set(names) <= {name, *same_as}:
                    abandon.set()
            if not self.running:
                self.running = True
                self.writes.append(self.thread.submit(self._write_waiting))

    def finish(self) -> None:
        """Wait until everything submitted is on disk; a failed write raises here."""
        while self.writes:
            self.writes.pop(0).result()

    def close(self) -> None:
        self.thread.shutdown()
        self.files.shutdown()

    def _write_waiting(self) -> None:
        try:
            while True:
                with self.lock:
                    if not self.waiting:
                        self.running = False
                        return
                    names_of = {}   # id(snapshot) -> (snapshot, its names): one write per snapshot, links for the rest
                    for n, state in self.waiting.items():
                        names_of.setdefault(id(state), (state, []))[1].append(n)
                    self.waiting = {}
                    writes = [(state, names, threading.Event()) for state, names in names_of.values()]
                    self.writing = [(names, abandon) for _, names, abandon in writes]
                for write in [self.files.submit(self._write, *w) for w in writes]:
                    write.result()
                with self.lock:
                    self.writing = []
        except BaseException:
            with self.lock:
                self.running, self.writing = False, []
            raise

    def _write(self, state: dict, names: list, abandon: threading.Event) -> None:
        if atomic_save(state, os.path.join(self.out_dir, names[0]), abandon=abandon):
            for other in names[1:]:
                atomic_link(os.path.join(self.out_dir, names[0]), os.path.join(self.out_dir, other))


def checkpoint_state(model, vocab, config: dict, unchanging=None, **state) -> dict:
    """Model weights plus everything needed to caption (vocab, config) or resume (**state), copied to the
    CPU now: training can go on while it is written. unchanging: {state_dict key: CPU tensor} for weights
    that never change (a frozen CNN), which the caller copied once and which are used as they are."""
    unchanging = unchanging or {}
    weights = {k: unchanging[k] if k in unchanging else _cpu_copy(v) for k, v in model.state_dict().items()}
    return {"format": CHECKPOINT_FORMAT, "model": weights,
            **_cpu_copy({"vocab": vocab.itos, "config": config, **state})}


def _cpu_copy(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Load with weights_only=True (pickled code is refused, never run) and check the contents."""
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint_last.pth")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such checkpoint; train.py writes RUN_DIR/checkpoint_best.pth and checkpoint_last.pth")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{path}: refused to load: it holds pickled Python objects, which could run code. "
                         f"Only tensors and plain data are accepted, as in checkpoints written by train.py") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{path}: the checkpoint is truncated or corrupt ({str(e).splitlines()[0][:80]}); "
                         f"use the other checkpoint in the run folder or train again") from None
    required = {"format", "model", "vocab", "config"}
    if not isinstance(checkpoint, dict) or not required <= checkpoint.keys():
        raise ValueError(f"{path}: not a checkpoint written by this project's train.py (missing {sorted(required - set(checkpoint or {}))})")
    if checkpoint["format"] != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: checkpoint format {checkpoint['format']} is not {CHECKPOINT_FORMAT}; retrain with this version")
    return checkpoint


def load_model(checkpoint: dict, path: str = "checkpoint"):
    """Rebuild (model, vocab) from a checkpoint alone: no pretrained weights are fetched."""
    from config import DEFAULTS, merge
    from data.vocab import Vocabulary
    from models import build_model
    vocab = Vocabulary(checkpoint["vocab"])
    config = merge(DEFAULTS, checkpoint["config"], path)
    config["model"]["encoder_weights"] = "none"   # the checkpoint holds the encoder's weights
    model = build_model(config, len(vocab))
    load_weights(model, checkpoint["model"], path, checkpoint["config"])
    return model.eval(), vocab, config


def load_weights(model, state: dict, path: str, config: dict) -> None:
    """load_state_dict with one readable line when vocabulary or architecture differ."""
    own = model.state_dict()
    missing, unexpected = own.keys() - state.keys(), state.keys() - own.keys()
    shapes = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        m = config.get("model", {})
        detail = (f"shape of {shapes[0]} is {tuple(state[shapes[0]].shape)}, expected {tuple(own[shapes[0]].shape)}"
                  if shapes else f"{len(missing)} missing and {len(unexpected)} unexpected weights, e.g. {sorted(missing or unexpected)[0]}")
        raise ValueError(f"{path}: weights do not fit this model (checkpoint: encoder={m.get('encoder')}, "
                         f"decoder={m.get('decoder')}; {detail}): a different vocabulary or architecture")
    model.load_state_dict(state)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for, but this machine has no CUDA GPU (or this torch build has no CUDA); use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device mps was asked for, but MPS is not available here; use auto or cpu")
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or mps")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def run_main(main) -> None:
    """Run a script's main(); a user's mistake (ValueError) ends with one line and exit code 2."""
    try:
        main()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:                  # `script | head` closed our stdout: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
