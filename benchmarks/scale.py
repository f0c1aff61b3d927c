"""bench.py --scale: train.py on feature caches of 10k, 40k and 120k images, 5 captions each.

No CNN runs: synthetic grids are written straight into the feature cache's format, for placeholder
image files whose stamps the cache records, and an encoder whose weights come from a file (so their
hash, the cache key, is the same on any device). Each size then trains one epoch in a `python
train.py` process of its own, while this process samples its memory. Reported per size and decoder:

- epoch_s: the epoch's training time, from train.py's own log
- open_cache_s: the time extract_features takes to find every image in the cache (no feature is read)
- peak_rss_bytes: the process's peak resident memory (VmHWM), which counts the mapped cache pages it
  touched; peak_anon_bytes: its peak memory apart from file pages, which is what grows with a dataset
  held in memory and must stay flat when the cache is streamed
- peak_gpu_bytes: on CUDA, torch's peak allocation, as train.py reports it

On a GPU: ResNet-50 grids (7x7x2048), the LSTM and attention decoders at their default sizes, features
streamed and held on the device. On a CPU the full grid, the attention decoder and the full-size LSTM
are too slow for a benchmark: ResNet-18 grids at 64 px (2x2x512) and an LSTM of width 128 (embedding
64), streamed (train.cache_on_device=auto on a CPU).
"""
import os
import random
import sys
import tempfile
import time

import torch
import torchvision

from benchmarks.train_process import run_train_py
from config import DEFAULTS, merge
from data.features.cache import Loading, extract_features, row_checksums
from data.features.key import cache_key
from models.encoder import EncoderCNN
from training.loss_log import last_elapsed
from utils import atomic_save

SIZES = (10_000, 40_000, 120_000)
CAPTIONS_PER_IMAGE = 5
WORDS = [f"w{i}" for i in range(1000)]
SHARD = 1024


def setting(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"encoder": "resnet50", "image_size": 224, "grid": (49, 2048), "decoders": ("lstm", "attention"),
                "modes": ("true", "false"), "batch_size": 512, "embed_size": 256, "hidden_size": 512}
    return {"encoder": "resnet18", "image_size": 64, "grid": (4, 512), "decoders": ("lstm",), "modes": ("auto",),
            "batch_size": 512, "embed_size": 64, "hidden_size": 128}


def make_dataset(folder: str, n: int, s: dict, encoder_path: str) -> tuple[list[str], str]:
    """n placeholder images, their captions and split files, and the cache shards of their synthetic grids."""
    images = os.path.join(folder, "images")
    os.makedirs(images)
    names = [f"img_{i:06d}.jpg" for i in range(n)]
    rng = random.Random(0)
    with open(os.path.join(folder, "captions.csv"), "w", encoding="utf-8") as f:
        f.write("image,caption\n")
        for name in names:
            open(os.path.join(images, name), "wb").close()
            for _ in range(CAPTIONS_PER_IMAGE):
                f.write(f"{name},{' '.join(rng.choices(WORDS, k=rng.randint(8, 16)))}\n")
    for split, listed in (("train", names), ("val", names[:100])):
        with open(os.path.join(folder, f"{split}.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(listed) + "\n")
    encoder = EncoderCNN(s["encoder"], encoder_path, 256, spatial=True)
    key_folder = os.path.join(folder, "cache", cache_key(encoder, s["image_size"]))
    grids = torch.randn(SHARD, *s["grid"]).half()          # one shard's values, written again for each shard
    checksums = row_checksums(grids)
    paths = [os.path.join(images, name) for name in names]
    for i, start in enumerate(range(0, n, SHARD)):
        chunk = paths[start:start + SHARD]
        files = [[os.path.abspath(p), 0, os.stat(p).st_mtime_ns] for p in chunk]
        atomic_save({"files": files, "features": grids[:len(chunk)], "checksums": checksums[:len(chunk)]},
                    os.path.join(key_folder, f"shard_0_{i:05d}.pt"), durable=False)
    return paths, os.path.join(folder, "cache")


def train_one_epoch(folder: str, cache_dir: str, s: dict, encoder_path: str, decoder: str, mode: str, device):
    config = merge(DEFAULTS, {
        "data": {"captions": os.path.join(folder, "captions.csv"), "images": os.path.join(folder, "images"),
                 "train_split": os.path.join(folder, "train.txt"), "val_split": os.path.join(folder, "val.txt"),
                 "min_word_freq": 1, "image_size": s["image_size"]},
        "model": {"encoder": s["encoder"], "encoder_weights": encoder_path, "decoder": decoder,
                  "embed_size": s["embed_size"], "hidden_size": s["hidden_size"]},
        "train": {"epochs": 1, "batch_size": s["batch_size"], "out_dir": os.path.join(folder, f"run_{decoder}_{mode}"),
                  "cache_dir": cache_dir, "cache_on_device": mode, "val_decoded_images": 0, "select_metric": "loss",
                  "device": str(device), "num_workers": 0, "log_every": 10 ** 9, "batch_by_length": True}},
        "bench.py --scale")
    done = run_train_py(config, os.path.join(folder, f"config_{decoder}_{mode}.yaml"))
    epoch_s = last_elapsed(os.path.join(config.train.out_dir, "loss_log.txt"))
    peaks = done["peaks"]
    return {"epoch_s": round(epoch_s, 2), "peak_rss_bytes": peaks.get("VmHWM"), "peak_anon_bytes": peaks.get("RssAnon"),
            "peak_gpu_bytes": done["peak_gpu_bytes"], "streamed": "(features streamed)" in done["stderr"]}


def run(device, quick: bool, sizes=SIZES) -> dict:
    s = setting(device)
    sizes = sizes[:1] if quick else sizes
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        torch.manual_seed(0)
        encoder_path = os.path.join(tmp, f"{s['encoder']}.pth")
        atomic_save(getattr(torchvision.models, s["encoder"])(weights=None).state_dict(), encoder_path)
        for n in sizes:
            folder = os.path.join(tmp, str(n))
            os.makedirs(folder)
            start = time.perf_counter()
            paths, cache_dir = make_dataset(folder, n, s, encoder_path)
            written_s = time.perf_counter() - start
            encoder = EncoderCNN(s["encoder"], encoder_path, 256, spatial=True)
            start = time.perf_counter()
            store, ok = extract_features(encoder, paths, s["image_size"], cache_dir, torch.device("cpu"),
                                         Loading(workers=0))
            open_s = time.perf_counter() - start
            assert all(ok) and len(store) == n
            del store
            for decoder in s["decoders"]:
                for mode in s["modes"]:
                    figures = train_one_epoch(folder, cache_dir, s, encoder_path, decoder, mode, device)
                    results.append({"images": n, "captions": n * CAPTIONS_PER_IMAGE, "decoder": decoder,
                                    "cache_on_device": mode, "open_cache_s": round(open_s, 3),
                                    "cache_bytes": n * s["grid"][0] * s["grid"][1] * 2, "write_cache_s": round(written_s, 1),
                                    **figures})
                    print(f"scale: {results[-1]}", file=sys.stderr)
    return {"benchmark": "scale", "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "quick": quick, "encoder": s["encoder"], "image_size": s["image_size"], "grid": list(s["grid"]),
            "batch_size": s["batch_size"], "embed_size": s["embed_size"], "hidden_size": s["hidden_size"],
            "results": results,
            "notes": ["synthetic fp16 grids written into the cache format; no CNN runs",
                      "epoch_s: train.py's own elapsed time at the end of the epoch's last step",
                      "peak_anon_bytes excludes file pages (the mapped cache): it is what a whole-cache load grows",
                      ("CPU: ResNet-18 grids at 64 px and an LSTM of width 128 only; the full grid, full-size "
                       "decoders and attention are GPU figures"
                       if device.type != "cuda" else "GPU: ResNet-50 grids 7x7x2048, streamed and held on the device")]}


def print_table(result: dict) -> None:
    lines = [f"{'images':>8} {'decoder':<10} {'on device':<10} {'epoch s':>9} {'open s':>8} {'peak RSS':>10} "
             f"{'peak anon':>10} {'peak GPU':>10}"]
    gib = lambda b: f"{b / 2**30:.2f} GiB" if b else "-"     # noqa: E731
    for r in result["results"]:
        lines.append(f"{r['images']:>8} {r['decoder']:<10} {r['cache_on_device']:<10} {r['epoch_s']:>9.2f} "
                     f"{r['open_cache_s']:>8.2f} {gib(r['peak_rss_bytes']):>10} {gib(r['peak_anon_bytes']):>10} "
                     f"{gib(r['peak_gpu_bytes']):>10}")
    print(f"\n{result['device_name']} | {result['encoder']} grids {result['grid']} | batch {result['batch_size']}\n"
          + "\n".join(lines), file=sys.stderr)
