"""A/B on the GPU: extract_features with per-file reading tasks (data/features.py of 25ab99b) against one task per
batch (this tree), 2/3/4 decoding threads, as bench.py's extraction figure measures it; two alternating rounds.

    git show 25ab99b:data/features.py > devdata/features_before.py
    OUT=. python3 scripts/extract_ab.py       # writes $OUT/best.txt: the fastest DECODE_THREADS of this tree

Needs devdata/flickr8k/Images (see gpu_bench.sh). Its run on an H200 is in docs/gpu_bench_h200.log (run 4).
"""
import glob, importlib.util, os, sys, time
import torch
sys.path.insert(0, ".")
import data.features as after
spec = importlib.util.spec_from_file_location("features_before", "devdata/features_before.py")
before = importlib.util.module_from_spec(spec)
spec.loader.exec_module(before)
from models.encoder import EncoderCNN
device = torch.device("cuda")
paths = sorted(glob.glob("devdata/flickr8k/Images/*.jpg"))[:1500] * 5
encoder = EncoderCNN("resnet50", "none", 256, spatial=True).to(device).eval()


def rate(module, threads):
    module.DECODE_THREADS = threads
    run = lambda: module.extract_features(encoder, paths, 224, None, device, batch_size=256, num_workers=2)  # noqa
    run()
    torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    torch.cuda.synchronize()
    return len(paths) / (time.perf_counter() - start)


results = {}
for round_ in range(2):
    for name, module, threads in (("before", before, 2), ("after", after, 2), ("after", after, 3), ("after", after, 4)):
        r = rate(module, threads)
        results.setdefault((name, threads), []).append(r)
        print(f"round {round_ + 1}: {name}, {threads} decoding threads: {r:.0f} images/s", flush=True)
best = max((t for n, t in results if n == "after"), key=lambda t: min(results["after", t]))
print("best of after:", best, [round(x) for x in results["after", best]], flush=True)
with open(os.path.join(os.environ["OUT"], "best.txt"), "w") as f:
    f.write(str(best))
