"""Caption images, and show the results. Without --checkpoint it uses the shipped Flickr8k model.

    python inference_visualize.py --images my_photos/                       # the shipped model, pretrained/
    python inference_visualize.py --checkpoint runs/demo/checkpoint_best.pth --split val --max-images 24
    python inference_visualize.py --checkpoint CKPT --images photos/ a.jpg --beam-size 5 --out outputs

Prints `NAME<TAB>CAPTION` per image to stdout and writes, under --out:
  <image stem>.jpg        the image with its caption drawn underneath
  captions_result.html    a self-contained gallery (reference captions with --split;
                          per-word attention heatmaps for attention models)
  captions.csv            image,caption
Files that are not readable images are skipped with a warning and counted. --out is a new or empty
folder, or one this script wrote before: it never writes over a file it did not make, nor over an input
(reports/output_folder.py). Ctrl-C keeps the captions made so far.
"""
import argparse
import csv
import io
import math
import os
import sys
from collections import Counter

import torch
from tqdm import tqdm

from data.demo import knows_only_shapes
from data.images.reading import BadImage, image_loader, input_size, list_images, load_image, probe_image
from data.text.captions import load_splits
from models.checkpoint import PRETRAINED, load_model_at
from models.decoding import Captioner, decode_settings, describe_decoding
from models.rerank_frequencies import with_rerank_cider
from reports.gallery import attention_overlay, caption_image, image_to_data_uri, write_gallery
from reports.output_folder import OutputFolder
from utils import UserError, atomic_write, int_at_least, pick_device, plural, run_main, shown_name, warn

CSV, GALLERY = "captions.csv", "captions_result.html"
SHOWN_SIDE = 1024           # a picture is read at most this large for drawing: outputs and memory stay small
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help=f"a checkpoint, a run folder, or a folder of export.py --onnx (default: "
                                             f"the shipped model, {os.path.relpath(PRETRAINED)})")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", nargs="+", metavar="PATH", help="image files and/or folders")
    source.add_argument("--split", choices=["train", "val"], help="images of the checkpoint's dataset split")
    parser.add_argument("--out", default="outputs", help="output folder (default: outputs)")
    parser.add_argument("--beam-size", type=int_at_least(1), default=None,
                        help="beam width (default: the checkpoint's decode.beam_size)")
    parser.add_argument("--max-len", type=int_at_least(1), default=None, help="maximum caption length in words")
    parser.add_argument("--rerank-samples", type=int_at_least(0), default=None,
                        help="consensus re-ranking: sample N captions per image beside the beam's and keep the one "
                             "most like the others, by CIDEr-D (0: off; default: the checkpoint's decode.rerank_samples)")
    parser.add_argument("--rerank-temperature", type=float, default=None,
                        help="consensus re-ranking: the samples' temperature (default: decode.rerank_temperature)")
    parser.add_argument("--rerank-bleu", type=float, default=None,
                        help="consensus re-ranking: weight of BLEU-4 beside CIDEr-D (default: decode.rerank_bleu)")
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
    if args.images:     # the user's paths are checked before the model loads: a mistake is told at once
        paths, skipped = readable_images(list_images(args.images), args.max_images)
        folder = OutputFolder.claim(args.out, output_names(paths), inputs=paths)
    device = pick_device(args.device)
    checkpoint_path = args.checkpoint or PRETRAINED
    model, vocab, config, checkpoint = load_model_at(args.checkpoint)      # a .pth, or an ONNX folder
    model.to(device)
    decode = decode_settings(config.decode, beam_size=args.beam_size, max_len=args.max_len,
                             rerank_samples=args.rerank_samples, rerank_temperature=args.rerank_temperature,
                             rerank_bleu=args.rerank_bleu)
    print(f"decoding: {describe_decoding(decode)}", file=sys.stderr)
    decode = with_rerank_cider(decode, checkpoint, checkpoint_path)
    references = {}
    if args.split:
        paths, references = split_images(config, args.split)
        paths, skipped = readable_images(paths, args.max_images)
        folder = OutputFolder.claim(args.out, output_names(paths), inputs=paths)
    elif knows_only_shapes(vocab.itos) and any(os.path.dirname(os.path.abspath(p)) != os.path.abspath(config.data.images)
                                               for p in paths):
        warn(f"{checkpoint_path} was trained on the generated shapes demo: it knows coloured shapes only. For "
             f"photos, leave out --checkpoint: the shipped Flickr8k model ({os.path.relpath(PRETRAINED)}) is the default")
    rows, unreadable = caption_files(Captioner(model, vocab, config, decode, device), paths, references, folder, args)
    skipped["unreadable (truncated or corrupt)"] += unreadable
    if not rows:
        raise UserError(f"none of the {plural(len(paths), 'file')} given could be captioned: {reasons(skipped)}")
    write_gallery(folder.path(GALLERY), rows, gallery_title(checkpoint_path, config, decode))
    if sum(skipped.values()):
        warn(f"skipped {plural(sum(skipped.values()), 'file')} of {len(paths) + sum(skipped.values()) - unreadable}: "
             f"{reasons(skipped)}")
    print(f"captioned {plural(len(rows), 'image')} -> {folder.path(GALLERY)}, {folder.path(CSV)}", file=sys.stderr)


def readable_images(paths: list[str], max_images: int | None) -> tuple[list[str], Counter]:
    """(the first max_images paths whose header says they are images of a size we read, why each other was
    skipped); UserError before anything loads when none is."""
    good, skipped = [], Counter()
    for path in paths:
        if max_images and len(good) == max_images:
            break
        try:
            probe_image(path)
            good.append(path)
        except BadImage as e:
            warn(f"{e}; skipped")
            skipped[e.reason] += 1
    if not good:
        raise UserError(f"none of the {plural(sum(skipped.values()), 'file')} given could be captioned: "
                        f"{reasons(skipped)}")
    return good, skipped


FIXES = {"not an image": "give JPEG, PNG, WebP, BMP or GIF files", "too large": "make them smaller",
         "too narrow": "crop them", "missing": "check the paths", "truncated": "copy them again"}


def reasons(skipped: Counter) -> str:
    """"2 not an image (give JPEG, ... files), 1 too large (make them smaller)": why files were skipped."""
    return ", ".join(f"{count} {reason}" + (f" ({FIXES[reason]})" if reason in FIXES else "")
                     for reason, count in skipped.most_common() if count)


def split_images(config, split: str) -> tuple[list[str], dict]:
    """The image paths of the checkpoint's dataset split, and each one's reference captions."""
    captions, train_names, val_names = load_splits(config.data)
    names = train_names if split == "train" else val_names
    if not names:
        raise UserError(f"split {split!r} of {config.data.captions} has no images")
    paths = [os.path.join(config.data.images, n) for n in names]
    return paths, {p: captions[n] for p, n in zip(paths, names)}


def output_names(paths: list[str]) -> list[str]:
    """Every file name the run will write: a captioned JPEG per image, the CSV and the gallery."""
    taken = set()
    return [f"{unique_stem(p, taken)}.jpg" for p in paths] + [CSV, GALLERY]


def caption_files(captioner: Captioner, paths, references, folder, args) -> tuple[list, int]:
    """Caption the files batch by batch; each result is printed, drawn and added to the CSV at once. Returns
    (gallery rows, how many files could not be decoded). Ctrl-C or SIGTERM keeps what is done: the CSV is
    rewritten after every batch, and the gallery of the rows so far is written before the run stops."""
    rows, lines, taken, unreadable = [], [], set(), 0
    config, encoder = captioner.config, captioner.model.encoder
    size = input_size(config.model.encoder, config.data.image_size)
    loader = image_loader(paths, size, args.batch_size, num_workers=min(2, len(paths) // args.batch_size))
    try:
        for images, good, bad in tqdm(loader, desc="captioning", unit="batch", file=sys.stderr, dynamic_ncols=True):
            unreadable += len(bad)
            if images is None:
                continue
            with torch.no_grad():
                results = captioner.captions(encoder.extract(images.to(captioner.device)))
            for i, result in zip(good, results):
                path, stem = paths[i], unique_stem(paths[i], taken)
                print(f"{shown_name(os.path.basename(path))}\t{result['caption']}", flush=True)
                lines.append([shown_name(os.path.basename(path)), result["caption"]])
                picture = load_image(path, max_side=SHOWN_SIDE)
                atomic_write(folder.path(f"{stem}.jpg"),
                             lambda f: caption_image(picture, result["caption"]).save(f, format="JPEG", quality=90))
                rows.append(gallery_row(picture, path, result, references.get(path, []), not args.no_attention_maps))
            atomic_write(folder.path(CSV), lambda f: f.write(csv_text(lines)), binary=False)   # what is done is kept
    except KeyboardInterrupt as stop:
        if rows:
            write_gallery(folder.path(GALLERY), rows, "(interrupted) " + gallery_title(args.checkpoint or PRETRAINED,
                                                                                        config, captioner.decode))
        raise type(stop)(f"kept the {plural(len(rows), 'caption')} made so far in {args.out} ({CSV}, {GALLERY} and "
                         f"the captioned images)") from None
    return rows, unreadable


def gallery_title(checkpoint_path: str, config, decode: dict) -> str:
    stem = os.path.splitext(os.path.basename(checkpoint_path))[0]      # a run's checkpoint_*.pth: its run folder's name
    name = os.path.basename(os.path.dirname(os.path.abspath(checkpoint_path))) if stem.startswith("checkpoint_") else stem
    return f"{name}: {config.model.encoder} + {config.model.decoder}, {describe_decoding(decode)}"


def csv_text(lines: list) -> str:
    """The CSV, with cells a spreadsheet would run as a formula (=, +, -, @, tab, return first) quoted with '."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", "caption"])
    writer.writerows([["'" + cell if cell[:1] in FORMULA_STARTS else cell for cell in line] for line in lines])
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
