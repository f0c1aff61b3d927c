"""Caption images, and show the results. Without --checkpoint it uses the shipped Flickr8k model.

    python inference_visualize.py --images my_photos/                       # the shipped model, pretrained/
    python inference_visualize.py --checkpoint runs/demo/checkpoint_best.pth --split val --max-images 24
    python inference_visualize.py --checkpoint CKPT --images photos/ a.jpg --beam-size 5 --out outputs

Prints `NAME<TAB>CAPTION` per image to stdout and writes, under --out:
  <image stem>.jpg        the image with its caption drawn underneath
  captions_result.html    a self-contained gallery (reference captions with --split;
                          per-word attention heatmaps for attention models)
  captions.csv            image,caption
Files that are not readable images are skipped with a warning and counted.
"""
import argparse
import csv
import io
import math
import os
import sys

import torch
from tqdm import tqdm

from data.demo import knows_only_shapes
from data.images.reading import image_loader, input_size, list_images, load_image
from data.text.captions import load_splits
from models.checkpoint import PRETRAINED, load_checkpoint, load_model, load_shipped
from models.decoding import decode_settings, describe_decoding, generate
from reports.gallery import attention_overlay, caption_image, image_to_data_uri, write_gallery
from utils import UserError, atomic_write, int_at_least, pick_device, run_main, warn


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help=f"a checkpoint, or a run folder (default: the shipped model, "
                                             f"{os.path.relpath(PRETRAINED)})")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", nargs="+", metavar="PATH", help="image files and/or folders")
    source.add_argument("--split", choices=["train", "val"], help="images of the checkpoint's dataset split")
    parser.add_argument("--out", default="outputs", help="output folder (default: outputs)")
    parser.add_argument("--beam-size", type=int_at_least(1), default=None,
                        help="beam width (default: the checkpoint's decode.beam_size)")
    parser.add_argument("--max-len", type=int_at_least(1), default=None, help="maximum caption length in words")
    parser.add_argument("--max-images", type=int_at_least(1), default=None, help="caption at most N images")
    parser.add_argument("--batch-size", type=int_at_least(1), default=32)
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
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a file; give a folder for the captioned images and the gallery")
    device = pick_device(args.device)
    checkpoint_path = args.checkpoint or PRETRAINED
    checkpoint = load_checkpoint(args.checkpoint) if args.checkpoint else load_shipped()
    model, vocab, config = load_model(checkpoint, checkpoint_path)
    model.to(device)
    decode = decode_settings(config.decode, beam_size=args.beam_size, max_len=args.max_len)
    print(f"decoding: {describe_decoding(decode)}", file=sys.stderr)
    references = {}
    if args.split:
        captions, train_names, val_names = load_splits(config.data)
        names = train_names if args.split == "train" else val_names
        paths = [os.path.join(config.data.images, n) for n in names]
        references = {p: captions[n] for p, n in zip(paths, names)}
    else:
        paths = list_images(args.images)
        demo_folder = os.path.abspath(config.data.images)
        if knows_only_shapes(vocab.itos) and any(os.path.dirname(os.path.abspath(p)) != demo_folder for p in paths):
            warn(f"{checkpoint_path} was trained on the generated shapes demo: it knows coloured shapes only. For "
                 f"photos, leave out --checkpoint: the shipped Flickr8k model ({os.path.relpath(PRETRAINED)}) is the default")
    paths = paths[:args.max_images] if args.max_images else paths
    if not paths:
        raise UserError(f"split {args.split!r} of {config['data']['captions']} has no images")
    os.makedirs(args.out, exist_ok=True)

    rows, lines, taken, skipped = [], [], set(), 0
    size = input_size(config.model.encoder, config.data.image_size)
    csv_path = os.path.join(args.out, "captions.csv")
    loader = image_loader(paths, size, args.batch_size, num_workers=min(2, len(paths) // args.batch_size))
    for images, good, bad in tqdm(loader, desc="captioning", unit="batch", file=sys.stderr, dynamic_ncols=True):
        skipped += len(bad)
        if images is None:
            continue
        with torch.no_grad():
            features = model.encoder.extract(images.to(device))                  # [b, P, C]
            results = generate(model, features, vocab, **decode)
        for i, result in zip(good, results):
            path, stem = paths[i], unique_stem(paths[i], taken)
            print(f"{os.path.basename(path)}\t{result['caption']}", flush=True)
            lines.append([os.path.basename(path), result["caption"]])
            picture = load_image(path)
            atomic_write(os.path.join(args.out, f"{stem}.jpg"),
                         lambda f: caption_image(picture, result["caption"]).save(f, format="JPEG", quality=90))
            rows.append(gallery_row(picture, path, result, references.get(path, []), not args.no_attention_maps))
        atomic_write(csv_path, lambda f: f.write(csv_text(lines)), binary=False)   # what is done so far is kept
    if not rows:
        given = " ".join(args.images or []) or f"split {args.split}"
        raise UserError(f"no image found among the {len(paths)} file{'s' if len(paths) > 1 else ''} given ({given}): "
                        f"none could be read as an image; give JPEG, PNG, WebP, BMP or GIF files or folders of them")
    html_path = os.path.join(args.out, "captions_result.html")
    stem = os.path.splitext(os.path.basename(checkpoint_path))[0]      # a run's checkpoint_*.pth: its run folder's name
    name = os.path.basename(os.path.dirname(os.path.abspath(checkpoint_path))) if stem.startswith("checkpoint_") else stem
    title = f"{name}: {config['model']['encoder']} + {config['model']['decoder']}, {describe_decoding(decode)}"
    write_gallery(html_path, rows, title)
    if skipped:
        warn(f"skipped {skipped} of {len(paths)} files that are not readable images")
    print(f"captioned {len(rows)} images -> {html_path}, {csv_path}", file=sys.stderr)


def csv_text(lines: list) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", "caption"])
    writer.writerows(lines)
    return buffer.getvalue()


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
