#!/usr/bin/env bash
# The GPU benchmark in one command, for a rented H100/H200 (H200: about 3.5 minutes, 5 at most).
#
#     bash scripts/gpu_bench.sh        # writes $OUT/bench_gpu.json and $OUT/*.log ($OUT defaults to ./)
#
# Expects devdata/flickr8k (git-ignored): about 1,500 Flickr8k JPEGs in Images/, captions.txt
# and Flickr_8k.trainImages.txt. Six parts, each with its own log, so one failing keeps the others:
#   checks.log   versions; GPU JPEG decoding gives PIL's pixels (why the feature cache key ignores the
#                decode path); the pipelined extract_features (next batch decoded on a side stream)
#                gives the features of PIL images run one batch at a time
#   epochs.log   decoder training epoch over 30,000 captions: LSTM at batch 64/256/512, attention at 256/512
#                (and at 512 in fp32: launch-bound, it ran faster without autocast's casts); again with
#                train.batch_by_length (LSTM at 64/128/256/512), where a batch's steps run up to its longest caption only
#   profile.log  attention and LSTM at batch 512 by length: wall time per batch against the time its kernels
#                take on the GPU (the profiler's trace), and the costliest kernels: launch-bound or not
#   bench.log    python bench.py --device cuda (batch 512) against the naive loop
#   graph.log    attention at batch 512 by length with train.py's whole step captured as one CUDA graph per
#                batch length and replayed, against the same batches run eagerly: what graphs would give
#   e2e.log      where bench's end-to-end time (train.train, 1,500 images, 10 epochs) and its greedy
#                captioning time at batch 256 go, under cProfile
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
paths = sorted(glob.glob("devdata/flickr8k/Images/*.jpg"))[:1024]
images, good, _ = next(jpeg_batches(paths[:64], 224, 64, 8, device))                    # [n, 3, 224, 224] uint8
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

"$PYTHON" - > "$OUT/epochs.log" 2>&1 <<'PY' || status=1
import torch
import bench
from config import DEFAULTS, merge
from models import build_model
from scripts.gpu_bench_data import load
vocab, rows, features = load()
device = torch.device("cuda")
print(f"{len(rows[0])} captions of {len(features)} images, vocab {len(vocab)}; train.py's step, bf16 autocast unless fp32")
for decoder, batch, amp, by_length in (
        ("lstm", 64, True, False), ("lstm", 256, True, False), ("lstm", 512, True, False),
        ("attention", 256, True, False), ("attention", 512, True, False), ("attention", 512, False, False),
        ("lstm", 64, True, True), ("lstm", 128, True, True), ("lstm", 256, True, True), ("lstm", 512, True, True),
        ("attention", 256, True, True), ("attention", 512, True, True), ("attention", 512, False, True)):
    config = merge(DEFAULTS, {"model": {"encoder": "resnet50", "encoder_weights": "none", "decoder": decoder},
                              "train": {"batch_size": batch, "lr": 1e-3, "amp": amp, "batch_by_length": by_length}},
                   "gpu_bench.sh")
    model = build_model(config, len(vocab)).to(device)
    rate, whole = bench.ours_train_rate(model, features, rows, config, device, budget_s=20)
    print(f"{decoder:<9} batch {batch:>3}{'' if amp else ' fp32'}{' by length' if by_length else ''}: {rate:>8.0f} "
          f"captions/s, 30,000-caption epoch {30000 / rate:6.2f} s"
          f"{'' if whole else ' (extrapolated)'} | peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    del model
PY
cat "$OUT/epochs.log"; echo "[epochs done at ${SECONDS} s]"

"$PYTHON" - > "$OUT/profile.log" 2>&1 <<'PY' || status=1
# Is a decoder step bound by the GPU's arithmetic or by the CPU launching kernels? Train.py's step, batch 512
# by length, bf16: wall time per batch without the profiler, then the kernels the profiler's trace records.
import collections, json, os, tempfile, time
import torch
from torch.profiler import ProfilerActivity, profile
import train
from config import DEFAULTS, merge
from models import build_model
from scripts.gpu_bench_data import load
vocab, (tokens, lengths, image_index), features = load()
device = torch.device("cuda")
sync = torch.cuda.synchronize
features = features.to(device)
tokens_on_device, index_on_device = tokens.to(device), image_index.to(device)
WARMUP, STEPS, BATCH = 5, 10, 512
for decoder in ("attention", "lstm"):
    config = merge(DEFAULTS, {"model": {"encoder": "resnet50", "encoder_weights": "none", "decoder": decoder},
                              "train": {"batch_size": BATCH, "lr": 1e-3, "batch_by_length": True}}, "gpu_bench.sh")
    model = build_model(config, len(vocab)).to(device).train()
    amp, scaler = train.make_amp(device, True)
    params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("encoder.backbone")]
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)
    order = torch.cat([train.epoch_order(lengths, BATCH, seed, True) for seed in range(4)])   # 7,500 captions, cycled
    order_on_device = order.to(device)      # as in bench.py: a copy from pageable memory would wait for the GPU
    batches = [(order[i * BATCH:(i + 1) * BATCH], order_on_device[i * BATCH:(i + 1) * BATCH])
               for i in range(WARMUP + 2 * STEPS)]

    def run(rows_list):
        for rows, on_device in rows_list:
            loss, extra = train.batch_loss(model, features[index_on_device[on_device]], tokens_on_device[on_device],
                                           lengths[rows], config, amp)
            train.optimizer_step(optimizer, scaler, loss + extra, config["train"]["grad_clip"])
        sync()

    run(batches[:WARMUP])
    start = time.perf_counter()
    run(batches[WARMUP:WARMUP + STEPS])
    wall_ms = (time.perf_counter() - start) * 1000 / STEPS
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run(batches[WARMUP + STEPS:])
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(os.path.join(tmp, "trace.json"))
        with open(os.path.join(tmp, "trace.json")) as f:
            events = json.load(f)["traceEvents"]
    kernels = [e for e in events if e.get("cat") == "kernel"]
    if not kernels:
        print("no kernel events in the trace; its categories:", sorted({str(e.get("cat")) for e in events}))
    words = sum(int(lengths[rows].max()) - 1 for rows, _ in batches[WARMUP + STEPS:])   # teacher-forced time steps
    gpu_ms = sum(e["dur"] for e in kernels) / 1000 / STEPS
    print(f"{decoder} batch {BATCH} by length, bf16: {wall_ms:.1f} ms per batch wall (no profiler), {gpu_ms:.1f} ms "
          f"in kernels ({len(kernels) / STEPS:.0f} kernels per batch, {len(kernels) / words:.1f} per word); a "
          f"30,000-caption epoch: {30000 / BATCH * wall_ms / 1000:.2f} s wall, {30000 / BATCH * gpu_ms / 1000:.2f} s "
          f"of kernel time")
    by_name = collections.defaultdict(lambda: [0, 0.0])
    for e in kernels:
        by_name[e["name"]][0] += 1
        by_name[e["name"]][1] += e["dur"] / 1000 / STEPS
    for name, (count, ms) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:8]:
        print(f"    {ms:7.2f} ms/batch  {count / STEPS:6.0f} calls/batch  {name[:90]}")
    del model, optimizer
PY
cat "$OUT/profile.log"; echo "[profile done at ${SECONDS} s]"

"$PYTHON" bench.py --device cuda --data devdata/flickr8k --out "$OUT/bench_gpu.json" > "$OUT/bench.log" 2>&1 || status=1
grep -v "it/s\]\|image/s\]\|step/s\]\|s/it\]\|s/step\]\|s/image\]" "$OUT/bench.log" | tail -30
echo "[bench done at ${SECONDS} s]"

# A CUDA graph per caption length, measured before it is built into train.py: replays launch a whole step at once.
timeout 150 "$PYTHON" - > "$OUT/graph.log" 2>&1 <<'PY' || status=1
# Attention at batch 512 by length, bf16: train.py's step (forward, backward, clipping, AdamW) captured once per
# batch length T and replayed, against the same batches run eagerly. For timing only: the capture bakes in its
# batch's lengths (the attention regulariser's mask), which a real implementation would keep on the device.
import time
import torch
import train
from config import DEFAULTS, merge
from models import build_model
from scripts.gpu_bench_data import load
vocab, (tokens, lengths, image_index), features = load()
device = torch.device("cuda")
sync = torch.cuda.synchronize
features = features.to(device)
tokens_on_device, index_on_device = tokens.to(device), image_index.to(device)
BATCH = 512
config = merge(DEFAULTS, {"model": {"encoder": "resnet50", "encoder_weights": "none", "decoder": "attention"},
                          "train": {"batch_size": BATCH, "lr": 1e-3, "batch_by_length": True}}, "gpu_bench.sh")
model = build_model(config, len(vocab)).to(device).train()
params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("encoder.backbone")]
optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True, capturable=True)
amp = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)   # a graph cannot keep autocast's cache
batches = []                                        # full batches of 4 by-length epochs of the 7,500 captions
for seed in range(4):
    order = train.epoch_order(lengths, BATCH, seed, True)
    batches += [order[i:i + BATCH] for i in range(0, len(order) - BATCH + 1, BATCH)]
batch_T = [int(lengths[rows].max()) for rows in batches]
rows_on_device = [rows.to(device) for rows in batches]


def step(rows, rows_on_device):
    loss, extra = train.batch_loss(model, features[index_on_device[rows_on_device]], tokens_on_device[rows_on_device],
                                   lengths[rows], config, amp)
    train.optimizer_step(optimizer, None, loss + extra, config["train"]["grad_clip"])
    return loss


def epoch_seconds(run_batch):
    sync()
    start = time.perf_counter()
    for i in range(len(batches)):
        run_batch(i)
    sync()
    return (time.perf_counter() - start) * 30000 / (len(batches) * BATCH)


side = torch.cuda.Stream()                          # warm-up off the default stream, as torch.cuda.graph asks
side.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(side):
    for i in range(3):
        step(batches[i], rows_on_device[i])
torch.cuda.current_stream().wait_stream(side)
eager = [epoch_seconds(lambda i: step(batches[i], rows_on_device[i])) for _ in range(2)]
graphs, static_rows, losses = {}, {}, {}        # by batch length T


def capture(i, T):
    """Batch i's step as a CUDA graph that reads its caption rows from static_rows[T] -> the graph's replay."""
    static_rows[T] = rows_on_device[i].clone()
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    # relaxed: the model copies its mask from pinned memory, whose allocator queries events while capturing
    with torch.cuda.graph(graph, capture_error_mode="relaxed"):
        losses[T] = step(batches[i], static_rows[T])
    return graph.replay


start = time.perf_counter()
for i, T in enumerate(batch_T):
    if T not in graphs:
        graphs[T] = capture(i, T)
sync()
capture_s = time.perf_counter() - start


def replay(i):
    static_rows[batch_T[i]].copy_(rows_on_device[i])
    graphs[batch_T[i]]()
    return losses[batch_T[i]]


before = [replay(i).item() for i in range(5)]
graphed = [epoch_seconds(replay) for _ in range(2)]
after = [replay(i).item() for i in range(5)]
print(f"attention batch {BATCH} by length, bf16, {len(batches)} batches, T {min(batch_T)}..{max(batch_T)}: "
      f"30,000-caption epoch eager {eager[0]:.2f} / {eager[1]:.2f} s, CUDA graphs {graphed[0]:.2f} / "
      f"{graphed[1]:.2f} s ({len(graphs)} graphs captured in {capture_s:.1f} s; peak "
      f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB)")
print("replayed losses of the first 5 batches, before the timed epochs:", " ".join(f"{x:.3f}" for x in before),
      "| after them:", " ".join(f"{x:.3f}" for x in after))
PY
cat "$OUT/graph.log"; echo "[graph done at ${SECONDS} s]"

# Where bench's end-to-end time goes (JPEGs to a checkpoint, 10 epochs): train.train under cProfile.
timeout 120 "$PYTHON" - > "$OUT/e2e.log" 2>&1 <<'PY' || status=1
import argparse, cProfile, os, pstats, sys, tempfile, time
import torch
import bench
import train
from utils import load_checkpoint, load_model
# bench's own choice of images: the first 1,500 train-split files that are on disk and have captions
images, captions_path, names, _ = bench.find_data(argparse.Namespace(data="devdata/flickr8k"), None, 1500)
paths = [os.path.join(images, n) for n in names]
device = torch.device("cuda")
sync = torch.cuda.synchronize


def timed(what, run, profiled):
    """run() timed, under cProfile when profiled; prints its time and, when profiled, where it went."""
    profile = cProfile.Profile()
    sync()
    start = time.perf_counter()
    if profiled:
        profile.enable()
    run()
    sync()
    profile.disable()
    print(f"{what}{' (profiled)' if profiled else ''}: {time.perf_counter() - start:.2f} s", flush=True)
    if profiled:
        stats = pstats.Stats(profile, stream=sys.stdout).sort_stats("cumulative")
        stats.print_stats(os.getcwd(), 25)      # this project's functions
        stats.print_stats(20)                   # and everything, torch's included
        sys.stdout.flush()


for profiled in (False, True):                  # the first run warms up CUDA, cuDNN and the page cache
    with tempfile.TemporaryDirectory() as tmp:
        config = bench.end_to_end_config(tmp, images, captions_path, names, 5, 224, "lstm", 10, 512, device)
        timed(f"train.train, {len(names)} images, 10 epochs, batch 512", lambda: train.train(config), profiled)
        if profiled:                            # bench's greedy captioning figure at batch 256, the same way
            model, vocab, _ = load_model(load_checkpoint(os.path.join(tmp, "run", "checkpoint_best.pth")))
            model.to(device)
            for profile_it in (False, True):
                timed(f"bench.ours_infer, {len(paths)} JPEGs, greedy, batch 256",
                      lambda: bench.ours_infer(model, vocab, paths, 224, 256, 1, device), profile_it)
PY
grep -v "it/s\]\|image/s\]\|step/s\]\|s/it\]\|s/step\]\|s/image\]" "$OUT/e2e.log" | grep -v "^ *$" | head -120
echo "[e2e done at ${SECONDS} s]"
exit $status
