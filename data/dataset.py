"""Captions files, splits by image, and image loading that skips bad files.

Flickr8kDataset is one split of a captioned image folder; ImageFiles loads any list of
image paths. Both turn a file into the encoder's input with models.encoder.resize_image.
"""
import csv
import os
import random
import signal
import sys
import warnings

import torch
from PIL import Image, ImageOps

from models.encoder import resize_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
Image.MAX_IMAGE_PIXELS = 40_000_000   # ~6300x6300; bigger files are refused as decompression bombs


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def read_captions(path: str) -> dict[str, list[str]]:
    """image name -> its captions, in file order. Reads `image,caption` CSV or Flickr8k.token.txt."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ValueError(f"{path}: cannot read the captions file ({e.strerror}); check data.captions") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line} is not UTF-8 (byte 0x{raw[e.start]:02x}); re-save the file as UTF-8") from None
    lines = text.splitlines()
    if not lines:
        raise ValueError(f"{path}: the captions file is empty")
    if "\t" in lines[0] and "#" in lines[0].split("\t")[0]:   # Flickr8k.token.txt: IMAGE#N<TAB>caption
        rows = [(n, *line.split("\t", 1)) for n, line in enumerate(lines, 1) if line.strip()]
        rows = [(n, image.rsplit("#", 1)[0], caption) for n, image, *rest in rows for caption in (rest or [""])]
    else:
        header = [h.strip().lower() for h in next(csv.reader([lines[0]]))]
        if header[:2] != ["image", "caption"]:
            raise ValueError(f"{path}: line 1 is {lines[0][:60]!r}; the header must be `image,caption` "
                             f"(or use Flickr8k.token.txt lines `IMAGE#N<TAB>caption`)")
        rows = [(n, *(row + ["", ""])[:2]) for n, row in enumerate(csv.reader(lines[1:]), 2) if row]
    captions, empty = {}, 0
    for line_number, image, caption in rows:
        image, caption = image.strip(), " ".join(caption.split())
        if not image or not caption:
            empty += 1
            if empty <= 3:
                warn(f"{path}: line {line_number} has an empty image name or caption; skipped")
            continue
        captions.setdefault(image, []).append(caption)
    if empty:
        warn(f"{path}: skipped {empty} rows with an empty image name or caption")
    if not captions:
        raise ValueError(f"{path}: no usable captions")
    return captions


def read_split_file(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the split file ({e}); check data.train_split / data.val_split") from None
    if not names:
        raise ValueError(f"{path}: the split file lists no images")
    return names


def split_images(names: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic split by image (never by caption row), independent of file order."""
    shuffled = sorted(names)
    random.Random(seed).shuffle(shuffled)
    n_val = max(1, round(len(shuffled) * val_fraction)) if len(shuffled) > 1 else 0
    return sorted(shuffled[n_val:]), sorted(shuffled[:n_val])


def load_splits(data: dict) -> tuple[dict[str, list[str]], list[str], list[str]]:
    """(captions, train image names, val image names) for a config's `data` section.

    Images named in the captions but missing from data.images are dropped with one warning.
    """
    captions = read_captions(data["captions"])
    if not os.path.isdir(data["images"]):
        raise ValueError(f"data.images={data['images']}: no such folder; point it at the folder of images")
    on_disk = set(os.listdir(data["images"]))
    if not any(name.lower().endswith(IMAGE_EXTENSIONS) for name in on_disk):
        raise ValueError(f"{data['images']}: the folder has no images ({', '.join(IMAGE_EXTENSIONS)})")
    if data["train_split"] or data["val_split"]:
        if not (data["train_split"] and data["val_split"]):
            raise ValueError("set both data.train_split and data.val_split, or neither (for a seeded split)")
        train, val = read_split_file(data["train_split"]), read_split_file(data["val_split"])
    else:
        train, val = split_images(list(captions), data["val_fraction"], data["seed"])
    kept = []
    for split, names in (("train", train), ("val", val)):
        no_caption = [n for n in names if n not in captions]
        missing = [n for n in names if n in captions and n not in on_disk]
        if no_caption:
            warn(f"{len(no_caption)} {split} images have no caption in {data['captions']} (e.g. {no_caption[0]}); skipped")
        if missing:
            warn(f"{len(missing)} {split} images are not in {data['images']} (e.g. {missing[0]}); skipped")
        kept.append([n for n in names if n in captions and n in on_disk])
    if not kept[0]:
        raise ValueError(f"no training images left: check that data.images={data['images']} holds the files named in {data['captions']}")
    return captions, kept[0], kept[1]


def load_image(path: str):
    """Open an image fully, or raise ValueError with the reason (missing, corrupt, not an image, too large)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                # A phone photo stores its pixels as the sensor saw them, and how to turn them in its EXIF.
                return ImageOps.exif_transpose(image).convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError(f"{path}: image too large (over {Image.MAX_IMAGE_PIXELS:,} pixels)") from None
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL raises all three for broken files
        raise ValueError(f"{path}: not a readable image ({str(e).splitlines()[0][:80]})") from None


class ImageFiles(torch.utils.data.Dataset):
    """Image paths -> (uint8 [3,S,S], index); a bad file yields (None, index) so the batch goes on."""

    def __init__(self, paths: list[str], size: int):
        self.paths, self.size = list(paths), size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            return resize_image(load_image(self.paths[index]), self.size), index
        except ValueError as e:
            warn(str(e) + "; skipped")
            return None, index


def collate_images(batch):
    """Stack the good images; return (images [n,3,S,S] or None, their indices, indices of bad files)."""
    good = [(image, i) for image, i in batch if image is not None]
    bad = [i for image, i in batch if image is None]
    images = torch.stack([image for image, _ in good]) if good else None
    return images, [i for _, i in good], bad


def image_loader(paths: list[str], size: int, batch_size: int, num_workers: int, pin_memory: bool = False):
    return torch.utils.data.DataLoader(ImageFiles(paths, size), batch_size=batch_size, shuffle=False,
                                       num_workers=num_workers, collate_fn=collate_images, pin_memory=pin_memory,
                                       persistent_workers=False, worker_init_fn=_leave_sigterm_to_the_main_process)


def _leave_sigterm_to_the_main_process(worker_id):
    # A scheduler's SIGTERM reaches every process of the job: the main one caches what it has computed and
    # shuts its workers down itself; a worker killed first would end it with a traceback instead.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class Flickr8kDataset(ImageFiles):
    """One split of a captioned image folder: images with all their reference captions."""

    def __init__(self, images_dir: str, names: list[str], captions: dict[str, list[str]], size: int):
        super().__init__([os.path.join(images_dir, n) for n in names], size)
        self.names = list(names)
        self.references = [captions[n] for n in names]


def list_images(paths: list[str]) -> list[str]:
    """Expand files and folders into image files (folders: sorted, non-recursive)."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(path, n) for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                warn(f"{path}: the folder has no images ({', '.join(IMAGE_EXTENSIONS)})")
            files += found
        elif os.path.exists(path):
            files.append(path)
        else:
            raise ValueError(f"{path}: no such file or folder")
    if not files:
        raise ValueError(f"no images found in {' '.join(paths)}")
    return files
