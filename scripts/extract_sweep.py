"""Feature extraction's settings on a GPU, swept: JPEG-decoding threads and batch size.

    python scripts/extract_sweep.py     # needs devdata/flickr8k/Images (see gpu_bench.sh); under a minute on an H200

Each setting runs extract_features as bench.py's extraction figure does (1,500 files cycled to 7,500, all in the
page cache, random ResNet-50 weights, bf16), after a warm-up pass. First, the ceiling: torchvision's GPU decoder
alone on JPEG bytes already in memory, in batches of 256, from one thread and from four. (Its run in
docs/gpu_bench_h200.log, run 3, also swept the file-reading threads of the extraction that came before.)
"""
import glob
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data.features as features  # noqa: E402
from models.encoder import EncoderCNN  # noqa: E402

device = torch.device("cuda")
paths = sorted(glob.glob("devdata/flickr8k/Images/*.jpg"))[:1500] * 5
blobs = [features._read_bytes(p) for p in paths[:1500]]
batches = [blobs[i:i + 256] for i in range(0, len(blobs), 256)] * 5


def seconds(run):
    torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def decode(batch):
    with torch.cuda.stream(torch.cuda.Stream()):
        images = features._decode_jpeg(batch, device)
        torch.cuda.current_stream().synchronize()
    return len(images)


seconds(lambda: [decode(b) for b in batches[:6]])
for threads in (1, 4):
    with ThreadPoolExecutor(threads) as pool:
        spent = seconds(lambda: list(pool.map(decode, batches)))
    print(f"decode_jpeg alone, bytes in memory, batches of 256, {threads} thread(s): {7500 / spent:.0f} images/s", flush=True)

encoder = EncoderCNN("resnet50", "none", 256, spatial=True).to(device).eval()
for decode_threads in (2, 4, 8):
    for batch in (256, 512):
        features.DECODE_THREADS = decode_threads

        def extract():
            features.extract_features(encoder, paths, 224, None, device, batch_size=batch)
        extract()
        print(f"extract_features: {decode_threads} decoding threads, batch {batch}: "
              f"{len(paths) / seconds(extract):.0f} images/s", flush=True)
