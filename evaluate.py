"""Score a checkpoint on a split with real decoding (never teacher forcing).

    python evaluate.py --checkpoint runs/demo/checkpoint_best.pth --captions captions.csv --images demo_images
    python evaluate.py --checkpoint CKPT --captions ../shared/flickr8k/captions.txt --images ../shared/flickr8k/Images \\
        --split-file ../shared/flickr8k/Flickr_8k.devImages.txt --beam-size 3 --out runs/x/metrics.json

Generates a caption for every image of the split (greedy, or beam search with
--beam-size K) and scores them against all reference captions with the coco-caption
toolkit: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D. Prints the metrics as one JSON object on
the last line of stdout. With --out, writes that object to the file, and beside it
<stem>_captions.json (image, caption, references, per-image scores), which grows as
captions are produced, so an interrupted run keeps what it generated.
"""
import argparse
import json
import os
import sys

import torch
from tqdm import tqdm

from data.dataset import image_loader, read_captions, read_split_file, warn
from decoding import generate
from metrics import score_captions
from models.encoder import input_size
from utils import load_checkpoint, load_model, pick_device, run_main


def write_json(obj, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
    os.replace(tmp, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--captions", required=True, help="captions file (image,caption CSV or Flickr8k.token.txt)")
    parser.add_argument("--images", required=True, help="image folder")
    parser.add_argument("--split-file", help="image names to evaluate, one per line (default: every captioned image)")
    parser.add_argument("--beam-size", type=int, default=1, help="1 = greedy (default)")
    parser.add_argument("--max-len", type=int, default=None, help="maximum caption length (default: the checkpoint's)")
    parser.add_argument("--out", help="write the metrics JSON here, and <stem>_captions.json beside it")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    if args.beam_size < 1:
        raise ValueError("--beam-size must be at least 1")

    device = pick_device(args.device)
    model, vocab, config = load_model(load_checkpoint(args.checkpoint), args.checkpoint)
    model.to(device)
    references = read_captions(args.captions)
    names = read_split_file(args.split_file) if args.split_file else list(references)
    not_captioned = [n for n in names if n not in references]
    missing = [n for n in names if n in references and not os.path.isfile(os.path.join(args.images, n))]
    if not_captioned:
        warn(f"{len(not_captioned)} images of {args.split_file} have no caption in {args.captions} (e.g. {not_captioned[0]}); skipped")
    if missing:
        warn(f"{len(missing)} images are not in {args.images} (e.g. {missing[0]}); skipped")
    names = [n for n in names if n in references and n not in missing]
    if not names:
        raise ValueError(f"nothing to evaluate: no image of {args.split_file or args.captions} is both captioned in "
                         f"{args.captions} and present in {args.images}")

    captions_path = None
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        captions_path = os.path.splitext(args.out)[0] + "_captions.json"
    produced, unreadable = [], 0
    size = input_size(config["model"]["encoder"], config["data"]["image_size"])
    max_len = args.max_len or config["decode"]["max_len"]
    loader = image_loader([os.path.join(args.images, n) for n in names], size, args.batch_size, args.num_workers)
    for images, good, bad in tqdm(loader, desc=f"captioning (beam {args.beam_size})", unit="batch", file=sys.stderr):
        unreadable += len(bad)
        if images is None:
            continue
        with torch.no_grad():
            results = generate(model, model.encoder.extract(images.to(device)), vocab, args.beam_size, max_len,
                               config["decode"]["length_penalty"])
        produced += [{"image": names[i], "caption": r["caption"], "references": references[names[i]]}
                     for i, r in zip(good, results)]
        if captions_path:
            write_json(produced, captions_path)
    if not produced:
        raise ValueError(f"none of the {len(names)} images could be read")
    empty = sum(1 for p in produced if not p["caption"])
    if empty:
        warn(f"{empty} generated captions are empty (the model said <end> first); they score 0")
    metrics, per_image, notes = score_captions({p["image"]: p["caption"] for p in produced},
                                               {p["image"]: p["references"] for p in produced})
    for note in notes:
        warn(note)
    result = {**{k: (round(v, 4) if v is not None else None) for k, v in metrics.items()}, "n_images": len(produced),
              "beam_size": args.beam_size, "n_empty_captions": empty,
              "n_skipped": len(not_captioned) + len(missing) + unreadable}
    if args.out:
        for p in produced:
            p["scores"] = per_image[p["image"]]
        write_json(produced, captions_path)
        write_json(result, args.out)
    print(json.dumps(result))


if __name__ == "__main__":
    run_main(main)
