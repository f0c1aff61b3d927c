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
import contextlib
import gc
import math
import os
import shlex
import signal
import sys
import time

import torch
import yaml
from tqdm import tqdm

from config import describe_keys, load_config
from data.captions import load_splits
from data.feature_store import FeatureFeed, fits_on_device
from data.features import wait_for_cache_writes
from data.mirror import Mirroring
from data.prepare import prepare_splits
from data.vocab import Vocabulary
from models import build_model
from models.checkpoint import load_checkpoint, load_weights
from training.checkpoints import (
    CheckpointWriter,
    checkpoint_state,
    frozen_weights,
    restore,
    resume_config,
    rng_state,
    starting_point,
)
from training.cuda_graphs import graphed_step
from training.distributed import broadcast_flag, setup_distributed, shutdown, wrap
from training.run_folder import RunFolder
from training.scst import SelfCritical
from training.step import captions_of_images, epoch_order, make_amp, make_optimizer, optimizer_step, training_step
from training.validation import describe_validation, validate
from training.weight_average import WeightAverage
from utils import UserError, atomic_write_text, run_main, seed_everything, warn


def train(config, run: RunFolder, checkpoint=None, command="", begun=None):
    """Train from scratch, from train.init_from's weights, or on from a resumed `checkpoint`. begun: when the
    command started (time.time()), for the time the last line reports."""
    t = config["train"]
    rank, world, device = setup_distributed(config)
    main_process = rank == 0
    seed_everything(t["seed"])
    gc.freeze()    # what exists now outlives the run: full collections, set off by parsing captions, skip it
    captions, train_names, val_names = loaded = load_splits(config["data"])
    start = starting_point(config, checkpoint)        # train.init_from's (model, vocab), or None
    vocab = (Vocabulary(checkpoint["vocab"]) if checkpoint else start[1] if start
             else Vocabulary.build((c for n in train_names for c in captions[n]), config["data"]["min_word_freq"]))
    with torch.device(device):              # built where it trains: no copy from the host
        model = build_model(config, len(vocab))
    if checkpoint:
        load_weights(model, checkpoint["model"], run.out_dir, checkpoint["config"])
    elif start:
        model.load_state_dict(start[0].state_dict())
    frozen_cnn = frozen_weights(model) if main_process else {}
    if main_process:
        vocab.save(os.path.join(run.out_dir, "vocab.json"))
        atomic_write_text(os.path.join(run.out_dir, "config.yaml"), yaml.safe_dump(config, sort_keys=False))
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)   # a scheduler's preemption stops like Ctrl-C
    try:
        data = prepare_splits(config, vocab, model.encoder, device, loaded=loaded)
    except KeyboardInterrupt:
        if main_process:
            print("\ninterrupted during feature extraction: the features computed so far are cached; run the "
                  "same command again to continue", file=sys.stderr)
        sys.exit(130)
    train_set, val_set = data["train"], data["val"]
    on_device = fits_on_device(train_set["inputs"].nbytes, device, t["cache_on_device"])
    feed = FeatureFeed(train_set["inputs"], device, on_device)
    val_feed = FeatureFeed(val_set["inputs"], device, on_device) if val_set else None
    tokens, lengths = train_set["tokens"].to(device), train_set["lengths"]
    image_index, host_index = train_set["image_index"].to(device), train_set["image_index"]
    n_images = len(train_set["names"])
    image_row = torch.arange(n_images)          # each image's row of the inputs (mirrored ones: N + i)
    first_caption = torch.searchsorted(host_index, image_row)     # an image's captions are consecutive rows
    caption_count = torch.bincount(host_index, minlength=n_images)
    mirror = Mirroring(vocab, train_set["tokens"], host_index, n_images, t["seed"]) if t["hflip"] else None
    # An epoch is over captions (cross-entropy), or over images (self-critical, or cross-entropy through a
    # fine-tuned CNN, whose blocks then run once per image). A last batch with under 2 rows per process is
    # left out, reshuffled into the next epoch: BatchNorm cannot train on one row.
    by_image = t["scst"] or model.encoder.tail_blocks > 0
    n_rows, bs = (n_images if by_image else len(tokens)), t["batch_size"]
    steps_per_epoch = n_rows // bs + (n_rows % bs >= 2 * world)
    if not steps_per_epoch:
        raise UserError(f"{n_rows} training rows are too few for {world} process(es) at train.batch_size={bs}: "
                         f"each needs at least 2 per batch; add images or lower the process count")
    scst = SelfCritical({n: captions[n] for n in train_set["names"]}, vocab, config) if t["scst"] else None

    decoder_params, optimizer, scheduler = make_optimizer(model, config, t["epochs"] * steps_per_epoch, device)
    amp, scaler = make_amp(device, t["amp"])
    average = WeightAverage(model, t["ema_decay"]) if t["ema_decay"] else None
    averaged = average.swapped_in if average else contextlib.nullcontext
    progress = {"epoch": 0, "batch": 0, "step": 0, "best": None, "stale_epochs": 0, "elapsed": 0.0, "finished": False}
    # Reading images draws from the global RNG only on a cache miss; re-seed so dropout never depends on the cache.
    torch.manual_seed(t["seed"] + 1 + rank)
    if checkpoint:        # the resumed run's optimizer, schedule, progress and random state, as they were
        restore(checkpoint, optimizer, scheduler, scaler, progress, average)
    step_model = wrap(model, device, world)
    if t["compile"]:
        step_model = torch.compile(step_model)
    graphed = None if t["scst"] else graphed_step(model, decoder_params, feed.inputs, image_index if on_device else None,
                                                  tokens, lengths, config, world, scaler)
    writer = CheckpointWriter(run.out_dir)

    def save(name, *same_as, last=False):
        """Snapshot the run now; write checkpoint `name` (the names in same_as become links to it) in the
        background. last: the run ends after this one."""
        if main_process:
            with averaged():
                state = checkpoint_state(model, vocab, config, frozen_cnn, optimizer=optimizer.state_dict(),
                                         scheduler=scheduler.state_dict(), scaler=scaler.state_dict() if scaler else None,
                                         progress=dict(progress), rng=rng_state(), command=command,
                                         weight_average=average.state_dict() if average else None)
            writer.submit(state, name, *same_as, last=last)

    def check(final: bool) -> bool:
        """Validate, log, and write checkpoints; True when early stopping says stop."""
        stop = False
        if main_process:
            with averaged():
                stop = end_of_validation(model, val_set, val_feed, config, vocab, amp, progress, run, optimizer,
                                         started, save, final)
        return broadcast_flag(stop, world)

    if main_process:
        run.open_log()
        print(f"device {device} x{world}{' (CUDA graphs)' if graphed else ''}"
              f"{'' if on_device else ' (features streamed)'} | {len(train_set['names'])} train images, "
              f"{len(tokens)} captions | {len(val_set['names']) if val_set else 0} val images | vocab {len(vocab)} | "
              f"{steps_per_epoch} steps/epoch{' | self-critical' if scst else ''}"
              f"{f' | last {model.encoder.tail_blocks} CNN blocks trained' if model.encoder.tail_blocks else ''}"
              f"{' | mirrored images' if mirror else ''}{f' | weight average {average.decay}' if average else ''}",
              file=sys.stderr)
        if val_set:
            print(describe_validation(config, len(val_set["names"])), file=sys.stderr)
    started = time.time() - progress["elapsed"]
    model.train()
    stop = False
    try:
        if start and not progress["step"] and val_set:   # the starting point is the first candidate for best
            stop = check(final=False)
        while progress["epoch"] < t["epochs"] and not stop:
            epoch = progress["epoch"]
            order = (torch.randperm(n_rows, generator=torch.Generator().manual_seed(t["seed"] * 1000 + epoch))
                     if by_image else epoch_order(lengths, bs, t["seed"] * 1000 + epoch, t["batch_by_length"]))
            order_on_device = order.to(device)
            if mirror:        # this epoch's mirrored images; tokens and image_index change in place (CUDA graphs)
                epoch_tokens, host_index, image_row = mirror.epoch(epoch)
                tokens.copy_(epoch_tokens)
                image_index.copy_(host_index)
            bar = tqdm(range(progress["batch"], steps_per_epoch), desc=f"epoch {epoch + 1}/{t['epochs']}", unit="step",
                       dynamic_ncols=True, initial=progress["batch"], total=steps_per_epoch, disable=not main_process)
            running, rewards, running_n = 0.0, 0.0, 0
            for b in bar:
                share = slice(rank, None, world)               # this rank's rows of the global batch
                rows, next_rows = order[b * bs:(b + 1) * bs], order[(b + 1) * bs:(b + 2) * bs]
                if scst:
                    names = [train_set["names"][i] for i in rows[share].tolist()]
                    loss, reward = scst.loss(model, step_model, feed.batch(rows[share], next_rows[share]), names,
                                             len(rows) * scst.k / world, amp)
                    optimizer_step(optimizer, scaler, loss, t["grad_clip"])
                    rewards += reward
                elif by_image:      # all captions of each image: the fine-tuned blocks run once per image
                    images, next_images = rows[share], next_rows[share]
                    caption_rows, image_of_row = captions_of_images(first_caption, caption_count, images)
                    normalizer = (lengths[captions_of_images(first_caption, caption_count, rows)[0]] - 1).sum().item() / world
                    loss = training_step(step_model, optimizer, scaler, None, caption_rows, lengths[caption_rows],
                                         feed.batch(image_row[images], image_row[next_images]), None, tokens,
                                         config, amp, normalizer, image_of_row.to(device))
                else:
                    # Each rank divides its loss sum by the global token count (times world, as DDP averages).
                    normalizer = (lengths[rows] - 1).sum().item() / world
                    captions_on_device = order_on_device[b * bs:(b + 1) * bs][share]
                    inputs = feed.inputs if on_device else feed.batch(host_index[rows[share]], host_index[next_rows[share]])
                    loss = training_step(step_model, optimizer, scaler, graphed, captions_on_device,
                                         lengths[rows[share]], inputs, image_index if on_device else None, tokens,
                                         config, amp, normalizer)
                scheduler.step()
                if average:
                    average.update()
                progress.update(step=progress["step"] + 1, batch=b + 1)
                running, running_n = running + loss.detach() * world, running_n + 1   # summed on the device: no sync
                if main_process and (progress["step"] % t["log_every"] == 0 or b + 1 == steps_per_epoch):
                    lr, mean_loss = optimizer.param_groups[0]["lr"], float(running) / running_n
                    if not math.isfinite(mean_loss):
                        raise UserError(f"the training loss became {mean_loss} at step {progress['step']}; the last "
                                         f"good checkpoint in {run.out_dir} is kept; lower train.lr and start again")
                    mean_reward = rewards / running_n if scst else float("nan")
                    run.write_row(progress["step"], epoch + 1, "train", mean_loss, lr, time.time() - started,
                                  reward=mean_reward)
                    bar.set_postfix(loss=f"{mean_loss:.3f}", **({"reward": f"{mean_reward:.3f}"} if scst else {}),
                                    lr=f"{lr:.1e}")
                    running, rewards, running_n = 0.0, 0.0, 0
                if t["val_every"] and progress["step"] % t["val_every"] == 0 and b + 1 < steps_per_epoch:
                    progress["elapsed"] = time.time() - started
                    if stop := check(final=False):
                        break
            bar.close()
            if not stop:
                progress.update(epoch=epoch + 1, batch=0, elapsed=time.time() - started)
                stop = check(final=progress["epoch"] == t["epochs"])
        failed = writer.finish()
    except KeyboardInterrupt:
        progress["elapsed"] = time.time() - started
        save("checkpoint_last.pth", last=True)
        writer.finish()
        if main_process:
            print(f"\ninterrupted: saved {run.out_dir}/checkpoint_last.pth; continue with --resume {run.out_dir}",
                  file=sys.stderr)
        sys.exit(130)
    finally:
        gc.unfreeze()
        writer.close()
        feed.close()
        wait_for_cache_writes()     # the feature cache's last shards, written while training went on
        shutdown(world)
    if main_process and failed:
        raise OSError(28, f"the last {' and '.join(failed)} could not be written (see the warnings above); "
                      f"the earlier ones are kept", run.out_dir)
    if main_process:
        gpu = f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else ""
        print(f"done: {run.out_dir}/checkpoint_best.pth ({time.time() - (begun or started):.2f} s{gpu})", file=sys.stderr)
    return run.out_dir


def end_of_validation(model, val_set, feed, config, vocab, amp, progress, run, optimizer, started, save, final):
    """Validate, log, write checkpoint_last.pth (and checkpoint_best.pth when the metric improved); returns
    True when early stopping says stop."""
    t, improved, metric = config["train"], True, None
    if val_set:
        val_loss, scores = validate(model, val_set, feed, config, vocab, amp)
        run.write_row(progress["step"], progress["epoch"], "val", val_loss, optimizer.param_groups[0]["lr"],
                      time.time() - started, scores["BLEU-4"], scores["CIDEr"])
        by_score = t["select_metric"] != "loss" and t["val_bleu_images"] > 0
        metric = scores["BLEU-4" if t["select_metric"] == "bleu4" else "CIDEr"] if by_score else val_loss
        improved = progress["best"] is None or (metric > progress["best"] if by_score else metric < progress["best"])
        print(f"epoch {progress['epoch']} step {progress['step']}: val loss {val_loss:.4f} (perplexity "
              f"{math.exp(min(val_loss, 50)):.2f}), BLEU-4 {scores['BLEU-4']:.4f}, CIDEr {scores['CIDEr']:.4f}"
              f"{' *best*' if improved else ''}", file=sys.stderr)
    progress["stale_epochs"] = 0 if improved else progress["stale_epochs"] + 1   # counts validations
    if improved:
        progress["best"] = metric
    stop = bool(t["early_stop_patience"] and progress["stale_epochs"] >= t["early_stop_patience"])
    if stop:
        print(f"early stop: no improvement in {progress['stale_epochs']} validations", file=sys.stderr)
    progress["finished"] = stop or final
    save("checkpoint_last.pth", *(["checkpoint_best.pth"] if improved else []), last=progress["finished"])
    return stop


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


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
    run = RunFolder(config["train"]["out_dir"])
    if int(os.environ.get("RANK", "0")) == 0:
        run.lock()
    try:
        if not checkpoint and os.path.exists(last := os.path.join(run.out_dir, "checkpoint_last.pth")):
            return run.report_existing(load_checkpoint(last))
        if checkpoint and checkpoint["progress"]["epoch"] >= config["train"]["epochs"]:
            warn(f"{run.out_dir}: the run has trained all {config['train']['epochs']} epochs; nothing to do "
                 f"(add epochs with --set train.epochs=N)")
            return run.out_dir
        return train(config, run, checkpoint, command, begun)
    finally:
        run.close()


if __name__ == "__main__":
    run_main(main)
