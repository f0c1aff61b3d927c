"""Checkpoints of a training run: what a run starts from, the state they hold, and the thread that writes them.

Checkpoints are written by a background thread while the next epoch trains: on a GPU an epoch can
take less time than writing a ResNet-50 to disk. The frozen CNN's weights never change, so they are
copied to the host once per run (frozen_weights), not once per checkpoint.
"""
import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from config import DEFAULTS, FIXED_ON_RESUME, KEYS, Config, merge, parse_overrides
from models.checkpoint import CHECKPOINT_FORMAT, is_inference, load_checkpoint, load_model
from utils import UserError, atomic_link, atomic_save, disk_error, warn

BACKBONE = "encoder.backbone."
PROGRESS_RENAMED = {"stale_epochs": "stale_validations"}     # Progress fields older checkpoints name otherwise


def fixed_on_resume() -> list[str]:
    """The keys a resumed run keeps as it was trained: its model, data and kind of training (config.py declares
    them, key(..., fixed=True))."""
    return FIXED_ON_RESUME


def resume_config(path: str, overrides: list[str]) -> tuple[Config, dict]:
    """(config, checkpoint) to continue the run of checkpoint `path` (or its run folder), with --set overrides
    of anything but its model, data and training kind. The run goes on in the folder it is in now: a copied
    run folder trains on in the copy, not where it was made."""
    checkpoint = load_checkpoint(path)
    if is_inference(checkpoint):
        raise UserError(f"--resume {path}: an exported checkpoint has no optimizer state to resume; "
                        f"start a new run from its weights with --set train.init_from={path}")
    recorded = merge(DEFAULTS, checkpoint["config"], path)
    config = merge(recorded, parse_overrides(overrides), "--set")
    for key in fixed_on_resume():
        if value_of(config, key) != value_of(recorded, key):
            raise UserError(f"--resume: the run was trained with {key}={value_of(recorded, key)!r}; "
                            f"a resumed run keeps it: start a new run to change it")
    config = merge(config, {"train.out_dir": path if os.path.isdir(path) else os.path.dirname(path) or "."}, "--resume")
    return config, checkpoint


def starting_point(config, checkpoint):
    """(model, vocab) of train.init_from for a new run, checked against this run's config; else None."""
    path = config.train.init_from
    if config.train.scst and not (path or checkpoint):
        raise UserError("train.scst=true starts from a trained model: set train.init_from=CHECKPOINT (a "
                        "cross-entropy run's checkpoint_best.pth)")
    if config.train.scst and config.train.hflip:
        raise UserError("train.hflip mirrors images for cross-entropy training, whose captions it can mirror too; "
                        "set train.hflip=false for self-critical training")
    if checkpoint or not path:
        return None
    start = load_checkpoint(path)
    if start.get("members"):
        raise UserError(f"train.init_from={path} is an ensemble of {1 + len(start['members'])} models; "
                        f"start from one of the training checkpoints it was exported from")
    theirs = merge(DEFAULTS, start["config"], path)
    for key in [k for k in KEYS if k.startswith("model.") and k != "model.encoder_weights"] + ["data.image_size"]:
        if value_of(theirs, key) != value_of(config, key):
            raise UserError(f"train.init_from={path} was trained with {key}={value_of(theirs, key)!r}, this run "
                            f"has {value_of(config, key)!r}: a new run from its weights keeps its model settings")
    model, vocab, _ = load_model(start, path)
    return model, vocab


def value_of(config: Config, key: str):
    """The value of a "section.name" key."""
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


def frozen_weights(model) -> dict:
    """{state_dict key: CPU tensor} of the CNN's frozen trunk (all of it, unless its tail is fine-tuned), copied
    once; it also primes the feature cache key's hash of them (EncoderCNN.weights_fingerprint), so the weights
    are copied to the host only once."""
    trunk = {k: v.cpu() for k, v in model.encoder.trunk_state().items()}
    model.encoder.weights_fingerprint(trunk)
    return {BACKBONE + k: v for k, v in trunk.items()}


def checkpoint_state(model, vocab, config: Config, unchanging=None, **state) -> dict:
    """Model weights plus everything needed to caption (vocab, config) or resume (**state), copied to the
    CPU now: training can go on while it is written. unchanging: {state_dict key: CPU tensor} for weights
    that never change (a frozen CNN), which the caller copied once and which are used as they are."""
    unchanging = unchanging or {}
    weights = {k: unchanging[k] if k in unchanging else _cpu_copy(v) for k, v in model.state_dict().items()}
    return {"format": CHECKPOINT_FORMAT, "model": weights,
            **_cpu_copy({"vocab": vocab.itos, "config": config.to_dict(), **state})}


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


@dataclass
class Progress:
    """Where a run stands: saved in every checkpoint ("progress"), and where --resume goes on from."""
    epoch: int = 0              # epochs finished
    batch: int = 0              # steps of the current epoch done
    step: int = 0
    best: float | None = None   # the best validation metric so far
    stale_validations: int = 0  # validations since it last improved
    elapsed: float = 0.0        # seconds trained before this process started
    finished: bool = False


def restore(checkpoint: dict, optimization, progress: Progress) -> None:
    """A resumed run's optimizer, schedule, loss scale, weight average, progress and random state, as the
    checkpoint has them."""
    optimization.restore(checkpoint)
    for name, value in checkpoint["progress"].items():
        setattr(progress, PROGRESS_RENAMED.get(name, name), value)
    rng = checkpoint["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if torch.cuda.is_available() and rng.get("cuda"):
        torch.cuda.set_rng_state_all(rng["cuda"])


def _cpu_copy(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


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
        self.failed = set()     # names whose newest write failed (a full disk); their older file is kept

    def submit(self, state: dict, name: str, *same_as: str, last: bool = False) -> None:
        """Write `state` to `name` soon; the names in same_as become links to the same file.
        last: the run's last snapshot, which the run waits for. A write in progress whose every name this
        snapshot replaces is abandoned rather than finished: its file would be replaced at once."""
        for done in [w for w in self.writes if w.done()]:
            self.writes.remove(done)
            done.result()
        with self.lock:
            for n in (name, *same_as):
                self.waiting[n] = state
            for names, abandon in self.writing if last else []:
                if set(names) <= {name, *same_as}:
                    abandon.set()
            if not self.running:
                self.running = True
                self.writes.append(self.thread.submit(self._write_waiting))

    def finish(self) -> list[str]:
        """Wait until everything submitted is written; returns the names whose last write failed."""
        while self.writes:
            self.writes.pop(0).result()
        return sorted(self.failed)

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
        """A full disk is a warning: the file written before stays whole, and training goes on."""
        try:
            if atomic_save(state, os.path.join(self.out_dir, names[0]), abandon=abandon):
                for other in names[1:]:
                    atomic_link(os.path.join(self.out_dir, names[0]), os.path.join(self.out_dir, other))
            with self.lock:
                self.failed -= set(names)
        except OSError as e:
            with self.lock:
                self.failed |= set(names)
            kept = " and ".join(n for n in names if os.path.exists(os.path.join(self.out_dir, n)))
            warn(f"checkpoint not written: {disk_error(e)}; {'the earlier ' + kept + ' is kept' if kept else 'no earlier one exists'}; "
                 f"training goes on")
