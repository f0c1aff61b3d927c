"""Where bench.py's start-up costs go on a GPU: the first CNN call at each batch size, extraction's first run
against the runs after it, and the end-to-end run (train.train, 1,500 JPEGs, 10 epochs): its phases, the cache
and checkpoint writes (torch.save, fsync, rename) on their threads, the main thread sampled every 2 ms, and
train.py's gc.freeze() off and on.

    python3 scripts/profile_e2e.py
    DEVICE=cpu N_IMAGES=20 python3 scripts/profile_e2e.py      # a smoke test of this script

Needs devdata/flickr8k (see gpu_bench.sh). Its runs on an H200 are in docs/gpu_bench_h200.log.
"""
import argparse
import collections
import functools
import gc
import os
import sys
import tempfile
import threading
import time
import types

import torch

sys.path.insert(0, ".")
import bench  # noqa: E402
import data.prepare  # noqa: E402
import train  # noqa: E402
import utils  # noqa: E402
from data.features import CUDA_BATCH, extract_features  # noqa: E402
from models import build_model  # noqa: E402
from models.encoder import EncoderCNN  # noqa: E402

device = torch.device(os.environ.get("DEVICE", "cuda"))
images, captions_path, names, _ = bench.find_data(argparse.Namespace(data="devdata/flickr8k"), None,
                                                  int(os.environ.get("N_IMAGES", 1500)))
paths = [os.path.join(images, n) for n in names]
for p in paths:                                        # as bench.py does: every file in the page cache
    with open(p, "rb") as f:
        f.read()


def clock():
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


# The CNN's first call at a batch size against its second (cuDNN picks and builds its plans on the first).
with tempfile.TemporaryDirectory() as tmp:
    config = bench.end_to_end_config(tmp, images, captions_path, names, 5, 224, "lstm", 10, 512, device)
    model = build_model(config, 3000).to(device).eval()
with torch.no_grad():
    for batch, bf16 in ((256, True), (256, True), (76, True), (76, True), (220, True), (1, False), (1, False)):
        x = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8, device=device)
        start = clock()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            model.encoder.extract(x)
        print(f"encoder.extract, batch {batch:>3}{' bf16' if bf16 else ' fp32'}: {clock() - start:.3f} s", flush=True)

# Extraction as bench.py measures it: one batch of warm-up, then 7,500 files (the 1,500 cycled), four times over.
warm_up = (paths * CUDA_BATCH)[:CUDA_BATCH]
extract_features(model.encoder, warm_up, 224, None, device, batch_size=CUDA_BATCH, num_workers=0, desc="warm-up")
cycled = paths * 5
for attempt in range(4):
    start = clock()
    extract_features(model.encoder, cycled, 224, None, device, batch_size=CUDA_BATCH, num_workers=2, desc="features")
    print(f"extraction run {attempt + 1} after bench's warm-up: {len(cycled) / (clock() - start):.0f} images/s",
          flush=True)
for attempt in range(2):
    model.encoder._fingerprint = (None, None)
    start = clock()
    model.encoder.weights_fingerprint()
    print(f"weights_fingerprint (ResNet-50 on {device}): {clock() - start:.3f} s")
del model

# End to end: a warm-up run, then a timed one, its phases timed on the main thread (the steps are asynchronous:
# their GPU time shows where the CPU next waits for it).
spent, calls = collections.defaultdict(float), collections.Counter()
writes = []     # checkpoint and cache writes, on their threads: how long torch.save, fsync and rename take


def timed(owner, name, record):
    """Replace owner.name with a wrapper that calls record(start, seconds) after each call."""
    real = getattr(owner, name)

    @functools.wraps(real)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            record(start, time.perf_counter() - start)
    setattr(owner, name, wrapper)


def phase(label):
    def record(start, seconds):
        spent[label] += seconds
        calls[label] += 1
    return record


def write(name):
    return lambda start, seconds: writes.append((start, seconds, name, threading.current_thread().name[:22]))


for owner, name, label in ((train, "load_splits", "read captions, list images"),
                           (train, "build_model", "build the model"),
                           (EncoderCNN, "weights_fingerprint", "  fingerprint the CNN's weights"),
                           (data.prepare, "extract_features", "  extract features"),
                           (data.prepare, "encode_captions", "  encode captions"),
                           (train, "prepare_splits", "prepare splits (the three above included)"),
                           (train, "graphed_step", "set up CUDA graphs"),
                           (train, "training_step", "training steps (launch, captures)"),
                           (train, "validate", "validate"),
                           (train, "checkpoint_state", "snapshot for checkpoints"),
                           (utils.CheckpointWriter, "finish", "wait for checkpoint writes"),
                           (train, "wait_for_cache_writes", "wait for feature cache writes")):
    timed(owner, name, phase(label))
for owner, name in ((torch, "save"), (os, "fsync"), (os, "replace")):
    timed(owner, name, write(name))

# The main thread sampled every 2 ms during the timed run: wall time by the innermost line of this project's code
# (time in torch, in a lock or waiting for the GIL counts for the project line that called it).
samples, sampling = collections.Counter(), threading.Event()


def sample(main_id):
    root = os.path.abspath(".")
    while not sampling.is_set():
        frame = sys._current_frames().get(main_id)
        while frame is not None and not frame.f_code.co_filename.startswith(root):
            frame = frame.f_back
        if frame is not None:
            where = f"{os.path.relpath(frame.f_code.co_filename, root)}:{frame.f_lineno} {frame.f_code.co_name}"
            samples[where] += 1
        time.sleep(0.002)


gc_pauses = []                                         # (generation, seconds) of each collection


def on_gc(phase, info):
    if phase == "start":
        on_gc.started = time.perf_counter()
    else:
        gc_pauses.append((info["generation"], time.perf_counter() - on_gc.started))


gc.callbacks.append(on_gc)
# warm-up; timed (phases, writes, samples); then train.py's gc.freeze() off and on, alternately
for attempt in ("warm-up", "timed", "gc.freeze() off", "gc.freeze() on", "gc.freeze() off", "gc.freeze() on"):
    spent.clear()
    calls.clear()
    writes.clear()
    gc_pauses.clear()
    train.gc = types.SimpleNamespace(freeze=lambda: None, unfreeze=lambda: None) if "off" in attempt else gc
    with tempfile.TemporaryDirectory() as tmp:
        config = bench.end_to_end_config(tmp, images, captions_path, names, 5, 224, "lstm", 10, 512, device)
        sampler = threading.Thread(target=sample, args=(threading.get_ident(),), daemon=True)
        if attempt == "timed":
            sampling.clear()
            sampler.start()
        start = clock()
        train.train(config)
        total = clock() - start
        sampling.set()
    full = [s for g, s in gc_pauses if g == 2]
    print(f"{attempt}: train.train, {len(names)} images, 10 epochs, batch 512: {total:.2f} s; garbage collections: "
          f"{len(gc_pauses)} taking {sum(s for _, s in gc_pauses):.3f} s, of which full {len(full)}: {sum(full):.3f} s",
          flush=True)
    if attempt != "timed":
        continue
    for label, seconds in spent.items():
        print(f"    {seconds:6.3f} s  {label} ({calls[label]} calls)")
    print(f"    {total - sum(s for label, s in spent.items() if not label.startswith('  ')):6.3f} s  the rest")
    print("writes (start after train.train's start, duration, what, thread):")
    for at, seconds, name, thread in writes:
        print(f"    {at - start:6.3f} s  {seconds:6.3f} s  {name:<8} {thread}")
    step = total / max(1, sum(samples.values()))
    print(f"main thread, {sum(samples.values())} samples (~{step * 1000:.1f} ms each), the 30 commonest lines:")
    for where, n in samples.most_common(30):
        print(f"    {n * step:6.3f} s  {where}")
