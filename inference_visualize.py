"""Caption images with a trained checkpoint, and show the results.

    python inference_visualize.py --checkpoint runs/demo/checkpoint_best.pth --images demo_images/shape_0001.png my_photos/
    python inference_visualize.py --checkpoint runs/demo/checkpoint_best.pth --split val --max-images 24
    python inference_visualize.py --checkpoint CKPT --images photos/ --beam-size 5 --out outputs

Prints `NAME<TAB>CAPTION` per image to stdout and writes, under --out:
  <image stem>.jpg        the image with its caption drawn underneath
  captions_result.html    a self-contained gallery (reference captions with --split;
                          per-word attention heatmaps for attention models)
  captions.csv            image,caption
Files that are not readable images are skipped with a warning and counted.
"""
import argparse
import csv
import math
import os
import sys

import torch
from tqdm import tqdm

from data.dataset import image_loader, list_images, load_image, load_splits, warn
from decoding import generate
from gallery import attention_overlay, caption_image, image_to_data_uri, write_gallery
from models.encoder import input_size
from utils import load_checkpoint, load_model, pick_device, run_main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint_best.pth (or a run folder)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", nargs="+", metavar="PATH", help="image files and/or folders")
    source.add_argument("--split", choices=["train", "val"], help="images of the checkpoint's dataset split")
    parser.add_argument("--out", default="outputs", help="output folder (default: outputs)")
    parser.add_argument("--beam-size", type=int, default=None, help="beam width (default: the checkpoint's decode.beam_size)")
    parser.add_argument("--max-len", type=int, default=None, help="maximum caption length in words")
    parser.add_argument("--max-images", type=int, default=None, help="caption at most N images")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    parser.add_argument("--no-attention-maps", action="store_true", help="leave per-word heatmaps out of the gallery")
    return parser.parse_args(argv)


def unique_stem(path: str, taken: set) -> str:
    """Output name for an image; photos/a.jpg and other/a.jpg become a.jpg and a_2.jpg."""
    stem = os.path.splitext(os.path.basename(path))[0]
    name, n = stem, 1
    while name in taken:
        n += 1
        name = f"{stem}_{n}"
    taken.add(name)
    return name


def main(argv=None):
    args = parse_args(argv)
    if args.beam_size is not None and args.beam_size < 1:
        raise ValueError("--beam-size must be at least 1")
    device = pick_device(args.device)
    model, vocab, config = load_model(load_checkpoint(args.checkpoint), args.checkpoint)
    model.to(device)
    beam_size = args.beam_size or config["decode"]["beam_size"]
    max_len = args.max_len or config["decode"]["max_len"]
    references = {}
    if args.split:
        captions, train_names, val_names = load_splits(config["data"])
        names = train_names if args.split == "train" else val_names
        paths = [os.path.join(config["data"]["images"], n) for n in names]
        references = {p: captions[n] for p, n in zip(paths, names)}
    else:
        paths = list_images(args.images)
    paths = paths[:args.max_images] if args.max_images else paths
    if not paths:
        raise ValueError(f"split {args.split!r} of {config['data']['captions']} has no images")
    os.makedirs(args.out, exist_ok=True)

    rows, taken, skipped = [], set(), 0
    size = input_size(config["model"]["encoder"], config["data"]["image_size"])
    csv_path = os.path.join(args.out, "captions.csv")
    with open(csv_path, "w", newline="", encoding="utf-8") as csv_file:
        writer = csv.writer(csv_file)
        writer.writerow(["image", "caption"])
        loader = image_loader(paths, size, args.batch_size, num_workers=min(2, len(paths) // args.batch_size))
        for images, good, bad in tqdm(loader, desc="captioning", unit="batch", file=sys.stderr, dynamic_ncols=True):
            skipped += len(bad)
            if images is None:
                continue
            with torch.no_grad():
                features = model.encoder.extract(images.to(device))                  # [b, P, C]
                results = generate(model, features, vocab, beam_size, max_len, config["decode"]["length_penalty"])
            for i, result in zip(good, results):
                path, stem = paths[i], unique_stem(paths[i], taken)
                print(f"{os.path.basename(path)}\t{result['caption']}", flush=True)
                writer.writerow([os.path.basename(path), result["caption"]])
                picture = load_image(path)
                caption_image(picture, result["caption"]).save(os.path.join(args.out, f"{stem}.jpg"), quality=90)
                rows.append(gallery_row(picture, path, result, references.get(path, []), not args.no_attention_maps))
    html_path = os.path.join(args.out, "captions_result.html")
    title = f"{os.path.basename(os.path.dirname(os.path.abspath(args.checkpoint)))}: {config['model']['encoder']} + " \
            f"{config['model']['decoder']}, beam {beam_size}"
    write_gallery(html_path, rows, title)
    if skipped:
        warn(f"skipped {skipped} of {len(paths)} files that are not readable images")
    print(f"captioned {len(rows)} images -> {html_path}, {csv_path}", file=sys.stderr)


def gallery_row(picture, path, result, references, with_attention):
    row = {"image": os.path.basename(path), "thumbnail": image_to_data_uri(picture), "caption": result["caption"],
           "references": references, "beams": result["beams"]}
    attention = result.get("attention")
    if with_attention and attention is not None and len(attention):
        side = int(math.isqrt(attention.size(1)))
        words = result["caption"].split()
        row["attention"] = [(word, image_to_data_uri(attention_overlay(picture, weights, (side, side)), max_side=160))
                            for word, weights in zip(words, attention)]
    return row


if __name__ == "__main__":
    run_main(main)
