"""Image files: the one way they are read, the one transform into the CNN's input, and folders listed.

Training, inference, the web demo and the gallery all read images with load_image, which applies
the EXIF orientation a phone stores (so a photo is seen the way viewers show it), and turn them
into the encoder's input with resize_image. Normalising happens later, on the model's device.
"""
import os
import signal
import warnings

import torch
from PIL import Image, ImageOps

from utils import UserError, warn

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
Image.MAX_IMAGE_PIXELS = 40_000_000   # ~6300x6300; bigger files are refused as decompression bombs
NATIVE_SIZE = {"efficientnet_lite2": 260}   # every other encoder: 224
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LITE_MEAN, LITE_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)   # EfficientNet-Lite expects [-1, 1]


def input_size(encoder: str, image_size: int) -> int:
    return image_size or NATIVE_SIZE.get(encoder, 224)


def normalisation(encoder: str) -> tuple:
    """(mean, std) per RGB channel, on the 0..1 scale, that the encoder's ImageNet weights expect."""
    return (LITE_MEAN, LITE_STD) if encoder == "efficientnet_lite2" else (IMAGENET_MEAN, IMAGENET_STD)


def transform_id(encoder: str, image_size: int, mirrored: bool = False) -> str:
    """Names everything that turns a file into the backbone's input; part of the feature cache's key."""
    mean, std = normalisation(encoder)
    return (f"rgb|exif-oriented|resize{input_size(encoder, image_size)}-bilinear-squash|uint8|mean{mean}|std{std}"
            + ("|mirrored" if mirrored else ""))


def load_image(path) -> Image.Image:
    """Open an image fully, turned upright by its EXIF orientation, as RGB; or raise UserError with the
    reason (missing, corrupt, not an image, too large). path may be a file object with a name."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                # A phone stores the pixels as its sensor saw them, and in EXIF how to turn them.
                return ImageOps.exif_transpose(image).convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(f"{path}: image too large (over {Image.MAX_IMAGE_PIXELS:,} pixels)") from None
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL raises all three for broken files
        raise UserError(f"{path}: not a readable image ({str(e).splitlines()[0][:80]})") from None


def resize_image(image: Image.Image, size: int) -> torch.Tensor:
    """PIL image -> uint8 tensor [3, size, size]: a bilinear, antialiased squash to a square."""
    image = image.convert("RGB").resize((size, size), resample=Image.BILINEAR)
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)


def printable(name: str) -> bool:
    """Whether a file name can be printed, and written to CSV and HTML: names that are not valid UTF-8
    reach Python as lone surrogates, which no UTF-8 output accepts."""
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


SHOWN_NAMES = 3          # names a warning about skipped files gives as examples


def list_images(paths: list[str]) -> list[str]:
    """Expand files and folders into image files (folders: sorted, non-recursive). A folder's other files (not
    its hidden ones or subfolders) and names that are not valid UTF-8 are skipped with one warning each,
    counted, with the first few names."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            names = sorted(n for n in os.listdir(path) if not n.startswith(".") and os.path.isfile(os.path.join(path, n)))
            found = [os.path.join(path, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
            others = [n for n in names if not n.lower().endswith(IMAGE_EXTENSIONS)]
            if not found:
                warn(f"{path}: the folder has no images ({', '.join(IMAGE_EXTENSIONS)})")
            elif others:
                shown = ", ".join(others[:SHOWN_NAMES]) + (", ..." if len(others) > SHOWN_NAMES else "")
                warn(f"{path}: skipped {len(others)} file{'s' if len(others) > 1 else ''} that are not images by "
                     f"their extension ({shown}); images are {', '.join(IMAGE_EXTENSIONS)}")
            files += found
        elif os.path.exists(path):
            files.append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    unprintable = [f for f in files if not printable(f)]
    if unprintable:
        shown = os.fsencode(unprintable[0]).decode("utf-8", "backslashreplace")
        warn(f"skipped {len(unprintable)} file{'s' if len(unprintable) > 1 else ''} whose name is not valid UTF-8 "
             f"(e.g. {shown}); rename them to caption them")
        files = [f for f in files if printable(f)]
    if not files:
        raise UserError(f"no images found in {' '.join(p if printable(p) else repr(p) for p in paths)}")
    return files


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
