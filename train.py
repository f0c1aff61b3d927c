"""Train an image-captioning model.

    python train.py                                    # embedded demo dataset (config.yaml)
    python train.py --config configs/flickr8k.yaml     # Flickr8k, ResNet-50 + LSTM
    python train.py --config configs/flickr8k.yaml --set train.epochs=5 train.batch_size=128
    python train.py --resume runs/demo                 # continue an interrupted run, in that folder
    python train.py --config configs/flickr8k_lite2_attention_scst.yaml   # self-critical, from train.init_from
    torchrun --nproc_per_node=4 train.py --config configs/flickr8k.yaml   # several GPUs

Every image goes through the CNN's frozen trunk once (its output is cached on disk under
train.cache_dir): the whole CNN when it is frozen, all but its last train.fine_tune_encoder blocks
when those are fine-tuned. Each step then runs only those blocks (if any) and the decoder. A
cross-entropy step trains on a batch of captions, or, with a fine-tuned CNN, on a batch of images
with all their captions; a self-critical step (train.scst) samples captions for a batch of images
and rewards them with CIDEr-D. Writes into train.out_dir: checkpoint_last.pth,
checkpoint_best.pth, loss_log.txt, config.yaml, vocab.json. Ctrl-C (or SIGTERM) saves
checkpoint_last.pth; --resume continues from it.
"""
import argparse
import gc
import math
import os
import shlex
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass

import torch
import yaml
from tqdm import tqdm

from config import Config, describe_keys, load_config
from data.features.cache import wait_for_cache_writes
from data.features.store import FeatureFeed
from data.prepare import prepare_splits
from data.text.captions import load_splits
from data.text.vocab import Vocabulary
from evaluation.metrics import SCORE_NAMES
from models.caption_model import build_model
from models.checkpoint import load_checkpoint, load_weights
from training.checkpoints import (
    CheckpointWriter,
    Progress,
    checkpoint_state,
    frozen_weights,
    restore,
    resume_config,
    rng_state,
    starting_point,
)
from training.distributed import broadcast_flag, setup_distributed, shutdown, wrap
from training.loss_log import LogRow
from training.optimization import make_optimization
from training.run_folder import RunFolder
from training.steps import CrossEntropySteps, SelfCriticalSteps, TrainingSetup
from training.validation import describe_validation, validate
from utils import Terminated, UserError, atomic_write_text, raise_terminated, run_main, seed_everything, warn


def train(config: Config, run: RunFolder, checkpoint=None, command="", begun=None):
    """Train from scratch, from train.init_from's weights, or on from a resumed `checkpoint`. begun: when the
    command started (time.time()), for the time the last line reports."""
    t = config.train
    rank, world, device = setup_distributed(config)
    main_process = rank == 0
    seed_everything(t.seed)
    gc.freeze()    # what exists now outlives the run: full collections, set off by parsing captions, skip it
    data = model_and_data(config, checkpoint, run, device, main_process)
    step_model = wrap(data.model, device, world)
    step_model = torch.compile(step_model) if t.compile else step_model
    optimization = make_optimization(data.model, config, device)
    setup = TrainingSetup(data.model, step_model, config, optimization, device, rank, world)
    steps = (SelfCriticalSteps if t.scst else CrossEntropySteps)(setup, data.train_set, data.vocab)
    optimization.schedule(t, t.epochs * steps.per_epoch)
    progress = Progress()
    # Reading images draws from the global RNG only on a cache miss; re-seed so dropout never depends on the cache.
    torch.manual_seed(t.seed + 1 + rank)
    if checkpoint:        # the resumed run's optimizer, schedule, progress and random state, as they were
        restore(checkpoint, optimization, progress)
    keeper = Keeper(run, setup, data, steps, progress, command)
    keeper.announce(steps)
    data.model.train()
    stop = False
    try:
        if data.from_init and not progress.step and data.val_set:   # the starting point is the first candidate for best
            stop = keeper.check(final=False)
        while progress.epoch < t.epochs and not stop:
            steps.start_epoch(progress.epoch)
            bar = tqdm(range(progress.batch, steps.per_epoch), desc=f"epoch {progress.epoch + 1}/{t.epochs}",
                       unit="step", dynamic_ncols=True, initial=progress.batch, total=steps.per_epoch,
                       disable=not main_process)
            for b in bar:
                loss, reward = steps.run(b)
                optimization.stepped()
                progress.step, progress.batch = progress.step + 1, b + 1
                keeper.add(loss, reward)
                if main_process and (progress.step % t.log_every == 0 or b + 1 == steps.per_epoch):
                    keeper.log_training(bar)
                if t.val_every and progress.step % t.val_every == 0 and b + 1 < steps.per_epoch:
                    if stop := keeper.check(final=False):
                        break
            bar.close()
            if not stop:
                progress.epoch, progress.batch = progress.epoch + 1, 0
                stop = keeper.check(final=progress.epoch == t.epochs)
        failed = keeper.writer.finish()
    except KeyboardInterrupt as stop:
        keeper.interrupted()
        sys.exit(143 if isinstance(stop, Terminated) else 130)
    finally:
        gc.unfreeze()
        keeper.close()
        steps.close()
        wait_for_cache_writes()     # the feature cache's last shards, written while training went on
        shutdown(world)
    keeper.done(failed, begun)
    return run.out_dir


@dataclass
class ModelAndData:
    """What a run trains, and on what."""
    model: torch.nn.Module      # on the device, with its starting weights
    vocab: Vocabulary
    from_init: bool             # a new run from train.init_from's weights
    frozen_cnn: dict            # the frozen CNN's weights, copied to the host once (for every checkpoint)
    train_set: dict             # the splits as data.prepare makes them
    val_set: dict | None


def model_and_data(config: Config, checkpoint, run: RunFolder, device, main_process: bool) -> ModelAndData:
    """The model with its starting weights (a resumed checkpoint's, train.init_from's or new ones), its vocabulary
    and the splits. Writes vocab.json and config.yaml."""
    captions, train_names, val_names = loaded = load_splits(config.data)
    start = starting_point(config, checkpoint)        # train.init_from's (model, vocab), or None
    vocab = (Vocabulary(checkpoint["vocab"]) if checkpoint else start[1] if start
             else Vocabulary.build((c for n in train_names for c in captions[n]), config.data.min_word_freq))
    with torch.device(device):              # built where it trains: no copy from the host
        model = build_model(config, len(vocab))
    if checkpoint:
        load_weights(model, checkpoint["model"], run.out_dir, checkpoint["config"])
    elif start:
        model.load_state_dict(start[0].state_dict())
    frozen_cnn = frozen_weights(model) if main_process else {}     # it also primes the cache key's hash of them
    if main_process:
        vocab.save(os.path.join(run.out_dir, "vocab.json"))
        atomic_write_text(os.path.join(run.out_dir, "config.yaml"), yaml.safe_dump(config.to_dict(), sort_keys=False))
    if threading.current_thread() is threading.main_thread():   # a scheduler's preemption stops like Ctrl-C
        signal.signal(signal.SIGTERM, raise_terminated)
    try:
        splits = prepare_splits(config, vocab, model.encoder, device, loaded=loaded)
    except KeyboardInterrupt as stop:
        if main_process:
            print("\ninterrupted during feature extraction: the features computed so far are cached; run the "
                  "same command again to continue", file=sys.stderr)
        sys.exit(143 if isinstance(stop, Terminated) else 130)
    return ModelAndData(model, vocab, bool(start), frozen_cnn, splits["train"], splits["val"])


class Keeper:
    """What a run keeps of itself, on the main process: validations, checkpoints (written by a background
    thread), loss_log.txt and the lines it prints. Other ranks only hear whether to stop early."""

    def __init__(self, run: RunFolder, setup: TrainingSetup, data: ModelAndData, steps, progress: Progress,
                 command: str):
        self.run, self.setup, self.progress, self.command = run, setup, progress, command
        self.model, self.config, self.optimization = setup.model, setup.config, setup.optimization
        self.vocab, self.val_set, self.frozen_cnn = data.vocab, data.val_set, data.frozen_cnn
        self.world, self.main = setup.world, setup.rank == 0
        self.val_feed = FeatureFeed(self.val_set["inputs"], setup.device, steps.on_device) if self.val_set else None
        self.writer = CheckpointWriter(run.out_dir)
        self.started = time.time() - progress.elapsed
        self.running, self.rewards, self.count = 0.0, 0.0, 0

    def announce(self, steps) -> None:
        if not self.main:
            return
        self.run.open_log()
        tail, average = self.model.encoder.tail_blocks, self.optimization.average
        n_val = len(self.val_set["names"]) if self.val_set else 0
        print(f"device {self.setup.device} x{self.world}{steps.describe()} | {n_val} "
              f"val images | vocab {len(self.vocab)} | {steps.per_epoch} steps/epoch"
              f"{' | self-critical' if self.config.train.scst else ''}"
              f"{f' | last {tail} CNN blocks trained' if tail else ''}{' | mirrored images' if self.config.train.hflip else ''}"
              f"{f' | weight average {average.decay}' if average else ''}", file=sys.stderr)
        if self.val_set:
            print(describe_validation(self.config, len(self.val_set["names"])), file=sys.stderr)

    def add(self, loss, reward: float) -> None:
        """One step's loss (summed on the device: no wait for it) and reward, towards the next train row."""
        self.running, self.rewards, self.count = self.running + loss.detach() * self.world, self.rewards + reward, self.count + 1

    def log_training(self, bar) -> None:
        p, lr, mean_loss = self.progress, self.optimization.lr, float(self.running) / self.count
        if not math.isfinite(mean_loss):
            raise UserError(f"the training loss became {mean_loss} at step {p.step}; the last good checkpoint in "
                            f"{self.run.out_dir} is kept. Likely causes: a learning rate too high (lower train.lr), "
                            f"damaged cached features (delete {self.config.train.cache_dir} to rebuild them), or a "
                            f"damaged train.init_from checkpoint; then start again")
        mean_reward = self.rewards / self.count
        self.run.log.write(LogRow(p.step, p.epoch + 1, "train", mean_loss, lr, time.time() - self.started,
                                  reward=mean_reward))
        bar.set_postfix(loss=f"{mean_loss:.3f}", **({"reward": f"{mean_reward:.3f}"} if math.isfinite(mean_reward) else {}),
                        lr=f"{lr:.1e}")
        self.running, self.rewards, self.count = 0.0, 0.0, 0

    def save(self, name: str, *same_as: str, last: bool = False) -> None:
        """Snapshot the run now; write checkpoint `name` (the names in same_as become links to it) in the
        background. last: the run ends after this one."""
        if self.main:
            with self.optimization.averaged():
                state = checkpoint_state(self.model, self.vocab, self.config, self.frozen_cnn, **self.optimization.state(),
                                         progress=asdict(self.progress), rng=rng_state(), command=self.command)
            self.writer.submit(state, name, *same_as, last=last)

    def check(self, final: bool) -> bool:
        """Validate, log, write checkpoint_last.pth (and checkpoint_best.pth when the metric improved); True when
        early stopping says stop."""
        self.progress.elapsed = time.time() - self.started
        stop = False
        if self.main:
            with self.optimization.averaged():
                stop = self._validate_and_save(final)
        return broadcast_flag(stop, self.world)

    def _validate_and_save(self, final: bool) -> bool:
        t, p, improved, metric = self.config.train, self.progress, True, None
        if self.val_set:
            val_loss, scores = validate(self.model, self.val_set, self.val_feed, self.config, self.vocab,
                                        self.optimization.amp)
            elapsed = time.time() - self.started
            self.run.log.write(LogRow(p.step, p.epoch, "val", val_loss, self.optimization.lr, elapsed, scores))
            by_score = t.select_metric != "loss" and t.val_decoded_images > 0
            metric = scores[SCORE_NAMES[t.select_metric]] if by_score else val_loss
            improved = p.best is None or (metric > p.best if by_score else metric < p.best)
            print(f"epoch {p.epoch} step {p.step}: val loss {val_loss:.4f} (perplexity {math.exp(min(val_loss, 50)):.2f}), "
                  + ", ".join(f"{name} {scores[name]:.4f}" for name in SCORE_NAMES.values())
                  + (" *best*" if improved else ""), file=sys.stderr)
        p.stale_validations = 0 if improved else p.stale_validations + 1
        if improved:
            p.best = metric
        stop = bool(t.early_stop_patience and p.stale_validations >= t.early_stop_patience)
        if stop:
            print(f"early stop: no improvement in {p.stale_validations} validations", file=sys.stderr)
        p.finished = stop or final
        self.save("checkpoint_last.pth", *(["checkpoint_best.pth"] if improved else []), last=p.finished)
        return stop

    def interrupted(self) -> None:
        """Ctrl-C or SIGTERM: checkpoint_last.pth now, and how to go on."""
        self.progress.elapsed = time.time() - self.started
        self.save("checkpoint_last.pth", last=True)
        self.writer.finish()
        if self.main:
            print(f"\ninterrupted: saved {self.run.out_dir}/checkpoint_last.pth; continue with --resume "
                  f"{self.run.out_dir}", file=sys.stderr)

    def done(self, failed: list, begun) -> None:
        if not self.main:
            return
        if failed:
            raise OSError(28, f"the last {' and '.join(failed)} could not be written (see the warnings above); "
                          f"the earlier ones are kept", self.run.out_dir)
        device = self.setup.device
        gpu = f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else ""
        print(f"done: {self.run.out_dir}/checkpoint_best.pth ({time.time() - (begun or self.started):.2f} s{gpu})",
              file=sys.stderr)

    def close(self) -> None:
        self.writer.close()
        if self.val_feed:
            self.val_feed.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=f"config keys and their defaults (config.py):\n{describe_keys()}")
    parser.add_argument("--config", default="config.yaml", help="YAML config (default: config.yaml, the demo)")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. --set train.epochs=5 model.decoder=attention")
    parser.add_argument("--resume", metavar="RUN_DIR_OR_CHECKPOINT",
                        help="continue a run from its checkpoint_last.pth, writing into that run folder")
    args = parser.parse_args(argv)
    begun = time.time()
    command = shlex.join(["python", "train.py", *(argv if argv is not None else sys.argv[1:])])
    checkpoint = None
    if args.resume:
        config, checkpoint = resume_config(args.resume, args.set)
        command = checkpoint.get("command") or command
    else:
        config = load_config(args.config, args.set)
    run = RunFolder(config.train.out_dir)
    if int(os.environ.get("RANK", "0")) == 0:
        run.lock()
    try:
        if not checkpoint and os.path.exists(last := os.path.join(run.out_dir, "checkpoint_last.pth")):
            return run.report_existing(load_checkpoint(last))
        if checkpoint and checkpoint["progress"]["epoch"] >= config.train.epochs:
            warn(f"{run.out_dir}: the run has trained all {config.train.epochs} epochs; nothing to do "
                 f"(add epochs with --set train.epochs=N)")
            return run.out_dir
        return train(config, run, checkpoint, command, begun)
    finally:
        run.close()


if __name__ == "__main__":
    run_main(main)
