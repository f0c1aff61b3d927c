#!/usr/bin/env bash
# The GPU checks in one command, for a machine with one CUDA GPU (an H100/H200: about 8 minutes).
#
#     OUT=results bash benchmarks/gpu_check.sh                # every part
#     OUT=results bash benchmarks/gpu_check.sh tests scale    # only these parts
#
# Flickr8k under data/flickr8k (or FLICKR8K_DIR=...): Images/, captions.txt, Flickr_8k.trainImages.txt and
# Flickr_8k.devImages.txt; a slice of a few thousand images is enough. Each part writes its own log under
# $OUT, so one failing keeps the others:
#   tests.log     the tests that need CUDA (CUDA graphs against eager steps, bf16, the padded extraction
#                 batch), and the feature cache, streaming and self-critical tests, on the GPU machine
#   bench.log     python bench.py --device cuda: ours against the naive loop   (bench_gpu.json)
#   scale.log     python bench.py --scale --device cuda: ResNet-50 grids of 10k, 40k and 120k images,
#                 LSTM and attention, features on the GPU and streamed          (scale_gpu.json)
#   scst.log      one self-critical epoch of soft attention on Flickr8k's train split: its time per epoch,
#                 after a 1-epoch cross-entropy start (both timed from train.py's log)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-.}"
PYTHON="${PYTHON:-python3}"
F="${FLICKR8K_DIR:-data/flickr8k}"
export PYTHONUNBUFFERED=1 FLICKR8K_DIR="$F"
mkdir -p "$OUT"
PARTS=" ${*:-tests bench scale scst} "
part() { [[ "$PARTS" == *" $1 "* ]]; }
status=0
SECONDS=0
quiet() { grep -v "it/s\]\|image/s\]\|step/s\]\|s/it\]\|s/step\]\|batch/s\]"; }

if part tests; then
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
      "$PYTHON" -m pytest -q -rs tests/test_cuda_graphs.py tests/test_amp.py tests/test_features.py \
          tests/test_gpu_jpeg.py tests/test_train.py tests/test_scst.py; } > "$OUT/tests.log" 2>&1 || status=1
    tail -3 "$OUT/tests.log"; echo "[tests done at ${SECONDS} s]"
fi
if part bench; then
    "$PYTHON" bench.py --device cuda --data "$F" --out "$OUT/bench_gpu.json" 2>&1 | quiet > "$OUT/bench.log" || status=1
    tail -14 "$OUT/bench.log" | head -13; echo "[bench done at ${SECONDS} s]"
fi
if part scale; then
    "$PYTHON" bench.py --scale --device cuda --out "$OUT/scale_gpu.json" 2>&1 | quiet > "$OUT/scale.log" || status=1
    tail -9 "$OUT/scale.log" | head -8; echo "[scale done at ${SECONDS} s]"
fi
if part scst; then
    SETS="data.captions=$F/captions.txt data.images=$F/Images data.train_split=$F/Flickr_8k.trainImages.txt \
          data.val_split=$F/Flickr_8k.devImages.txt train.val_bleu_images=1000 train.cache_dir=$OUT/cache"
    { "$PYTHON" train.py --config configs/flickr8k_lite2_attention.yaml --set $SETS train.epochs=1 \
          train.out_dir="$OUT/ce" &&
      "$PYTHON" train.py --config configs/flickr8k_lite2_attention_scst.yaml --set $SETS train.epochs=1 \
          train.init_from="$OUT/ce/checkpoint_best.pth" train.out_dir="$OUT/scst"
      for run in ce scst; do
          echo "$run: first epoch $("$PYTHON" visualize_loss.py --log "$OUT/$run/loss_log.txt" --last-elapsed) s"
      done; } 2>&1 | quiet > "$OUT/scst.log" || status=1
    tail -4 "$OUT/scst.log"; echo "[scst done at ${SECONDS} s]"
fi
exit $status
