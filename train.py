"""Train an image-captioning model.

    python train.py                                    # embedded demo dataset (config.yaml)
    python train.py --config configs/flickr8k.yaml     # Flickr8k, ResNet-50 + LSTM
    python train.py --config configs/flickr8k.yaml --set train.epochs=5 train.batch_size=128
    python train.py --resume runs/demo                 # continue an interrupted run
    torchrun --nproc_per_node=4 train.py --config configs/flickr8k.yaml   # several GPUs

With a frozen encoder, every image goes through the CNN once (features are cached on disk
under train.cache_dir); each training step then only runs the decoder on cached features.
Writes into train.out_dir: checkpoint_last.pth, checkpoint_best.pth, loss_log.txt,
config.yaml, vocab.json. Ctrl-C (or SIGTERM) saves checkpoint_last.pth; --resume continues from it.
"""
import argparse
import gc
import math
import os
import random
import signal
import sys
import time

import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from config import DEFAULTS, load_config, merge, parse_overrides
from cuda_graphs import graphed_step
from data.dataset import load_splits
from data.features import wait_for_cache_writes
from data.prepare import prepare_splits
from data.vocab import Vocabulary
from decoding import generate
from models import build_model
from utils import (CheckpointWriter, checkpoint_state, load_checkpoint, load_weights, pick_device, run_main,
                   seed_everything)

LOG_HEADER = "step\tepoch\tsplit\tloss\tlr\telapsed\tbleu4\tcider\n"
BUCKET_BATCHES = 50   # train.batch_by_length sorts runs of this many batches: longer runs, more even lengths


def batch_loss(model, inputs, tokens, lengths, config, amp, normalizer=None, label_smoothing=None):
    """Loss of one batch; tokens are cut to the batch's longest caption."""
    if label_smoothing is None:
        label_smoothing = config["train"]["label_smoothing"]
    with amp:
        return model(inputs, tokens[:, :int(lengths.max())], lengths, label_smoothing,
                     normalizer, from_images=config["train"]["fine_tune_encoder"])


@torch.no_grad()
def validate(model, val, config, vocab, device, amp):
    """Validation loss over all val captions, and greedy {"BLEU-4", "CIDEr"} on the first val_bleu_images images."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(val["tokens"]), config["train"]["batch_size"]):
        rows = slice(start, start + config["train"]["batch_size"])
        loss, _ = batch_loss(model, val["inputs"][val["image_index"][rows].to(device)], val["tokens"][rows].to(device),
                             val["lengths"][rows], config, amp, label_smoothing=0.0)   # a true perplexity
        total, count = total + loss.item() * len(val["tokens"][rows]), count + len(val["tokens"][rows])
    scores = {"BLEU-4": float("nan"), "CIDEr": float("nan")}
    n = min(config["train"]["val_bleu_images"], len(val["names"]))
    if n:
        from metrics import quick_scores
        hypotheses = {}
        for start in range(0, n, 256):
            inputs = val["inputs"][start:min(start + 256, n)].to(device)
            with amp:
                features = model.encoder.extract(inputs) if config["train"]["fine_tune_encoder"] else inputs
                results = generate(model, features, vocab, beam_size=1, max_len=config["decode"]["max_len"])
            hypotheses.update({val["names"][start + j]: r["caption"] for j, r in enumerate(results)})
        scores = quick_scores(hypotheses, {name: val["references"][name] for name in hypotheses})
    model.train()
    return total / max(count, 1), scores


def make_amp(device, enabled):
    """bf16 autocast on CUDA where supported, else fp16 with a GradScaler; nothing on CPU/MPS."""
    if not (enabled and device.type == "cuda"):
        return torch.autocast("cpu", enabled=False), None
    if torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16), None
    return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")


def optimizer_step(optimizer, scaler, loss, grad_clip):
    """Backward and one update: the loss scaled under fp16 autocast, gradients clipped to grad_clip."""
    optimizer.zero_grad(set_to_none=True)
    if scaler:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def training_step(model, optimizer, scaler, graphed, rows, lengths, inputs, image_index, tokens, config, amp,
                  normalizer=None):
    """One update on caption rows [B] (on the device; lengths [B] on the CPU), replayed as a CUDA graph where
    `graphed` (a cuda_graphs.GraphedStep, or None) takes the batch, else eager. -> the batch's loss, on the device"""
    if graphed is not None and len(rows) == config["train"]["batch_size"]:
        loss = graphed(rows, int(lengths.max()))
        if loss is not None:
            optimizer.step()
            return loss
    loss, extra = batch_loss(model, inputs[image_index[rows]], tokens[rows], lengths, config, amp, normalizer)
    optimizer_step(optimizer, scaler, loss + extra, config["train"]["grad_clip"])
    return loss


def lr_lambda(config, total_steps):
    t = config["train"]

    def factor(step):
        if step < t["warmup_steps"]:
            return (step + 1) / t["warmup_steps"]
        if t["lr_schedule"] == "cosine":
            progress = (step - t["warmup_steps"]) / max(1, total_steps - t["warmup_steps"])
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0
    return factor


def epoch_order(lengths, batch_size: int, seed: int, by_length: bool) -> torch.Tensor:
    """The captions' order for one epoch: a seeded shuffle; batches are order[b*batch_size:(b+1)*batch_size].

    by_length: batches of captions of about the same length, in random order. A batch's time steps
    run one after another up to its longest caption, so on a GPU a step costs about that length.
    The shuffled captions are sorted by length within runs of BUCKET_BATCHES batches; the full
    batches are then shuffled, and the short one stays last.
    """
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=generator)
    if not by_length:
        return order
    chunks = order.split(batch_size * BUCKET_BATCHES)
    order = torch.cat([chunk[lengths[chunk].argsort(stable=True)] for chunk in chunks])
    full = len(order) // batch_size
    batches = order[:full * batch_size].view(full, batch_size)[torch.randperm(full, generator=generator)]
    return torch.cat([batches.flatten(), order[full * batch_size:]])


def setup_distributed(config):
    """(rank, world size, device). Under torchrun: one process per GPU (or CPU process with gloo)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, pick_device(config["train"]["device"])
    use_cuda = torch.cuda.is_available() and config["train"]["device"] in ("auto", "cuda")
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def train(config, checkpoint=None, resume=None):
    """Train from scratch, or continue from `checkpoint` (loaded from the path `resume`)."""
    t = config["train"]
    out_dir = t["out_dir"]
    if not checkpoint and os.path.exists(os.path.join(out_dir, "checkpoint_last.pth")):
        raise ValueError(f"{out_dir} already holds a run; continue it with --resume {out_dir}, "
                         f"or start a new one with --set train.out_dir=runs/NEW_NAME")
    rank, world, device = setup_distributed(config)
    main_process = rank == 0
    seed_everything(t["seed"])
    # A full garbage collection walks every object, and with torch loaded that takes 0.1-0.2 s; preparing
    # the captions sets some off. What exists now outlives the run: leave it out of collections until the end.
    gc.freeze()
    loaded = load_splits(config["data"])     # read once: Flickr8k's captions take a good part of a second to parse
    if checkpoint:
        vocab = Vocabulary(checkpoint["vocab"])
    else:
        captions, train_names, _ = loaded
        vocab = Vocabulary.build((c for n in train_names for c in captions[n]), config["data"]["min_word_freq"])
    # Initialised where it trains: on an H200 machine ResNet-50 took 0.26 s on its CPU, 0.04 s on the GPU.
    with torch.device(device):
        model = build_model(config, len(vocab))
    if checkpoint:
        load_weights(model, checkpoint["model"], resume, checkpoint["config"])
    # A frozen CNN is copied to the CPU once, for every checkpoint; the feature cache's key hashes that copy
    # rather than copying the weights again.
    frozen_cnn = ({k: v.cpu() for k, v in model.state_dict().items() if k.startswith("encoder.backbone.")}
                  if main_process and not t["fine_tune_encoder"] else {})
    if frozen_cnn:
        model.encoder.weights_fingerprint({k[len("encoder.backbone."):]: v for k, v in frozen_cnn.items()})
    if main_process:
        os.makedirs(out_dir, exist_ok=True)
        vocab.save(os.path.join(out_dir, "vocab.json"))
        with open(os.path.join(out_dir, "config.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump(config, f, sort_keys=False)
    # SIGTERM (a scheduler's preemption, `kill`) stops like Ctrl-C, from here on.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        data = prepare_splits(config, vocab, model.encoder, device, show_progress=main_process, loaded=loaded)
    except KeyboardInterrupt:
        if main_process:
            print("\ninterrupted during feature extraction: the features computed so far are cached; run the "
                  "same command again to continue", file=sys.stderr)
        sys.exit(130)
    train_set, val_set = data["train"], data["val"]
    # The cached features are small: keep them, the captions and each epoch's order on the device, so a
    # step is pure device work with no host-device copy (a copy from pageable memory waits for the GPU).
    inputs, tokens_all = train_set["inputs"].to(device), train_set["tokens"].to(device)
    image_index, lengths = train_set["image_index"].to(device), train_set["lengths"]
    if val_set:
        val_set["inputs"] = val_set["inputs"].to(device)
    n_captions, bs = len(train_set["tokens"]), t["batch_size"]
    # A last batch with under 2 captions per process is left out (they are reshuffled into the next epoch):
    # BatchNorm cannot train on one row.
    steps_per_epoch = n_captions // bs + (n_captions % bs >= 2 * world)
    if not steps_per_epoch:
        raise ValueError(f"{n_captions} training captions are too few for {world} process(es): each needs at "
                         f"least 2 per batch; add images or lower the process count")

    decoder_params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("encoder.backbone")]
    groups = [{"params": decoder_params, "lr": t["lr"]}]
    if t["fine_tune_encoder"]:
        groups.append({"params": list(model.encoder.last_block().parameters()), "lr": t["encoder_lr"]})
    optimizer = torch.optim.AdamW(groups, weight_decay=t["weight_decay"], fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, t["epochs"] * steps_per_epoch))
    amp, scaler = make_amp(device, t["amp"])
    higher_is_better = t["select_metric"] in ("bleu4", "cider") and t["val_bleu_images"] > 0
    progress = {"epoch": 0, "batch": 0, "step": 0, "best": None, "stale_epochs": 0, "elapsed": 0.0}
    # Reading images draws from the global RNG only on a cache miss; re-seed so dropout never depends on the cache.
    torch.manual_seed(t["seed"] + 1 + rank)
    if checkpoint:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if scaler and checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        progress.update(checkpoint["progress"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        random.setstate(checkpoint["rng"]["python"])
        if torch.cuda.is_available() and checkpoint["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
    step_model = model
    if world > 1:
        step_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if t["compile"]:
        step_model = torch.compile(step_model)
    graphed = graphed_step(model, decoder_params, inputs, image_index, tokens_all, lengths, config, world, scaler)
    # Checkpoints are written by a background thread while the next epoch trains: on a GPU an epoch
    # can take less time than writing a ResNet-50 to disk.
    writer = CheckpointWriter(out_dir)

    def save(name, *same_as, last=False):
        """Snapshot the run now; write checkpoint `name` (the names in same_as become links to it) in the
        background. last: the run ends after this one (CheckpointWriter.submit)."""
        if not main_process:
            return
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        state = checkpoint_state(model, vocab, config, frozen_cnn, optimizer=optimizer.state_dict(),
                                 scheduler=scheduler.state_dict(), scaler=scaler.state_dict() if scaler else None,
                                 progress=dict(progress), rng=rng)
        writer.submit(state, name, *same_as, last=last)

    log = None
    if main_process:
        new_log = not os.path.exists(os.path.join(out_dir, "loss_log.txt"))
        log = open(os.path.join(out_dir, "loss_log.txt"), "a", encoding="utf-8")
        if new_log:
            log.write(LOG_HEADER)
        print(f"device {device} x{world}{' (CUDA graphs)' if graphed else ''} | "
              f"{len(train_set['names'])} train images, {n_captions} captions | "
              f"{len(val_set['names']) if val_set else 0} val images | vocab {len(vocab)} | {steps_per_epoch} steps/epoch",
              file=sys.stderr)
    started = time.time() - progress["elapsed"]
    model.train()
    try:
        while progress["epoch"] < t["epochs"]:
            epoch = progress["epoch"]
            order = epoch_order(lengths, bs, t["seed"] * 1000 + epoch, t["batch_by_length"])
            order_on_device = order.to(device)
            bar = tqdm(range(progress["batch"], steps_per_epoch), desc=f"epoch {epoch + 1}/{t['epochs']}", unit="step",
                       dynamic_ncols=True, initial=progress["batch"], total=steps_per_epoch, disable=not main_process)
            running, running_n = 0.0, 0
            for b in bar:
                span = slice(b * bs, (b + 1) * bs)
                # Each rank takes every world-th caption of the global batch and divides its loss sum by the
                # global token count (times world, as DDP averages): the same gradient as one process.
                normalizer = (lengths[order[span]] - 1).sum().item() / world
                share = slice(rank, None, world)
                loss = training_step(step_model, optimizer, scaler, graphed, order_on_device[span][share],
                                     lengths[order[span][share]], inputs, image_index, tokens_all, config, amp,
                                     normalizer)
                scheduler.step()
                progress["step"] += 1
                progress["batch"] = b + 1
                # Summed on the device: reading loss.item() every step would stall the GPU.
                running, running_n = running + loss.detach() * world, running_n + 1
                if main_process and (progress["step"] % t["log_every"] == 0 or b + 1 == steps_per_epoch):
                    lr, mean_loss = optimizer.param_groups[0]["lr"], float(running) / running_n
                    log.write(f"{progress['step']}\t{epoch + 1}\ttrain\t{mean_loss:.5f}\t{lr:.3e}\t"
                              f"{time.time() - started:.1f}\tnan\tnan\n")
                    log.flush()
                    bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{lr:.1e}")
                    running, running_n = 0.0, 0
            bar.close()
            progress.update(epoch=epoch + 1, batch=0, elapsed=time.time() - started)
            stop = torch.zeros(1)
            if main_process:
                stop[0] = end_of_epoch(model, val_set, config, vocab, device, amp, progress, higher_is_better,
                                       log, started, optimizer, save)
            if world > 1:
                dist.broadcast(stop, 0)
            if stop.item():
                break
        writer.finish()
    except KeyboardInterrupt:
        progress["elapsed"] = time.time() - started
        save("checkpoint_last.pth", last=True)
        writer.finish()
        if main_process:
            print(f"\ninterrupted: saved {out_dir}/checkpoint_last.pth; continue with --resume {out_dir}", file=sys.stderr)
        sys.exit(130)
    finally:
        gc.unfreeze()
        writer.close()
        wait_for_cache_writes()     # the feature cache's last shards, written while training went on
        if log:
            log.close()
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    if main_process:
        print(f"done: {out_dir}/checkpoint_best.pth", file=sys.stderr)
    return out_dir


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def end_of_epoch(model, val_set, config, vocab, device, amp, progress, higher_is_better, log, started, optimizer, save):
    """Validate, log, write checkpoints; returns True when early stopping says stop."""
    epoch, improved, metric = progress["epoch"], True, None
    if val_set:
        val_loss, scores = validate(model, val_set, config, vocab, device, amp)
        log.write(f"{progress['step']}\t{epoch}\tval\t{val_loss:.5f}\t{optimizer.param_groups[0]['lr']:.3e}\t"
                  f"{time.time() - started:.1f}\t{scores['BLEU-4']:.5f}\t{scores['CIDEr']:.5f}\n")
        log.flush()
        metric = {"bleu4": scores["BLEU-4"], "cider": scores["CIDEr"]}.get(config["train"]["select_metric"])
        metric = metric if higher_is_better else val_loss
        improved = progress["best"] is None or (metric > progress["best"] if higher_is_better else metric < progress["best"])
        print(f"epoch {epoch}: val loss {val_loss:.4f} (perplexity {math.exp(min(val_loss, 50)):.2f}), "
              f"val BLEU-4 {scores['BLEU-4']:.4f}, CIDEr {scores['CIDEr']:.4f}{' *best*' if improved else ''}",
              file=sys.stderr)
    progress["stale_epochs"] = 0 if improved else progress["stale_epochs"] + 1
    if improved:
        progress["best"] = metric
    patience = config["train"]["early_stop_patience"]
    stop = bool(patience and progress["stale_epochs"] >= patience)
    save("checkpoint_last.pth", *(["checkpoint_best.pth"] if improved else []),
         last=stop or epoch == config["train"]["epochs"])
    if stop:
        print(f"early stop: no improvement for {progress['stale_epochs']} epochs", file=sys.stderr)
    return stop


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config.yaml", help="YAML config (default: config.yaml, the demo)")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. --set train.epochs=5 model.decoder=attention")
    parser.add_argument("--resume", metavar="RUN_DIR_OR_CHECKPOINT", help="continue a run from its checkpoint_last.pth")
    args = parser.parse_args(argv)
    if not args.resume:
        return train(load_config(args.config, args.set))
    checkpoint = load_checkpoint(args.resume)
    config = merge(merge(DEFAULTS, checkpoint["config"], args.resume), parse_overrides(args.set), "--set")
    for section in ("model", "data"):
        changed = [k for k in config[section] if config[section][k] != checkpoint["config"][section].get(k)]
        if changed:
            raise ValueError(f"--resume: the run was trained with {section}.{changed[0]}="
                             f"{checkpoint['config'][section].get(changed[0])!r}; a resumed run keeps its "
                             f"{section}.* settings: start a new run to change them")
    return train(config, checkpoint, args.resume)


if __name__ == "__main__":
    run_main(main)
