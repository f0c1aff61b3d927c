"""Score a checkpoint on a split with real decoding (never teacher forcing).

    python evaluate.py --checkpoint runs/demo/checkpoint_best.pth --split val --beam-size 3
    python evaluate.py --checkpoint CKPT --captions ../shared/flickr8k/captions.txt --images ../shared/flickr8k/Images \\
        --split-file ../shared/flickr8k/Flickr_8k.devImages.txt --beam-size 3 --out runs/x/metrics.json

Generates a caption for every image of the split (greedy, or beam search with
--beam-size K) and scores them against all reference captions with the coco-caption
toolkit: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D. Prints the metrics as one JSON object on
the last line of stdout (plus exact_match: the share of captions equal to a reference
word for word, n_empty_captions and n_skipped). With --out, writes that object to the file, and beside it
<stem>_captions.json (image, caption, references, per-image scores), which grows as
captions are produced, so an interrupted run keeps what it generated.
"""
import argparse
import json
import os
import sys

import torch
from tqdm import tqdm

from data.dataset import load_splits, read_captions, read_split_file, warn
from data.features import extract_features
from data.vocab import tokenize
from decoding import generate
from metrics import score_captions
from utils import load_checkpoint, load_model, pick_device, run_main


def write_json(obj, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
    os.replace(tmp, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--captions", help="captions file (image,caption CSV or Flickr8k.token.txt)")
    parser.add_argument("--images", help="image folder")
    parser.add_argument("--split-file", help="image names to evaluate, one per line (default: every captioned image)")
    parser.add_argument("--split", choices=["train", "val"],
                        help="instead of --captions/--images/--split-file: that split of the checkpoint's own dataset")
    parser.add_argument("--beam-size", type=int, default=1, help="1 = greedy (default)")
    parser.add_argument("--max-len", type=int, default=None, help="maximum caption length (default: the checkpoint's)")
    parser.add_argument("--out", help="write the metrics JSON here, and <stem>_captions.json beside it")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-cache", action="store_true", help="recompute CNN features instead of reading train.cache_dir")
    args = parser.parse_args(argv)
    if args.beam_size < 1:
        raise ValueError("--beam-size must be at least 1")

    device = pick_device(args.device)
    model, vocab, config = load_model(load_checkpoint(args.checkpoint), args.checkpoint)
    model.to(device)
    if args.split:
        references, train_names, val_names = load_splits(config["data"])
        names = train_names if args.split == "train" else val_names
        args.captions, args.images = config["data"]["captions"], config["data"]["images"]
    elif not (args.captions and args.images):
        raise ValueError("give --captions and --images (and optionally --split-file), or --split val")
    else:
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
    produced = []
    paths = [os.path.join(args.images, n) for n in names]
    max_len = args.max_len or config["decode"]["max_len"]
    # A frozen encoder's features come from the training cache when they are there (same key, same weights).
    cache_dir = None if args.no_cache or config["train"]["fine_tune_encoder"] else config["train"]["cache_dir"]
    features, ok = extract_features(model.encoder, paths, config["data"]["image_size"], cache_dir, device,
                                    args.batch_size, args.num_workers)
    readable = [n for n, good in zip(names, ok) if good]
    unreadable = len(names) - len(readable)
    for start in tqdm(range(0, len(readable), args.batch_size), desc=f"captioning (beam {args.beam_size})",
                      unit="batch", file=sys.stderr):
        with torch.no_grad():
            results = generate(model, features[start:start + args.batch_size].to(device), vocab, args.beam_size,
                               max_len, config["decode"]["length_penalty"])
        produced += [{"image": name, "caption": r["caption"], "references": references[name]}
                     for name, r in zip(readable[start:], results)]
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
              "exact_match": round(sum(tokenize(p["caption"]) in [tokenize(r) for r in p["references"]]
                                       for p in produced) / len(produced), 4),
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
