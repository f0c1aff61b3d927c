"""Export a training checkpoint as a small inference checkpoint: the form of the shipped model.

    python export.py runs/NAME/checkpoint_best.pth pretrained/flickr8k_attention_lite2.pth \\
        --scores runs/NAME/metrics_dev_beam3.json \\
        --verify-images data/flickr8k/Images --verify-split data/flickr8k/Flickr_8k.devImages.txt

The file holds the trained weights in half precision, the vocabulary, the config, the dev scores
(--scores: the JSON that evaluate.py --out wrote) and the command that trained the model; no
optimizer state. The frozen CNN's weights stay out when a package supplies them, and a hash of them
is recorded and checked at load time. With --verify-images, the greedy captions of the exported
model are compared with the training checkpoint's on those images before the file is written: at
least --min-agreement of them must be the same.
"""
import argparse
import hashlib
import io
import json
import os
import sys

import torch
from tqdm import tqdm

from data.captions import read_split_file
from data.features import extract_features
from data.images import list_images
from models.checkpoint import inference_checkpoint, is_inference, load_checkpoint, load_model
from models.decoding import generate
from utils import atomic_write, pick_device, run_main, warn

MAX_BYTES = 20 * 2**20        # the repository's limit for the shipped model


def same_greedy_captions(full, exported, paths, config, device, batch_size=64) -> tuple[int, int]:
    """(images whose greedy captions agree, images compared), on features the frozen CNN computes once."""
    (model_a, vocab), model_b = full[:2], exported[0]
    cache_dir = config["train"]["cache_dir"]
    features, _ = extract_features(model_a.encoder, paths, config["data"]["image_size"], cache_dir, device,
                                   batch_size, num_workers=0, desc="verify: features")
    same = 0
    for start in tqdm(range(0, len(features), batch_size), desc="verify: greedy captions", unit="batch"):
        batch = features[start:start + batch_size].to(device)
        with torch.no_grad():
            a = generate(model_a, model_a.encoder.tail(batch), vocab, beam_size=1, max_len=config["decode"]["max_len"])
            b = generate(model_b, model_b.encoder.tail(batch), vocab, beam_size=1, max_len=config["decode"]["max_len"])
        same += sum(x["tokens"] == y["tokens"] for x, y in zip(a, b))
    return same, len(features)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a training checkpoint (checkpoint_best.pth)")
    parser.add_argument("out", help="the inference checkpoint to write, e.g. pretrained/flickr8k_attention_lite2.pth")
    parser.add_argument("--scores", help="evaluate.py's --out JSON of this checkpoint (dev scores, beam 3)")
    parser.add_argument("--command", help="the command that trained it (default: the one the checkpoint records)")
    parser.add_argument("--verify-images", metavar="DIR", help="images to compare greedy captions on")
    parser.add_argument("--verify-split", metavar="FILE", help="names of --verify-images to use, one per line")
    parser.add_argument("--min-agreement", type=float, default=0.99, help="share of equal captions required (0.99)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    checkpoint = load_checkpoint(args.checkpoint)
    if is_inference(checkpoint):
        raise ValueError(f"{args.checkpoint} is already an exported checkpoint; export the training checkpoint")
    scores = None
    if args.scores:
        try:
            with open(args.scores, encoding="utf-8") as f:
                scores = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"--scores {args.scores}: not a readable JSON file ({e}); pass evaluate.py's --out") from None
    device = pick_device(args.device)
    full = load_model(checkpoint, args.checkpoint)
    exported = inference_checkpoint(checkpoint, full[0], scores, args.command)
    buffer = io.BytesIO()
    torch.save(exported, buffer)
    data = buffer.getvalue()
    if len(data) > MAX_BYTES:
        warn(f"the exported file is {len(data) / 2**20:.1f} MB, over the {MAX_BYTES // 2**20} MB the repository ships")
    # Loaded back as a user will load it: weights_only, the CNN from its package, the hash checked.
    again = load_model(torch.load(io.BytesIO(data), weights_only=True), args.out)
    if args.verify_images:
        paths = ([os.path.join(args.verify_images, n) for n in read_split_file(args.verify_split)]
                 if args.verify_split else list_images([args.verify_images]))
        full[0].to(device)
        again[0].to(device)
        same, total = same_greedy_captions(full, again, paths, full[2], device)
        print(f"greedy captions equal for {same} of {total} images ({100 * same / total:.1f}%)", file=sys.stderr)
        if same < args.min_agreement * total:
            raise ValueError(f"only {same} of {total} greedy captions agree (at least {args.min_agreement:.0%} "
                             f"required); {args.out} was not written")
    atomic_write(args.out, lambda f: f.write(data))
    print(f"{args.out}: {len(data) / 2**20:.1f} MB, sha256 {hashlib.sha256(data).hexdigest()}")


if __name__ == "__main__":
    run_main(main)
