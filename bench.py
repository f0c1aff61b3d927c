"""Benchmark this project's pipeline against the classic captioning loop: same images, captions, model and device.

    python bench.py --quick --device cpu                       # under 2 minutes on a CPU
    python bench.py --device cuda --data data/flickr8k --out bench.json
    python bench.py --pretrained                               # the shipped model: cold start, photos/s
    python bench.py --pretrained --onnx DIR                    # it beside its ONNX export (export.py --onnx)
    python bench.py --scale [--quick] [--sizes 10000 40000]    # training on synthetic caches of 10k-120k images

Ours is the project's own code: data.features.cache.extract_features (on CUDA: JPEGs decoded on the
GPU, bf16, channels_last), training.steps' step on cached features kept on the device, a
`python train.py` process for end to end (the time it reports from its start to its last
checkpoint), and for inference extract_features then models.decoding.generate, as evaluate.py
does. Training batch: 512 on CUDA. Naive is the classic loop, in benchmarks/naive.py: PIL +
torchvision.transforms, DataLoader(num_workers=2), a fp32 ResNet-50 run on every batch, an LSTM
(Linear+BatchNorm head) trained on its output, no cache.

Data: --data DIR (a Flickr8k folder: captions.txt, Images/, Flickr_8k.trainImages.txt), else
$FLICKR8K_DIR, else data/flickr8k, else (or with --data generated) 500x375 JPEGs of the demo's
shapes. Encoder weights are random (ImageNet weights are a download): the speed is the same.
Prints a table on stderr and, as the last line of stdout, one JSON object (also written to
--out). Every ratio is "times better for ours" (>1: ours wins).
"""
import argparse
import json
import math
import os
import resource
import sys
import tempfile
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torchvision
from PIL import Image

from benchmarks import onnx_runtime, pretrained, scale
from benchmarks.naive import NaiveCaptioner, NaiveImages, naive_extract, naive_infer, naive_train, now
from benchmarks.train_process import run_train_py
from config import DEFAULTS, merge
from data.features.cache import CUDA_BATCH, Loading, extract_features
from data.prepare import encode_captions
from data.text.captions import read_captions, read_split_file
from data.text.vocab import Vocabulary
from models.caption_model import build_model
from models.checkpoint import PRETRAINED, load_checkpoint, load_model
from models.decoding import DecodeSettings, generate
from reports import speed_table
from training.cuda_graphs import graphed_step
from training.optimization import make_optimization
from training.steps import Batch, TrainingSetup, cross_entropy_step, epoch_order
from utils import REPO_ROOT, UserError, atomic_write_text, int_at_least, pick_device, run_main

FLICKR8K = os.path.join(REPO_ROOT, "data", "flickr8k")
EPOCH_CAPTIONS = 30_000       # Flickr8k's train split: 6,000 images x 5 captions
MAX_LEN = DEFAULTS.decode.max_len


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as f:   # Linux: restart this process's peak RSS (VmHWM)
            f.write("5")


def peak_memory(device) -> int:
    """Bytes: peak CUDA allocation; on CPU, this process's peak RSS since reset_peak (VmHWM; on other systems
    its peak since it started)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    if os.path.exists("/proc/self/status"):
        with open("/proc/self/status") as f:
            own = next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), own)
    return own


# ---- data ----------------------------------------------------------------------------------------

@dataclass
class BenchData:
    """The images both sides read: their folder, their captions file, their names, and where they came from."""
    images: str
    captions: str
    names: list[str]
    source: str


def find_data(args, tmp, n_images) -> BenchData:
    """Flickr8k's train split, or generated JPEGs."""
    folder = args.data or os.environ.get("FLICKR8K_DIR") or (FLICKR8K if os.path.isdir(FLICKR8K) else "generated")
    if folder == "generated":
        return make_jpegs(tmp, n_images)
    images, captions_path = os.path.join(folder, "Images"), os.path.join(folder, "captions.txt")
    if not os.path.isdir(images) or not os.path.isfile(captions_path):
        raise UserError(f"--data {folder}: expected {captions_path} and the folder {images}; "
                        f"or leave --data out to use generated images")
    captions, on_disk = read_captions(captions_path), set(os.listdir(images))
    split = os.path.join(folder, "Flickr_8k.trainImages.txt")
    names = read_split_file(split) if os.path.isfile(split) else sorted(captions)
    names = [n for n in names if n in captions and n in on_disk][:n_images]
    if not names:
        raise UserError(f"--data {folder}: no image of {split} is both in {images} and in {captions_path}")
    return BenchData(images, captions_path, names, f"flickr8k ({os.path.abspath(folder)})")


def make_jpegs(tmp, n) -> BenchData:
    """The demo's shape images, upscaled to Flickr8k's usual 500x375 and saved as JPEGs."""
    from data.demo import make_demo_dataset
    make_demo_dataset(os.path.join(tmp, "png"), os.path.join(tmp, "png.csv"), n_images=n)
    images = os.path.join(tmp, "Images")
    os.makedirs(images)
    captions = read_captions(os.path.join(tmp, "png.csv"))
    for name in captions:
        image = Image.open(os.path.join(tmp, "png", name)).resize((500, 375), resample=2)   # 2 = bilinear
        image.save(os.path.join(images, name[:-3] + "jpg"), quality=90)
    with open(os.path.join(tmp, "captions.csv"), "w", encoding="utf-8") as f:
        f.write("image,caption\n" + "".join(f"{n[:-3]}jpg,{c}\n" for n in captions for c in captions[n]))
    return BenchData(images, os.path.join(tmp, "captions.csv"), [n[:-3] + "jpg" for n in captions], "generated JPEGs")


def min_word_freq(names: list[str]) -> int:
    return 5 if len(names) >= 1000 else 1


def end_to_end_config(tmp, data: BenchData, size: int, decoder: str, epochs: int, batch_size: int, device):
    """The train.py config of the end-to-end figure, which ours_train_rate's steps run with too: these images for
    training, a fresh run and cache under tmp."""
    for split, listed in (("train", data.names), ("val", data.names[:1])):   # a val split: 1 image, already cached
        with open(os.path.join(tmp, f"{split}.txt"), "w") as f:
            f.write("\n".join(listed) + "\n")
    return merge(DEFAULTS, {
        "data": {"captions": data.captions, "images": data.images, "train_split": os.path.join(tmp, "train.txt"),
                 "val_split": os.path.join(tmp, "val.txt"), "min_word_freq": min_word_freq(data.names),
                 "image_size": size},
        "model": {"encoder": "resnet50", "encoder_weights": "none", "decoder": decoder},
        "train": {"epochs": epochs, "batch_size": batch_size, "lr": 1e-3, "out_dir": os.path.join(tmp, "run"),
                  "cache_dir": os.path.join(tmp, "cache"), "val_decoded_images": 0, "select_metric": "loss",
                  "device": str(device), "num_workers": 2, "log_every": 10 ** 9}}, "bench.py")


# ---- ours ----------------------------------------------------------------------------------------

def run_train(config, tmp, device):
    """train.py in a process of its own, as a user runs it: (the time it reports, the process's wall time,
    its peak memory: CPU resident memory, or the GPU memory it reports)."""
    done = run_train_py(config, os.path.join(tmp, "bench_config.yaml"))
    peak = (done["peak_gpu_bytes"] or 0) if device.type == "cuda" else done["peaks"].get("VmHWM", 0)
    return done["reported_s"], done["wall_s"], peak


def ours_train_rate(model, feats, rows, config, device, budget_s):
    """train.py's step on cached features, captions and order all on the device, over train.py's epoch order
    (cycled), until one 30,000-caption epoch or the time budget: (captions/s, whether the whole epoch ran).
    On one GPU the steps are CUDA graphs, as in train.py (train.cuda_graphs)."""
    tokens, lengths, image_index = rows
    inputs, tokens, image_index = feats.to(device), tokens.to(device), image_index.to(device)
    bs = config.train.batch_size
    setup = TrainingSetup(model, model, config, make_optimization(model, config, device), device)
    graphed = graphed_step(setup, inputs, image_index, tokens, lengths)
    # Warm-up: 3 steps, or with CUDA graphs a pass over the captions, which captures the graphs of its lengths
    # (train.py captures them in its first epoch: later epochs replay them)
    warmup = max(3, len(tokens) // bs) if graphed else 3
    passes = math.ceil((EPOCH_CAPTIONS + warmup * bs) / len(tokens))
    order = torch.cat([epoch_order(lengths, bs, seed, config.train.batch_by_length) for seed in range(passes)])
    order_on_device = order.to(device)
    model.train()
    done, step, start, running = 0, 0, None, 0.0
    while done < EPOCH_CAPTIONS and (start is None or now(device) - start < budget_s):
        if step == warmup:
            start, done = now(device), 0
        span = slice(step * bs, (step + 1) * bs)
        batch = Batch(order_on_device[span], lengths[order[span]], tokens, inputs, image_index)
        loss = cross_entropy_step(setup, batch, graphed)
        running = running + loss.detach()                             # train.py logs the mean every log_every steps
        done, step = done + bs, step + 1
    float(running)
    return done / (now(device) - start), done >= EPOCH_CAPTIONS


@torch.no_grad()
def ours_infer(model, vocab, paths, size, bs, beam, device):
    """As evaluate.py captions files: extract_features over them (on CUDA: JPEGs decoded on the GPU, the next
    batch decoded while the bf16 CNN runs this one), then decoding.generate in fp32 (under autocast its per-step
    weight casts cost more than they save) in batches of bs. Batch 1 is latency: one file at a time through both."""
    model.eval()
    group = 1 if bs == 1 else len(paths)
    start = now(device)
    for first in range(0, len(paths), group):
        feats, _ = extract_features(model.encoder, paths[first:first + group], size, None, device,
                                    Loading(bs, workers=0, desc="ours: infer"))
        for i in range(0, len(feats), bs):
            generate(model, feats[i:i + bs].to(device, non_blocking=True), vocab,
                     DecodeSettings(beam_size=beam, max_len=MAX_LEN))
    return len(paths) / (now(device) - start)


# ---- the run -------------------------------------------------------------------------------------

def infer_rates(infer, model, vocab, paths, size, batches, device):
    """{(batch, beam): images/s} for beams 1 and 3; on CUDA each after a one-image warm-up."""
    rates = {}
    for bs, n in batches:
        for beam in (1, 3):
            if device.type == "cuda":
                infer(model, vocab, paths[:1], size, 1, beam, device)
            rates[bs, beam] = infer(model, vocab, paths[:n], size, bs, beam, device)
    return rates


def figure(ours, naive, higher_is_better=True, **extra):
    ratio = ours / naive if higher_is_better else naive / ours
    return {"ours": round(ours, 4), "naive": round(naive, 4), "ratio": round(ratio, 3), **extra}


def run(args):
    device = pick_device(args.device)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        return measure(args, device, tmp)


def measure(args, device, tmp):
    """Both sides on the same images, captions, model and device -> the report bench.py prints and writes."""
    s = setting(args, device, tmp)
    print(f"bench: {len(s.paths)} images from {s.source}, {len(s.rows[0])} captions, {device}; ours first", file=sys.stderr)
    ours, model = measure_ours(s, device, tmp)
    print("bench: naive", file=sys.stderr)
    reset_peak(device)
    naive_extract_rate = naive_extract(NaiveCaptioner(len(s.vocab)).to(device), s.extraction_paths, s.size, s.bs, device)
    naive, naive_epochs, naive_e2e, naive_rate = naive_train(len(s.vocab), NaiveImages(s.paths, s.size, *s.rows),
                                                             s.bs, device, s.epochs, 0 if s.quick else 90, tmp)
    if args.decoder == "lstm":
        naive.copy_from(model)
    naive_infer_rates = infer_rates(naive_infer, naive, s.vocab, s.paths, s.size, s.batches, device)
    name = {1: "greedy", 3: "beam3"}
    figures = {
        "extraction_images_per_s": figure(ours["extract"], naive_extract_rate),
        "train_captions_per_s": figure(ours["rate"], naive_rate),
        "epoch_30k_captions_s": figure(EPOCH_CAPTIONS / ours["rate"], EPOCH_CAPTIONS / naive_rate, False,
                                       ours_extrapolated=not ours["full_epoch"], naive_extrapolated=True),
        "end_to_end_per_epoch_s": figure(ours["e2e"] / s.epochs, naive_e2e / naive_epochs, False, ours_epochs=s.epochs,
                                         naive_epochs=naive_epochs, ours_total_s=round(ours["e2e"], 3),
                                         ours_process_s=round(ours["e2e_process"], 3), naive_total_s=round(naive_e2e, 3)),
        **{f"infer_{name[k]}_bs{b}_images_per_s": figure(ours["infer"][b, k], naive_infer_rates[b, k])
           for b, k in ours["infer"]},
        "peak_memory_bytes": figure(ours["peak"], peak_memory(device), False,
                                    kind="torch.cuda.max_memory_allocated" if not s.cpu
                                    else "peak RSS of this process (reset per side), for ours also of its train.py "
                                         "process, whichever is larger; DataLoader workers not counted"),
    }
    return {
        "device": str(device), "device_name": "cpu" if s.cpu else torch.cuda.get_device_name(device),
        "torch": torch.__version__, "torchvision": torchvision.__version__, "python": sys.version.split()[0],
        "quick": s.quick, "data": s.source, "images": len(s.paths), "captions": len(s.rows[0]), "vocab": len(s.vocab),
        "decoder": args.decoder, "batch_size": s.bs, "image_size": s.size,
        "extraction_batch_size": s.extraction_batch, "extraction_images_read": len(s.extraction_paths),
        "inference_batches": [list(b) for b in s.batches],
        "figures": figures, "notes": notes(s, ours["full_epoch"], naive_epochs, args.decoder),
        "extrapolated": ["epoch_30k_captions_s.naive"] + ([] if ours["full_epoch"] else ["epoch_30k_captions_s.ours"]),
    }


def setting(args, device, tmp) -> SimpleNamespace:
    """What both sides measure on: the images (read once, so both find them in the page cache), their captions
    and vocabulary, batch sizes, the inference batches, and train.py's config for the end-to-end figure."""
    quick, cpu = args.quick, device.type == "cpu"
    n_images, epochs = args.images or (12 if quick and cpu else 256 if quick else 1500), args.epochs or (2 if quick else 10)
    bs, size = args.batch_size or (16 if quick and cpu else 64 if cpu else 512), args.image_size
    data = find_data(args, tmp, n_images)
    paths = [os.path.join(data.images, n) for n in data.names]
    for p in paths:                                  # warm the page cache, so neither side pays for the first read
        with open(p, "rb") as f:
            f.read()
    captions = read_captions(data.captions)
    vocab = Vocabulary.build((c for n in data.names for c in captions[n]), min_word_freq(data.names))
    n = len(paths)
    return SimpleNamespace(
        quick=quick, cpu=cpu, epochs=epochs, bs=bs, size=size, source=data.source, paths=paths, vocab=vocab,
        rows=encode_captions(data.names, captions, vocab, DEFAULTS.data.max_caption_len),
        batches=(((1, 2), (min(bs, n), min(bs, n))) if quick else ((1, 32), (64, min(256, n))) if cpu
                 else ((1, 32), (64, min(256, n)), (256, n))),
        # Extraction reads Flickr8k's 7,000 files' worth on a GPU (these files cycled: a second pass is no
        # cheaper, as every file is already in the page cache), so the figure is not a few batches' start-up.
        extraction_paths=paths * math.ceil(7000 / n) if not cpu and not quick else paths,
        extraction_batch=bs if cpu else CUDA_BATCH,
        config=end_to_end_config(tmp, data, size, args.decoder, epochs, bs, device))


def measure_ours(s, device, tmp) -> tuple[dict, torch.nn.Module]:
    """This pipeline's figures, and the model its end-to-end run trained (the naive side captions with it)."""
    reset_peak(device)
    model = build_model(s.config, len(s.vocab)).to(device)
    warm_up = s.paths[:2] if s.cpu else (s.paths * CUDA_BATCH)[:CUDA_BATCH]      # the bf16 path at the measured batch
    extract_features(model.encoder, warm_up, s.size, None, device, Loading(s.extraction_batch, workers=0, desc="warm-up"))
    start = now(device)
    feats, _ = extract_features(model.encoder, s.extraction_paths, s.size, None, device,
                                Loading(s.extraction_batch, workers=2, desc="ours: features"))
    extract = len(s.extraction_paths) / (now(device) - start)
    rate, full_epoch = ours_train_rate(model, feats[:len(s.paths)], s.rows, s.config, device, 5 if s.quick else 30)
    del model, feats
    e2e, e2e_process, train_peak = run_train(s.config, tmp, device)
    model, vocab, _ = load_model(load_checkpoint(os.path.join(s.config.train.out_dir, "checkpoint_best.pth")))
    infer = infer_rates(ours_infer, model.to(device), vocab, s.paths, s.size, s.batches, device)
    peak = max(peak_memory(device), train_peak)
    return ({"extract": extract, "rate": rate, "full_epoch": full_epoch, "e2e": e2e, "e2e_process": e2e_process,
             "infer": infer, "peak": peak}, model.cpu())


def notes(s, ours_full_epoch: bool, naive_epochs: int, decoder: str) -> list[str]:
    return [
        "ratio = times better for ours: rates ours/naive, times and memory naive/ours",
        "train_captions_per_s: ours = train.py's step (training.steps.cross_entropy_step; on one GPU CUDA graphs) "
        "on cached features, captions and order on the device, after 3 warm-up steps (with CUDA graphs a warm-up "
        "pass over the captions, which captures the graphs); naive = the classic loop's steps after its first, in its "
        "first epoch",
        f"extraction_images_per_s: both sides read {len(s.extraction_paths)} files"
        + (f" ({len(s.paths)} files cycled, all in the page cache)" if len(s.extraction_paths) > len(s.paths) else ""),
        f"epoch_30k_captions_s: ours {'measured, captions cycled' if ours_full_epoch else 'extrapolated'}; "
        "naive extrapolated",
        f"end_to_end_per_epoch_s: JPEGs to checkpoint; ours = a train.py process for {s.epochs} epochs (the time it "
        "reports from its start; ours_process_s adds Python's start-up and imports), naive measured for "
        f"{naive_epochs}; each side's wall time divided by its epochs" + (" (counts differ)" if naive_epochs != s.epochs else ""),
        "infer: image file to caption; ours as evaluate.py: extract_features over the files, then decoding.generate "
        "in batches (batch 1: one file at a time); " +
        ("both with ours' trained weights" if decoder == "lstm" else f"naive LSTM vs ours {decoder}"),
        "encoder weights are random (ImageNet weights are a download): the speed is the same",
    ]


def print_table(result):
    lines = [f"{'figure':<40}{'ours':>14}{'naive':>14}{'ratio':>9}"]
    for name, f in result["figures"].items():
        lines.append(f"{name:<40}{f['ours']:>14.4g}{f['naive']:>14.4g}{f['ratio']:>8.2f}x")
    print(f"\n{result['device_name']} | {result['images']} images, {result['captions']} captions | batch "
          f"{result['batch_size']}\n" + "\n".join(lines) + "\nextrapolated: " + ", ".join(result["extrapolated"]),
          file=sys.stderr)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="small sizes: under 2 minutes on a CPU")
    parser.add_argument("--scale", action="store_true", help="training on synthetic feature caches of growing size")
    parser.add_argument("--sizes", type=int_at_least(100), nargs="+",
                        help="with --scale: the dataset sizes in images (default 10000 40000 120000; --quick: the first)")
    parser.add_argument("--pretrained", action="store_true",
                        help="the shipped model: cold start to one caption, then photos/s at batch 16")
    parser.add_argument("--onnx", metavar="DIR", help="with --pretrained: PyTorch beside ONNX Runtime on the shipped "
                                                      "model's ONNX export DIR (CNN, decoder, whole, cold start)")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--speed-table", action="store_true",
                        help="print the README's speed table from the bench files it cites (docs/bench_*.json), "
                             "and measure nothing")
    parser.add_argument("--data", help="a Flickr8k folder, or 'generated' "
                                       "(default: $FLICKR8K_DIR, else data/flickr8k, else generated)")
    parser.add_argument("--images", type=int_at_least(1),
                        help="images used at most (default 1500; --quick: 12 on CPU, 256 on CUDA)")
    parser.add_argument("--epochs", type=int_at_least(1), help="end-to-end epochs (default 10; --quick: 2)")
    parser.add_argument("--decoder", default="lstm", choices=["lstm", "attention"])
    parser.add_argument("--batch-size", type=int_at_least(1),
                        help="training batch (default: 512 on CUDA, 64 on CPU, 16 with --quick on CPU)")
    parser.add_argument("--image-size", type=int_at_least(32), default=224, help="CNN input size (default 224)")
    args = parser.parse_args(argv)
    if args.speed_table:
        print(speed_table.markdown_table())
        return None
    if args.scale and args.pretrained:
        raise UserError("--scale and --pretrained are two benchmarks: run one at a time")
    if args.onnx and not args.pretrained:
        raise UserError("--onnx DIR compares the shipped model with its ONNX export DIR: add --pretrained")
    if args.onnx:
        result = onnx_runtime.run(args.onnx, PRETRAINED, args.data or os.environ.get("FLICKR8K_DIR") or FLICKR8K,
                                  16 if args.quick else pretrained.PHOTOS)
        onnx_runtime.print_table(result)
    elif args.scale:
        result = scale.run(pick_device(args.device), args.quick, args.sizes or scale.SIZES)
        scale.print_table(result)
    elif args.pretrained:
        result = pretrained.run(pick_device(args.device), args.data or os.environ.get("FLICKR8K_DIR") or FLICKR8K)
        pretrained.print_table(result)
    else:
        result = run(args)
        print_table(result)
    text = json.dumps(result)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    run_main(main)
