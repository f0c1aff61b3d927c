"""Captions files and splits by image.

Reads a CSV with header `image,caption` (Kaggle's Flickr8k captions.txt, the demo's captions.csv),
Flickr8k.token.txt lines `IMAGE#N<TAB>caption`, and Karpathy's split JSON (data/text/karpathy.py).
read_dataset is the one place that tells them apart: training (load_splits) and evaluate.py read
captions and splits through it. A new format is a branch there (and its reader).
"""
import csv
import io
import os
import random

from config import DataConfig
from data.images.reading import IMAGE_EXTENSIONS
from data.text import karpathy
from data.text.vocab import tokenize
from utils import UserError, warn


def read_text(path: str, what: str, key: str) -> str:
    """A UTF-8 text file's content, or UserError naming the line that is not UTF-8."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UserError(f"{path}: cannot read the {what} ({e.strerror}); check {key}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UserError(f"{path}: line {line} is not UTF-8 (byte 0x{raw[e.start]:02x}); re-save the file as UTF-8") from None


def read_dataset(path: str, splits: dict[str, str]) -> tuple[dict[str, list[str]], dict[str, list[str] | None]]:
    """(references: image name -> its captions in file order, the image names of each split asked for) from any
    captions source: a CSV `image,caption`, Flickr8k.token.txt or a Karpathy JSON.

    splits: "train", "val" or "test" -> how that split is given. A Karpathy JSON takes its split names joined by
    '+' ("val", "train+restval"), "" for its default (karpathy.DEFAULT_SPLITS). The other formats name no splits:
    they take a file of image names, one per line, and "" gives None, for the caller to choose (a seeded split,
    every image). A caption with no word left after tokenization (empty, or punctuation only) is dropped and
    counted."""
    if karpathy.is_karpathy(path):
        rows, named = karpathy.read(path)
        references = collect(path, rows)
        return references, {split: karpathy.split_names(named, spec or karpathy.DEFAULT_SPLITS[split], path)
                            for split, spec in splits.items()}
    references = collect(path, _text_rows(path))
    return references, {split: _split_file(spec, path) if spec else None for split, spec in splits.items()}


def read_captions(path: str) -> dict[str, list[str]]:
    """image name -> its captions, in file order, from any of the three formats (read_dataset without splits)."""
    return read_dataset(path, {})[0]


def _split_file(spec: str, captions_path: str) -> list[str]:
    if not os.path.isfile(spec):
        raise UserError(f"{spec}: no such split file; {captions_path} names no splits (only a Karpathy JSON does), "
                        f"so a split is a file of image names, one per line")
    return read_split_file(spec)


def _text_rows(path: str) -> list[tuple[str, str, str]]:
    """(where, image, caption) rows of a CSV `image,caption` or a Flickr8k.token.txt, for collect."""
    text = read_text(path, "captions file", "data.captions")
    first = text.split("\n", 1)[0]
    if not text.strip():
        raise UserError(f"{path}: the captions file is empty")
    if "\t" in first and "#" in first.split("\t")[0]:   # Flickr8k.token.txt: IMAGE#N<TAB>caption
        rows = [(n, *line.split("\t", 1)) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        rows = [(f"line {n}", image.rsplit("#", 1)[0], caption) for n, image, *rest in rows for caption in (rest or [""])]
    else:
        # The csv module over the whole text: a quoted caption may hold commas and line breaks.
        reader = csv.reader(io.StringIO(text, newline=""), strict=True)
        header = [h.strip().lower() for h in next(reader)]
        if header[:2] != ["image", "caption"]:
            raise UserError(f"{path}: line 1 is {first[:60]!r}; the header must be `image,caption` "
                            f"(or use Flickr8k.token.txt lines `IMAGE#N<TAB>caption`, or Karpathy's JSON)")
        rows = []
        try:
            line = reader.line_num + 1
            for row in reader:
                if row:
                    rows.append((f"line {line}", *(row + ["", ""])[:2]))
                line = reader.line_num + 1
        except csv.Error as e:
            raise UserError(f"{path}: line {line} is not valid CSV ({e}); fix its quotes") from None
    return rows


def collect(path: str, rows) -> dict[str, list[str]]:
    """(where, image, caption) rows -> image -> captions; empty names and wordless captions dropped and counted.
    where names the row for a warning: "line 5", or a JSON entry."""
    captions, empty, wordless = {}, 0, 0
    for where, image, caption in rows:
        image, caption = image.strip(), " ".join(caption.split())
        if not image or not caption:
            empty += 1
            if empty <= 3:
                warn(f"{path}: {where} has an empty image name or caption; skipped")
            continue
        if not tokenize(caption):
            wordless += 1
            if wordless <= 3:
                warn(f"{path}: {where}: caption {caption!r} has no words; skipped")
            continue
        captions.setdefault(image, []).append(caption)
    if empty:
        warn(f"{path}: skipped {empty} rows with an empty image name or caption")
    if wordless:
        warn(f"{path}: skipped {wordless} captions with no words (punctuation only)")
    if not captions:
        raise UserError(f"{path}: no usable captions")
    return captions


def read_split_file(path: str) -> list[str]:
    text = read_text(path, "split file", "data.train_split / data.val_split")
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise UserError(f"{path}: the split file lists no images")
    return names


def split_images(names: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic split by image (never by caption row), independent of file order."""
    shuffled = sorted(names)
    random.Random(seed).shuffle(shuffled)
    n_val = max(1, round(len(shuffled) * val_fraction)) if len(shuffled) > 1 else 0
    return sorted(shuffled[n_val:]), sorted(shuffled[:n_val])


def load_splits(data: DataConfig) -> tuple[dict[str, list[str]], list[str], list[str]]:
    """(captions, train image names, val image names) for a config's `data` section. A name is the image's
    path relative to data.images.

    Images named in the captions but missing from data.images are dropped with one warning.
    """
    if not os.path.isdir(data.images):
        raise UserError(f"data.images={data.images}: no such folder; point it at the folder of images")
    captions, splits = read_dataset(data.captions, {"train": data.train_split, "val": data.val_split})
    train, val = splits["train"], splits["val"]
    if (train is None) != (val is None):
        raise UserError("set both data.train_split and data.val_split, or neither (for a seeded split)")
    if train is None:           # a format without splits, and no split files: a seeded split by image
        train, val = split_images(list(captions), data.val_fraction, data.seed)
    on_disk = files_in(data.images, train + val)
    if not any(name.lower().endswith(IMAGE_EXTENSIONS) for name in on_disk):
        raise UserError(f"{data.images}: the folder has no images named in {data.captions} "
                        f"({', '.join(IMAGE_EXTENSIONS)})")
    kept = []
    for split, names in (("train", train), ("val", val)):
        no_caption = [n for n in names if n not in captions]
        missing = [n for n in names if n in captions and n not in on_disk]
        if no_caption:
            warn(f"{len(no_caption)} {split} images have no caption in {data.captions} (e.g. {no_caption[0]}); skipped")
        if missing:
            warn(f"{len(missing)} {split} images are not in {data.images} (e.g. {missing[0]}); skipped")
        kept.append([n for n in names if n in captions and n in on_disk])
    if not kept[0]:
        raise UserError(f"no training images left: check that data.images={data.images} holds the files named in "
                        f"{data.captions}")
    return captions, kept[0], kept[1]


def files_in(folder: str, names: list[str]) -> set[str]:
    """Which of these relative names are files under folder: one listing per subfolder, not a stat per file."""
    listed = {}
    for sub in {os.path.dirname(n) for n in names}:
        try:
            listed[sub] = set(os.listdir(os.path.join(folder, sub)))
        except OSError:
            listed[sub] = set()
    return {n for n in names if os.path.basename(n) in listed[os.path.dirname(n)]}
