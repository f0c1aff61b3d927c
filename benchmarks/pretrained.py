"""bench.py --pretrained: how fast the shipped model captions photos, as a user meets it.

- cold_start_s: `python inference_visualize.py --images ONE_PHOTO` in a new process, start to exit:
  Python and torch starting, the model loaded (its CNN from its package, hash-checked), one photo
  captioned with the default beam, and the gallery written
- load_s: loading the shipped model in a running process
- photos_per_s: photos read, resized, through the CNN and the model's default decoding, at batch 16, in a running
  process; plain_beam_photos_per_s and consensus_photos_per_s: the same with the beam alone, and with consensus
  re-ranking of the beam and decode.rerank_samples (else CONSENSUS_SAMPLES) samples
- command_photos_per_s: the whole command on PHOTOS photos at --batch-size 16 (gallery included),
  divided by its wall time, start-up included

Photos: the first dev images of a Flickr8k folder (--data, $FLICKR8K_DIR or data/flickr8k), else
generated 500x375 JPEGs.
"""
import os
import subprocess
import sys
import tempfile
import time

import torch
from PIL import Image

from data.images.reading import image_loader, input_size
from data.text.captions import read_split_file
from models.checkpoint import PRETRAINED, RERANK_FREQUENCIES, load_model, load_shipped
from models.decoding import decode_settings, describe_decoding, generate
from models.rerank_frequencies import with_rerank_cider
from utils import REPO_ROOT

PHOTOS = 64
BATCH = 16
CONSENSUS_SAMPLES = 20     # the consensus figure, for a model whose own decoding does not re-rank


def photos(folder: str | None, tmp: str) -> tuple[list[str], str]:
    dev = os.path.join(folder or "", "Flickr_8k.devImages.txt")
    if folder and os.path.isfile(dev):
        return [os.path.join(folder, "Images", n) for n in read_split_file(dev)[:PHOTOS]], "flickr8k dev"
    made = []
    for i in range(PHOTOS):
        path = os.path.join(tmp, f"photo_{i:02d}.jpg")
        Image.effect_noise((500, 375), 40 + i).convert("RGB").save(path, quality=90)
        made.append(path)
    return made, "generated JPEGs"


def command(args: list[str], out: str) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "inference_visualize.py"), *args, "--out", out],
                          cwd=REPO_ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"inference_visualize.py failed: {done.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - start


@torch.no_grad()
def run(device, data: str | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-pretrained-") as tmp:
        paths, source = photos(data, tmp)
        folder = os.path.join(tmp, "few")
        os.makedirs(folder)
        for p in paths:
            os.symlink(os.path.abspath(p), os.path.join(folder, os.path.basename(p)))
        cold = command(["--images", paths[0]], os.path.join(tmp, "out1"))
        whole = command(["--images", folder, "--batch-size", str(BATCH)], os.path.join(tmp, "out64"))
        start = time.perf_counter()
        checkpoint = load_shipped()
        model, vocab, config = load_model(checkpoint, PRETRAINED)
        model.to(device)
        load_s = time.perf_counter() - start
        size = input_size(config.model.encoder, config.data.image_size)
        decode = decode_settings(config.decode)      # what inference_visualize.py and the web demo use
        plain = decode_settings(config.decode, rerank_samples=0)
        consensus = decode_settings(config.decode, rerank_samples=decode.rerank_samples or CONSENSUS_SAMPLES)
        consensus = with_rerank_cider(consensus, checkpoint, PRETRAINED) if RERANK_FREQUENCIES in checkpoint else None

        def rate(settings) -> float:
            def caption_all(files):
                for images, _, _ in image_loader(files, size, BATCH, num_workers=0):
                    generate(model, model.encoder.extract(images.to(device)), vocab, settings)
            caption_all(paths[:BATCH])                              # warm-up: the first batch's allocations
            start = time.perf_counter()
            caption_all(paths)
            return len(paths) / (time.perf_counter() - start)
        plain_rate = rate(plain)
        consensus_rate = rate(consensus) if consensus else None
        default_rate = consensus_rate if decode.rerank_samples else plain_rate
    return {"benchmark": "pretrained", "device": str(device), "model": os.path.relpath(PRETRAINED, REPO_ROOT),
            "photos": len(paths), "source": source, "beam_size": decode.beam_size, "batch_size": BATCH,
            "decoding": describe_decoding(decode), "threads": torch.get_num_threads(), "cold_start_s": round(cold, 2),
            "load_s": round(load_s, 2), "photos_per_s": round(default_rate, 2),
            "plain_beam_photos_per_s": round(plain_rate, 2),
            "consensus_photos_per_s": round(consensus_rate, 2) if consensus_rate else None,
            "consensus_samples": consensus.rerank_samples if consensus else None,
            "command_photos_per_s": round(len(paths) / whole, 2)}


def print_table(result: dict) -> None:
    print(f"\nshipped model {result['model']} on {result['device']} ({result['threads']} threads), "
          f"{result['photos']} {result['source']} photos, beam {result['beam_size']}, batch {result['batch_size']}:\n"
          f"  cold start, one photo (a new process): {result['cold_start_s']:.2f} s\n"
          f"  loading the model:                     {result['load_s']:.2f} s\n"
          f"  captioning ({result['decoding']}): {result['photos_per_s']:.1f} photos/s\n"
          f"  with the beam alone:                   {result['plain_beam_photos_per_s']:.1f} photos/s\n"
          f"  with consensus re-ranking ({result['consensus_samples']} samples): {result['consensus_photos_per_s']} photos/s\n"
          f"  the whole command on {result['photos']} photos:        {result['command_photos_per_s']:.1f} photos/s",
          file=sys.stderr)
