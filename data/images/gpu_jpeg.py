"""Images into CNN input on a CUDA GPU: JPEGs read by a few threads, decoded by nvjpeg and resized there.

A few threads each read a batch of JPEGs, decode it on the GPU and resize it there, on a side stream,
one batch ahead of the CNN. Other files, JPEGs the GPU cannot decode, and JPEGs turned by their EXIF
orientation (which the GPU decoder ignores) take the PIL path, data.images.reading.load_image. nvjpeg's pixels
differ from PIL's by about one grey level on average, and the features hardly at all (docs/speed.md),
so the feature cache does not name the decode path: a cache built on a GPU machine stays valid on a
laptop, and the other way round.
"""
import io
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from PIL import Image

from data.images.reading import image_loader
from utils import warn

JPEG_EXTENSIONS = (".jpg", ".jpeg")
DECODE_BYTES = 16 << 20   # JPEG bytes decoded on the device at once (~10x that in pixels): 500+ Flickr8k files
RESIZE_PIXELS = 32 << 20  # pixels resized at once, as float32 (128 MB)
DECODE_THREADS = 2        # batches read and decoded at once, ahead of the CNN (more were no faster: docs/speed.md)
GPU_DECODE_MIN = 16       # fewer files decode faster with PIL, one at a time (docs/speed.md)
_gpu_jpeg = {}            # device -> whether torchvision decodes JPEGs there


def _decode_jpeg(data, device):
    """torchvision's decode_jpeg (deprecated in favour of TorchCodec from 0.29 on, still there) into RGB."""
    from torchvision.io import ImageReadMode, decode_jpeg
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def gpu_jpeg_available(device) -> bool:
    """True when JPEGs can be decoded on this CUDA device (torchvision built with nvjpeg); probed once."""
    if device.type != "cuda":
        return False
    if device not in _gpu_jpeg:
        try:
            from torchvision.io import encode_jpeg
            _decode_jpeg([encode_jpeg(torch.zeros(3, 8, 8, dtype=torch.uint8))], device)
            _gpu_jpeg[device] = True
        except Exception as e:   # no nvjpeg in this build, or an old torchvision: the PIL path does it all
            warn(f"JPEG decoding on {device} is not available ({str(e).splitlines()[0][:80]}); decoding with PIL")
            _gpu_jpeg[device] = False
    return _gpu_jpeg[device]


def _read_bytes(path: str):
    """A JPEG's bytes, or None for a file the GPU path leaves to PIL: unreadable, or turned by its EXIF
    orientation (the GPU decoder ignores it; load_image applies it)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    if exif_orientation(data) not in (0, 1):
        return None
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation tag of a JPEG (1 = upright; 0 = none or unreadable), read from its header only."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return int(image.getexif().get(0x0112, 0))
    except Exception:             # PIL decides later whether the file is readable at all, and says why
        return 0


def _decode_all(data: list, device) -> list:
    """JPEG bytes -> RGB uint8 [3,H,W] on device, or None for a file the device cannot decode."""
    try:
        return _decode_jpeg(data, device)
    except Exception:                 # one bad file fails the whole call: find it by decoding one at a time
        decoded = []
        for d in data:
            try:
                decoded.append(_decode_jpeg(d, device))
            except Exception:
                decoded.append(None)
        return decoded


def _resize_all(images: list, size: int) -> list:
    """Decoded images (or None) -> uint8 [3,S,S] (or None); the same squash resize as data.images.reading.resize_image
    (bilinear, antialiased). Images of one size are resized together, RESIZE_PIXELS at a time."""
    out, by_shape = [None] * len(images), {}
    for j, image in enumerate(images):
        if image is not None and image.shape[1] * image.shape[2] <= Image.MAX_IMAGE_PIXELS:   # PIL refuses the rest
            by_shape.setdefault(tuple(image.shape), []).append(j)
    for (_, height, width), rows in by_shape.items():
        if (height, width) == (size, size):      # already the CNN's size: resizing would return the same pixels
            for j in rows:
                out[j] = images[j]
            continue
        step = max(1, RESIZE_PIXELS // (height * width))
        for i in range(0, len(rows), step):
            x = torch.stack([images[j] for j in rows[i:i + step]]).float()               # [k, 3, H, W]
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            for j, image in zip(rows[i:i + step], x.round_().clamp_(0, 255).to(torch.uint8)):
                out[j] = image                                                           # [3, S, S]
    return out


def decode_resize(data: list, size: int, device):
    """Raw JPEG bytes -> (uint8 [n_ok,3,size,size] on device, ok: list[bool]), decoding DECODE_BYTES of
    files at a time, so a batch of 12-megapixel photos does not fill the device."""
    resized, start = [], 0
    while start < len(data):
        end, total = start + 1, len(data[start])
        while end < len(data) and total + len(data[end]) <= DECODE_BYTES:
            total, end = total + len(data[end]), end + 1
        resized += _resize_all(_decode_all(data[start:end], device), size)
        start = end
    good = [image for image in resized if image is not None]
    batch = torch.stack(good) if good else torch.empty((0, 3, size, size), dtype=torch.uint8)
    return batch, [image is not None for image in resized]


def _decode_batch(first: int, paths: list, size: int, device):
    data = [_read_bytes(p) for p in paths]
    readable = [j for j, d in enumerate(data) if d is not None]
    images, ok = decode_resize([data[j] for j in readable], size, device)
    good = [first + j for j, decoded in zip(readable, ok) if decoded]
    return images, good, sorted(set(range(first, first + len(data))) - set(good))


def _decode_on_stream(stream, first: int, paths: list, size: int, device):
    """_decode_batch on a side CUDA stream (in a decoding thread); returns its result and a ready event."""
    if stream is None:
        return _decode_batch(first, paths, size, device), None
    with torch.cuda.device(device), torch.cuda.stream(stream):
        result, ready = _decode_batch(first, paths, size, device), torch.cuda.Event()
        ready.record(stream)
    return result, ready


def _handed_over(future, device):
    """A decoded batch, made safe to use on the caller's stream."""
    (images, good, rejected), ready = future.result()
    if ready is not None and images.is_cuda:      # (a batch with no decodable file is an empty CPU tensor)
        current = torch.cuda.current_stream(device)
        current.wait_event(ready)
        images.record_stream(current)     # its memory came from the side stream: keep it until this one is done
    return images, good, rejected


def jpeg_batches(paths: list[str], size: int, batch_size: int, device):
    """Yield (images uint8 [b,3,S,S] on device, indices decoded, indices rejected) per batch of paths.

    DECODE_THREADS threads each read a batch's files and decode and resize them on the batch's own
    CUDA stream, while the caller runs the CNN on the batch before. One task per batch, not per file: a
    task per file spent more time handing work between threads than decoding (docs/speed.md).
    """
    streams = [torch.cuda.Stream(device) if device.type == "cuda" else None for _ in range(DECODE_THREADS + 1)]
    with ThreadPoolExecutor(DECODE_THREADS) as decoders:
        pending = deque()
        for start in range(0, len(paths), batch_size):
            stream = streams[start // batch_size % len(streams)]
            pending.append(decoders.submit(_decode_on_stream, stream, start, paths[start:start + batch_size], size,
                                           device))
            if len(pending) > DECODE_THREADS:
                yield _handed_over(pending.popleft(), device)
        while pending:
            yield _handed_over(pending.popleft(), device)


def image_batches(paths, size, batch_size, num_workers, device):
    """(images [b,3,S,S], indices into paths, indices of unreadable files): the GPU JPEG path, then PIL."""
    pil = list(range(len(paths)))
    if len(paths) >= GPU_DECODE_MIN and gpu_jpeg_available(device):
        jpegs = [i for i in pil if paths[i].lower().endswith(JPEG_EXTENSIONS)]
        pil = [i for i in pil if not paths[i].lower().endswith(JPEG_EXTENSIONS)]
        for images, good, rejected in jpeg_batches([paths[i] for i in jpegs], size, batch_size, device):
            pil += [jpegs[j] for j in rejected]       # PIL decides whether they are unreadable, and says why
            yield images, [jpegs[j] for j in good], []
    if pil:
        loader = image_loader([paths[i] for i in pil], size, batch_size, num_workers, pin_memory=device.type == "cuda")
        for images, good, failed in loader:
            yield images, [pil[j] for j in good], [pil[j] for j in failed]
