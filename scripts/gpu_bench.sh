#!/usr/bin/env bash
# The GPU benchmark in one command, for a rented H100/H200 (about 3 minutes, 5 at most).
#
#     bash scripts/gpu_bench.sh        # writes $OUT/bench_gpu.json ($OUT defaults to ./)
#
# Expects devdata/flickr8k (git-ignored): about 1,500 Flickr8k JPEGs in Images/, captions.txt
# and Flickr_8k.trainImages.txt. Prints the versions, checks that GPU JPEG decoding gives the
# same pixels as PIL (why the feature cache key ignores the decode path), then runs bench.py.
# Needs only torch, torchvision, pyyaml, tqdm and pillow (no pycocoevalcap).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-.}"
PYTHON="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
if [ ! -d devdata/flickr8k/Images ]; then
    echo "error: devdata/flickr8k/Images is missing; copy ~1,500 Flickr8k JPEGs there" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PYTHON" - <<'PY'
import glob, sys
import torch, torchvision
import torch.nn.functional as F
print(f"python {sys.version.split()[0]} | torch {torch.__version__} (CUDA {torch.version.cuda}) | torchvision "
      f"{torchvision.__version__} | {torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device'}")
if torch.cuda.is_available():
    from data.dataset import ImageFiles
    from data.features import gpu_jpeg_available, jpeg_batches
    from models.encoder import EncoderCNN
    device = torch.device("cuda")
    print("JPEG decoding on the GPU:", gpu_jpeg_available(device))
    paths = sorted(glob.glob("devdata/flickr8k/Images/*.jpg"))[:64]
    if gpu_jpeg_available(device) and paths:
        images, good, _ = next(jpeg_batches(paths, 224, 64, 8, device))              # [n, 3, 224, 224] uint8
        pil = torch.stack([ImageFiles(paths, 224)[i][0] for i in good]).to(device)
        diff = (images.int() - pil.int()).abs()
        print(f"GPU decode+resize vs PIL, {len(good)} images: mean |diff| {diff.float().mean():.3f} grey levels, "
              f"max {diff.max().item()}, pixels off by more than 2: {(diff > 2).float().mean().item():.3%}")
        torch.manual_seed(0)
        encoder = EncoderCNN("resnet50", "none", 256, spatial=True).to(device).eval()
        with torch.no_grad():
            fp32 = encoder.extract(pil).flatten(1)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                gpu, bf16 = encoder.extract(images).float().flatten(1), encoder.extract(pil).float().flatten(1)
        cos = lambda a, b: F.cosine_similarity(a, b).min().item()  # noqa: E731
        print(f"feature cosine (min over images; random weights): GPU vs PIL decode, both bf16 {cos(gpu, bf16):.5f}; "
              f"bf16 vs fp32, both PIL {cos(bf16, fp32):.5f}")
PY
"$PYTHON" bench.py --device cuda --data devdata/flickr8k --out "$OUT/bench_gpu.json"
