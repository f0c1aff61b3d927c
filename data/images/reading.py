"""Image files: the one way they are read, the one transform into the CNN's input, and folders listed.

Training, inference, the web demo and the gallery all read images with load_image, which applies
the EXIF orientation a phone stores (so a photo is seen the way viewers show it), and turn them
into the encoder's input with resize_image. Normalising happens later, on the model's device.
"""
import os
import signal
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

from config import encoder_row  # the encoder table: each encoder's native input size and normalisation
from utils import UserError, plural, printable, shown_name, warn

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
Image.MAX_IMAGE_PIXELS = 40_000_000   # ~6300x6300; bigger files are refused as decompression bombs
MAX_SIDE = 16_384           # pixels along one side, at most; JPEG itself stops at 65,535
MAX_ASPECT = 25             # the longer side over the shorter, at most


def input_size(encoder: str, image_size: int) -> int:
    """The side of the square CNN input: data.image_size, or where it is 0 the encoder's native size."""
    return image_size or encoder_row(encoder).native_size


def normalisation(encoder: str) -> tuple:
    """(mean, std) per RGB channel, on the 0..1 scale, that the encoder's ImageNet weights expect."""
    row = encoder_row(encoder)
    return row.mean, row.std


def transform_id(encoder: str, image_size: int, mirrored: bool = False) -> str:
    """Names everything that turns a file into the backbone's input; part of the feature cache's key, so its
    text must stay as it is for the caches already on disk."""
    mean, std = normalisation(encoder)
    return (f"rgb|exif-oriented|resize{input_size(encoder, image_size)}-bilinear-squash|uint8|mean{mean}|std{std}"
            + ("|mirrored" if mirrored else ""))


class BadImage(UserError):
    """A file that cannot be captioned, with why in a word or two (`reason`), so that a run that skips
    several can say what was wrong with them."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def _refuse_size(name, width: int, height: int, max_pixels: int) -> None:
    """BadImage when an image's size (read from its header, before any pixel is decoded) is too large in
    pixels or along one side, or too narrow for its height (or the other way round): a 1 x 30,000 strip
    would make every picture drawn from it huge, and says nothing a CNN can read."""
    if width * height > max_pixels:
        raise BadImage(f"{name}: image too large ({width} x {height} pixels, over {max_pixels:,}); make it "
                       f"smaller", "too large")
    if max(width, height) > MAX_SIDE:
        raise BadImage(f"{name}: image too large ({width} x {height} pixels, a side over {MAX_SIDE:,}); make it "
                       f"smaller", "too large")
    if max(width, height) > MAX_ASPECT * max(1, min(width, height)):
        raise BadImage(f"{name}: image too narrow for its size ({width} x {height} pixels, more than "
                       f"{MAX_ASPECT}:1); crop it", "too narrow")


def probe_image(path) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding its pixels: fast. BadImage as load_image would
    raise it for a missing file, a file that is not an image, or a size it refuses."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                _refuse_size(path, *image.size, Image.MAX_IMAGE_PIXELS)
                return image.size
    except Image.DecompressionBombError:
        raise BadImage(f"{path}: image too large (over {Image.MAX_IMAGE_PIXELS:,} pixels); make it smaller",
                       "too large") from None
    except BadImage:
        raise
    except FileNotFoundError:
        raise BadImage(f"{path}: no such file", "missing") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise _unreadable(path, e) from None


def load_image(path, max_pixels: int | None = None, max_side: int | None = None) -> Image.Image:
    """Open an image fully, turned upright by its EXIF orientation, as RGB; or raise BadImage with the
    reason (missing, corrupt, not an image, too large, too narrow). path may be a file object with a name.

    max_pixels: a lower limit than Image.MAX_IMAGE_PIXELS (the web demo's uploads). max_side: the image is
    shrunk to fit a square of that side as it is decoded (a JPEG is decoded at a reduced scale), so the
    full-size pixels are never kept."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                _refuse_size(path, *image.size, min(max_pixels or Image.MAX_IMAGE_PIXELS, Image.MAX_IMAGE_PIXELS))
                if max_side:
                    image.draft("RGB", (max_side, max_side))     # JPEG: decode at 1/2, 1/4 or 1/8 scale
                image.load()
                # A phone stores the pixels as its sensor saw them, and in EXIF how to turn them.
                upright = _as_rgb(ImageOps.exif_transpose(image))
        if max_side:
            upright.thumbnail((max_side, max_side), Image.BICUBIC)
        return upright
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage(f"{path}: image too large (over {Image.MAX_IMAGE_PIXELS:,} pixels); make it smaller",
                       "too large") from None
    except BadImage:
        raise
    except FileNotFoundError:
        raise BadImage(f"{path}: no such file", "missing") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL raises all three for broken files
        raise _unreadable(path, e) from None


def _unreadable(path, error: Exception) -> BadImage:
    first = str(error).splitlines()[0][:80] if str(error) else type(error).__name__
    reason = "truncated" if "truncated" in first.lower() else "not an image"
    return BadImage(f"{path}: not a readable image ({first})", reason)


def _as_rgb(image: Image.Image) -> Image.Image:
    """RGB, with 16- and 32-bit greyscale scaled to 8 bits (PIL's own convert clips them: all but black turns white)."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(values * (255.0 / top) + 0.5, 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


def resize_image(image: Image.Image, size: int) -> torch.Tensor:
    """PIL image -> uint8 tensor [3, size, size]: a bilinear, antialiased squash to a square."""
    image = _as_rgb(image).resize((size, size), resample=Image.BILINEAR)
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)


SHOWN_NAMES = 3          # names a warning about skipped files gives as examples


def list_images(paths: list[str]) -> list[str]:
    """Expand files and folders into image files (folders: sorted, non-recursive). A folder's other files (not
    its hidden ones or subfolders), its broken links and names that are not valid UTF-8 are skipped with one
    warning each, counted, with the first few names."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += _folder_images(path)
        elif os.path.exists(path):
            files.append(path)
        elif os.path.islink(path):
            raise UserError(f"{path}: a link to nothing (its target is gone, or it links to itself)")
        else:
            raise UserError(f"{path}: no such file or folder")
    unprintable = [f for f in files if not printable(f)]
    if unprintable:
        shown = os.fsencode(unprintable[0]).decode("utf-8", "backslashreplace")
        warn(f"skipped {plural(len(unprintable), 'file')} whose name is not valid UTF-8 (e.g. {shown}); rename "
             f"{'it' if len(unprintable) == 1 else 'them'} to caption {'it' if len(unprintable) == 1 else 'them'}")
        files = [f for f in files if printable(f)]
    if not files:
        raise UserError(f"no images found in {' '.join(shown_name(p) for p in paths)}")
    return files


def _folder_images(folder: str) -> list[str]:
    """A folder's image files, sorted; its other files and broken links are named in a warning."""
    entries = sorted(n for n in os.listdir(folder) if not n.startswith("."))
    names = [n for n in entries if os.path.isfile(os.path.join(folder, n))]
    broken = [n for n in entries if os.path.islink(os.path.join(folder, n)) and not os.path.isfile(os.path.join(folder, n))
              and not os.path.isdir(os.path.join(folder, n))]
    found = [os.path.join(folder, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    others = [n for n in names if not n.lower().endswith(IMAGE_EXTENSIONS)]
    if others:
        warn(f"{folder}: skipped {plural(len(others), 'file')} without an image's extension ({_examples(others)}); "
             f"images are {', '.join(IMAGE_EXTENSIONS)}")
    if broken:
        warn(f"{folder}: skipped {plural(len(broken), 'link')} to nothing (a target gone, or a loop: "
             f"{_examples(broken)})")
    if not found:
        warn(f"{folder}: the folder has no images ({', '.join(IMAGE_EXTENSIONS)})")
    return found


def _examples(names: list[str]) -> str:
    return ", ".join(shown_name(n) for n in names[:SHOWN_NAMES]) + (", ..." if len(names) > SHOWN_NAMES else "")


class ImageFiles(torch.utils.data.Dataset):
    """Image paths -> (uint8 [3,S,S], index); a bad file yields (None, index) so the batch goes on."""

    def __init__(self, paths: list[str], size: int):
        self.paths, self.size = list(paths), size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            return resize_image(load_image(self.paths[index]), self.size), index
        except UserError as e:
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
