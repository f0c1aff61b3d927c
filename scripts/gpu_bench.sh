#!/usr/bin/env bash
# The GPU benchmark in one command, for a rented H100/H200 (H200: about 4.5 minutes, 5 at most).
#
#     bash scripts/gpu_bench.sh        # writes $OUT/bench_gpu.json and $OUT/*.log ($OUT defaults to ./)
#     bash scripts/gpu_bench.sh checks bench      # only these parts
#
# Expects devdata/flickr8k (git-ignored): about 1,500 Flickr8k JPEGs in Images/, captions.txt
# and Flickr_8k.trainImages.txt. Six parts, each with its own log, so one failing keeps the others:
#   checks.log   versions; GPU JPEG decoding gives PIL's pixels (why the feature cache key ignores the
#                decode path); the pipelined extract_features (next batch decoded on a side stream, a short
#                last batch padded) gives the features of PIL images run one batch at a time
#   graph.log    train.py's CUDA graphs (cuda_graphs.py) against eager steps, from the same weights over the
#                same batches (batch 512 by length, dropout off): losses step by step, fp32 and bf16, per decoder
#   epochs.log   decoder training epoch over 30,000 captions, as bench.py measures it (CUDA graphs unless
#                "eager"): LSTM at batch 64/256/512, attention at 256/512 (and 512 in fp32); again with
#                train.batch_by_length (LSTM at 64 to 512), where a batch's steps run up to its longest caption only
#   bench.log    python bench.py --device cuda (batch 512) against the naive loop
#   e2e.log      where bench's end-to-end time (train.train, 1,500 images, 10 epochs) goes, phase by phase, and
#                its greedy captioning time at batch 256: feature extraction against decoding
#   extract.log  feature extraction taken apart: JPEG reading and decoding alone, the bf16 CNN alone (with and
#                without cudnn.benchmark, batch 256 and 512), and the whole extract_features; writing a 200 MB
#                cache shard with and without fsync
# Needs only torch, torchvision, pyyaml, tqdm and pillow (no pycocoevalcap).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-.}"
PYTHON="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
if [ ! -d devdata/flickr8k/Images ]; then
    echo "error: devdata/flickr8k/Images is missing; copy ~1,500 Flickr8k JPEGs there" >&2
    exit 2
fi
mkdir -p "$OUT"
status=0
SECONDS=0
PARTS=" ${*:-checks graph epochs bench e2e extract} "
part() { [[ "$PARTS" == *" $1 "* ]]; }
if part checks; then
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PYTHON" - <<'PY'
import glob, sys
import torch, torchvision
import torch.nn.functional as F
print(f"python {sys.version.split()[0]} | torch {torch.__version__} (CUDA {torch.version.cuda}) | torchvision "
      f"{torchvision.__version__} | {torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device'}")
from data.dataset import ImageFiles
from data.features import extract_features, gpu_jpeg_available, jpeg_batches
from models.encoder import EncoderCNN
device = torch.device("cuda")
print("JPEG decoding on the GPU:", gpu_jpeg_available(device))
paths = sorted(glob.glob("devdata/flickr8k/Images/*.jpg"))[:1100]      # the last batch (76) runs padded to 256
images, good, _ = next(jpeg_batches(paths[:64], 224, 64, device))                    # [n, 3, 224, 224] uint8
pil = torch.stack([ImageFiles(paths, 224)[i][0] for i in good]).to(device)
diff = (images.int() - pil.int()).abs()
print(f"GPU decode+resize vs PIL, {len(good)} images: mean |diff| {diff.float().mean():.3f} grey levels, "
      f"max {diff.max().item()}, pixels off by more than 2: {(diff > 2).float().mean().item():.3%}")
torch.manual_seed(0)
encoder = EncoderCNN("resnet50", "none", 256, spatial=True).to(device).eval()
cos = lambda a, b: F.cosine_similarity(a.float().flatten(1), b.float().flatten(1)).min().item()  # noqa: E731
with torch.no_grad():
    fp32 = encoder.extract(pil)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        gpu, bf16 = encoder.extract(images), encoder.extract(pil)
    print(f"feature cosine (min over images; random weights): GPU vs PIL decode, both bf16 {cos(gpu, bf16):.5f}; "
          f"bf16 vs fp32, both PIL {cos(bf16, fp32):.5f}")
    piped, ok = extract_features(encoder, paths, 224, None, device, batch_size=256, num_workers=2, desc="pipelined")
    reference = []
    for first in range(0, len(paths), 256):
        batch = torch.stack([ImageFiles(paths, 224)[i][0] for i in range(first, min(first + 256, len(paths)))])
        with torch.autocast("cuda", dtype=torch.bfloat16):
            reference.append(encoder.extract(batch.to(device)).half().cpu())
    print(f"pipelined extract_features vs PIL one batch at a time, {len(paths)} images (all read: {all(ok)}): "
          f"min feature cosine {cos(piped, torch.cat(reference)):.5f}")
PY
} > "$OUT/checks.log" 2>&1 || status=1
cat "$OUT/checks.log"; echo "[checks done at ${SECONDS} s]"
fi

if part graph; then
timeout 120 "$PYTHON" - > "$OUT/graph.log" 2>&1 <<'PY' || status=1
# The same weights, batches and learning rate, stepped eagerly and through GraphedStep: the losses must agree up to
# the arithmetic's noise (fp32: summation order; bf16: also rounding, which training amplifies step by step).
import copy
import torch
import train
from config import DEFAULTS, merge
from cuda_graphs import graphed_step
from models import build_model
from scripts.gpu_bench_data import load
vocab, (tokens, lengths, image_index), features = load()
device = torch.device("cuda")
features, tokens_on_device, index_on_device = features.to(device), tokens.to(device), image_index.to(device)
BATCH, STEPS = 512, 30
for decoder in ("lstm", "attention", "transformer"):
    for amp_on in (False, True):
        config = merge(DEFAULTS, {"model": {"encoder": "resnet50", "encoder_weights": "none", "decoder": decoder,
                                            "dropout": 0.0},
                                  "train": {"batch_size": BATCH, "lr": 1e-3, "amp": amp_on, "batch_by_length": True}},
                       "gpu_bench.sh")
        torch.manual_seed(0)
        with torch.device(device):
            first = build_model(config, len(vocab)).train()
        order = train.epoch_order(lengths, BATCH, 0, True)
        order = torch.cat([order, train.epoch_order(lengths, BATCH, 1, True)])
        losses = {}
        for graphs in (False, True):
            model = copy.deepcopy(first)
            params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("encoder.backbone")]
            optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)
            amp, scaler = train.make_amp(device, amp_on)
            graphed = graphed_step(model, params, features, index_on_device, tokens_on_device, lengths, config, 1,
                                   scaler) if graphs else None
            out = []
            for b in range(min(STEPS, len(order) // BATCH)):       # two epochs' orders hold 29 full batches
                rows = order[b * BATCH:(b + 1) * BATCH]
                loss = train.training_step(model, optimizer, scaler, graphed, rows.to(device), lengths[rows], features,
                                           index_on_device, tokens_on_device, config, amp)
                out.append(loss.float().item())
            losses[graphs] = torch.tensor(out)
            if graphs:
                print(f"{decoder} {'bf16' if amp_on else 'fp32'}: {len(graphed.graphs)} graphs (lengths "
                      f"{sorted(graphed.graphs)}), capture failed: {graphed.failed}")
        eager, graphed_losses = losses[False], losses[True]
        relative = ((graphed_losses - eager).abs() / eager.abs()).max().item()
        print(f"    {len(eager)} steps, max relative loss difference {relative:.2e}; eager first/last "
              f"{eager[0]:.4f}/{eager[-1]:.4f}, graphs {graphed_losses[0]:.4f}/{graphed_losses[-1]:.4f}")
        print("    eager :", " ".join(f"{x:.4f}" for x in eager[::3].tolist()))
        print("    graphs:", " ".join(f"{x:.4f}" for x in graphed_losses[::3].tolist()))
        del first
PY
cat "$OUT/graph.log"; echo "[graph done at ${SECONDS} s]"
fi

if part epochs; then
timeout 150 "$PYTHON" - > "$OUT/epochs.log" 2>&1 <<'PY' || status=1
import torch
import bench
from config import DEFAULTS, merge
from models import build_model
from scripts.gpu_bench_data import load
vocab, rows, features = load()
device = torch.device("cuda")
print(f"{len(rows[0])} captions of {len(features)} images, vocab {len(vocab)}; bench.py's step, bf16 autocast unless "
      f"fp32, CUDA graphs unless eager")
for decoder, batch, amp, by_length, graphs in (
        ("lstm", 64, True, False, True), ("lstm", 256, True, False, True), ("lstm", 512, True, False, True),
        ("lstm", 512, True, False, False), ("attention", 256, True, False, True), ("attention", 512, True, False, True),
        ("attention", 512, False, False, True),
        ("lstm", 64, True, True, True), ("lstm", 128, True, True, True), ("lstm", 256, True, True, True),
        ("lstm", 512, True, True, True), ("lstm", 512, True, True, False),
        ("attention", 256, True, True, True), ("attention", 512, True, True, True), ("attention", 512, False, True, True),
        ("attention", 512, True, True, False), ("transformer", 512, True, True, True),
        ("transformer", 512, True, True, False)):
    config = merge(DEFAULTS, {"model": {"encoder": "resnet50", "encoder_weights": "none", "decoder": decoder},
                              "train": {"batch_size": batch, "lr": 1e-3, "amp": amp, "batch_by_length": by_length,
                                        "cuda_graphs": graphs}}, "gpu_bench.sh")
    model = build_model(config, len(vocab)).to(device)
    torch.cuda.reset_peak_memory_stats()
    rate, whole = bench.ours_train_rate(model, features, rows, config, device, budget_s=20)
    print(f"{decoder:<11} batch {batch:>3}{'' if amp else ' fp32'}{' by length' if by_length else ''}"
          f"{'' if graphs else ' eager'}: {rate:>8.0f} captions/s, 30,000-caption epoch {30000 / rate:6.2f} s"
          f"{'' if whole else ' (extrapolated)'} | peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    del model
PY
cat "$OUT/epochs.log"; echo "[epochs done at ${SECONDS} s]"
fi

if part bench; then
timeout 240 "$PYTHON" bench.py --device cuda --data devdata/flickr8k --out "$OUT/bench_gpu.json" > "$OUT/bench.log" 2>&1 || status=1
grep -v "it/s\]\|image/s\]\|step/s\]\|s/it\]\|s/step\]\|s/image\]" "$OUT/bench.log" | tail -16
echo "[bench done at ${SECONDS} s]"
fi

# Where bench's end-to-end time goes (JPEGs to a checkpoint, 10 epochs): train.train's phases, timed on the
# main thread (the steps are asynchronous: their GPU time shows up where the CPU next waits for it).
if part e2e; then
timeout 90 "$PYTHON" - > "$OUT/e2e.log" 2>&1 <<'PY' || status=1
import argparse, collections, functools, os, tempfile, time
import torch
import bench
import data.prepare
import train
import utils
from data.features import extract_features
from decoding import generate
from utils import load_checkpoint, load_model
images, captions_path, names, _ = bench.find_data(argparse.Namespace(data="devdata/flickr8k"), None, 1500)
paths = [os.path.join(images, n) for n in names]
device = torch.device("cuda")
spent = collections.defaultdict(float)


def timed(module, name, label):
    real = getattr(module, name)

    @functools.wraps(real)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            spent[label] += time.perf_counter() - start
    setattr(module, name, wrapper)


for module, name, label in ((train, "load_splits", "read captions, list images"),
                            (train, "build_model", "build the model"),
                            (data.prepare, "extract_features", "extract features (1,500 JPEGs)"),
                            (train, "prepare_splits", "prepare splits (features included)"),
                            (train, "graphed_step", "set up CUDA graphs"),
                            (train, "training_step", "training steps (launch, captures)"),
                            (train, "end_of_epoch", "validate, snapshot checkpoints"),
                            (utils.CheckpointWriter, "finish", "wait for checkpoint writes"),
                            (train, "wait_for_cache_writes", "wait for feature cache writes")):
    timed(module, name, label)
for attempt in ("warm-up", "timed"):            # the first run warms up CUDA, cuDNN and the page cache
    spent.clear()
    with tempfile.TemporaryDirectory() as tmp:
        config = bench.end_to_end_config(tmp, images, captions_path, names, 5, 224, "lstm", 10, 512, device)
        torch.cuda.synchronize()
        start = time.perf_counter()
        train.train(config)
        torch.cuda.synchronize()
        total = time.perf_counter() - start
        print(f"{attempt}: train.train, {len(names)} images, 10 epochs, batch 512: {total:.2f} s")
        if attempt == "timed":
            for label, seconds in spent.items():
                print(f"    {seconds:6.3f} s  {label}")
            model, vocab, _ = load_model(load_checkpoint(os.path.join(tmp, "run", "checkpoint_best.pth")))
            model.to(device).eval()
            with torch.no_grad():
                for _ in range(2):
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    feats, _ = extract_features(model.encoder, paths, 224, None, device, batch_size=256, num_workers=0)
                    torch.cuda.synchronize()
                    middle = time.perf_counter()
                    for i in range(0, len(feats), 256):
                        generate(model, feats[i:i + 256].to(device, non_blocking=True), vocab, beam_size=1, max_len=bench.MAX_LEN)
                    torch.cuda.synchronize()
                    end = time.perf_counter()
                    print(f"greedy captioning of {len(paths)} JPEGs at batch 256 (bench.ours_infer's steps): features "
                          f"{middle - start:.3f} s, decoding {end - middle:.3f} s: {len(paths) / (end - start):.0f} images/s")
PY
grep -v "it/s\]\|image/s\]\|step/s\]\|s/it\]\|s/step\]\|s/image\]" "$OUT/e2e.log" | grep -v "^ *$" | grep -v "^epoch \|^done:\|^device "
echo "[e2e done at ${SECONDS} s]"
fi

# Feature extraction taken apart: where do its images/s go?
if part extract; then
timeout 90 "$PYTHON" - > "$OUT/extract.log" 2>&1 <<'PY' || status=1
import glob, os, tempfile, time
import torch
from data.features import extract_features, jpeg_batches
from models.encoder import EncoderCNN
from utils import atomic_save
device = torch.device("cuda")
paths = sorted(glob.glob("devdata/flickr8k/Images/*.jpg"))[:1500] * 3
sync = torch.cuda.synchronize


def rate(run, n):
    run()                                       # warm-up
    sync()
    start = time.perf_counter()
    run()
    sync()
    return n / (time.perf_counter() - start)


decode = lambda: [images.sum() for images, _, _ in jpeg_batches(paths, 224, 256, device)]  # noqa: E731
print(f"read + GPU decode only (jpeg_batches, batch 256), {len(paths)} files: "
      f"{rate(decode, len(paths)):.0f} images/s")
encoder = EncoderCNN("resnet50", "none", 256, spatial=True).to(device).eval()
for benchmark in (False, True):
    torch.backends.cudnn.benchmark = benchmark
    for batch in (256, 512):
        x = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8, device=device)

        def cnn():
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                for _ in range(10):
                    encoder.extract(x).half()
        print(f"bf16 ResNet-50 alone (encoder.extract, uint8 input on the GPU), batch {batch}, cudnn.benchmark "
              f"{benchmark}: {rate(cnn, 10 * batch):.0f} images/s")
torch.backends.cudnn.benchmark = False
whole = lambda: extract_features(encoder, paths, 224, None, device, batch_size=256, num_workers=2)  # noqa: E731
print(f"extract_features, batch 256, {len(paths)} files: {rate(whole, len(paths)):.0f} images/s")
shard = torch.randn(1024, 49, 2048).half()
with tempfile.TemporaryDirectory() as tmp:       # where bench.py writes its run
    for durable in (True, False, True, False):
        start = time.perf_counter()
        atomic_save({"files": [], "features": shard}, os.path.join(tmp, f"shard{durable}.pt"), durable=durable)
        print(f"atomic_save of a 200 MB shard, fsync {durable}: {time.perf_counter() - start:.3f} s")
PY
grep -v "it/s\]\|image/s\]\|step/s\]\|s/it\]\|s/step\]\|s/image\]" "$OUT/extract.log"
echo "[extract done at ${SECONDS} s]"
fi
exit $status
