"""The feature cache: each image goes through the frozen CNN once, ever.

Layout: <cache_dir>/<key>/shard_<pid>_NNNNN.pt, each {"files": [[path, size, mtime_ns], ...],
"features": fp16 [n, ...]}. The key hashes the encoder name, its weights, the transform and the
layout (fp16 grids [P,C], which every decoder reads); each entry also records its file's size and
mtime, so a changed file, encoder, weight or transform never reuses stale features. Shards are
written atomically by a background thread as extraction goes, so a killed run resumes where it
stopped, and a truncated shard is detected, deleted and recomputed (as is, after an hour, the temp
file of a shard whose writer was killed mid-write). A shard whose images have all changed or gone
is deleted when the cache is next read, so re-copied images do not leave the old rows on disk.

On CUDA, a few threads each read a batch of JPEGs, decode it on the GPU (nvjpeg) and
resize it there, on a side stream, one batch ahead of the CNN; features come back to pinned
memory while the next batch runs. Other files, and any JPEG the GPU cannot decode, take the
PIL path. Batches of 16 or more images run the CNN under bf16 autocast (smaller ones run
faster in fp32), and a short one is padded to the full batch size: a new batch size costs
cuDNN more time than the padding.
The cache key does not name the decode path or the precision: on an H200, nvjpeg's pixels
differ from PIL's by 1.2 grey levels on average (more at sharp colour edges, where chroma
upsampling differs), the features' cosine similarity stays above 0.999, and a cache built
on a GPU machine should stay valid on a laptop, and the other way round.
"""
import hashlib
import io
import os
import time
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from data.dataset import image_loader, warn
from models.encoder import input_size, transform_id
from utils import TEMP_PREFIX, atomic_save

SHARD_SIZE = 1024
CUDA_BATCH = 256          # images per CNN batch on CUDA at least: smaller batches leave the GPU idle
AMP_MIN_BATCH = 16        # below this, casting the weights to bf16 costs more than it saves (H200: 8.4 vs 3.8 ms at 1)
JPEG_EXTENSIONS = (".jpg", ".jpeg")
DECODE_BYTES = 16 << 20   # JPEG bytes decoded on the device at once (~10x that in pixels): 500+ Flickr8k files
RESIZE_PIXELS = 32 << 20  # pixels resized at once, as float32 (128 MB)
DECODE_THREADS = 2        # batches read and decoded at once, ahead of the CNN (H200: 3 or 4 were no faster)
ABANDONED_TEMP_S = 3600  # a .tmp-*.pt shard untouched this long is no write in progress: its writer was killed
GPU_DECODE_MIN = 16       # fewer files decode faster with PIL (H200, one file at a time: 139 vs 77 images/s)
_gpu_jpeg = {}            # device -> whether torchvision decodes JPEGs there
# Shards are written by one background thread while the CNN, and then training, go on: writing a shard of
# ResNet-50 grids (200 MB) takes longer than computing it on a GPU. torch.save lets go of the GIL meanwhile.
_shard_writer = ThreadPoolExecutor(1)
_shard_writes = []        # futures, waited for by wait_for_cache_writes()


def cache_key(encoder, image_size: int) -> str:
    parts = [encoder.name, encoder.weights_fingerprint(), transform_id(encoder.name, image_size), "grid", "fp16"]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


def file_stamp(path: str) -> tuple:
    st = os.stat(path)
    return os.path.abspath(path), st.st_size, st.st_mtime_ns


def _is_current(stamp) -> bool:
    try:
        return file_stamp(stamp[0]) == tuple(stamp)
    except OSError:
        return False


def _remove_if_there(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:                              # another DDP rank removed it first
        pass


def _is_abandoned(path: str) -> bool:
    try:
        return time.time() - os.stat(path).st_mtime > ABANDONED_TEMP_S
    except FileNotFoundError:                              # renamed into place, or removed, since listdir
        return False


def _read_shards(folder: str) -> dict:
    """stamp -> feature row, from every readable shard; unreadable shards are removed, and so are
    shards none of whose images still exist unchanged (their rows could never be used again)."""
    rows, stale, abandoned = {}, 0, 0
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(TEMP_PREFIX) and name.endswith(".pt"):  # atomic_save's temp: another DDP rank may be writing it
            if _is_abandoned(path):
                abandoned += 1
                _remove_if_there(path)
            continue
        if not name.endswith(".pt") or name.startswith("."):
            continue
        try:
            # Mapped, not read: only the rows a caller asks for (the val split's, say) are ever read from disk.
            shard = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            files, features = shard["files"], shard["features"]
            if len(files) != len(features):
                raise ValueError("length mismatch")
        except FileNotFoundError:                          # another DDP rank deleted it since listdir
            continue
        except Exception as e:
            warn(f"{path}: feature cache shard is damaged ({str(e).splitlines()[0][:60]}); deleting and recomputing it")
            _remove_if_there(path)
            continue
        if not any(_is_current(f) for f in files):       # stops at the first current image: cheap when valid
            stale += 1
            _remove_if_there(path)
            continue
        rows.update({tuple(f): features[i] for i, f in enumerate(files)})
    if stale:
        warn(f"{folder}: deleted {stale} feature cache shard{'s' if stale > 1 else ''} whose images have all changed or gone")
    if abandoned:
        warn(f"{folder}: deleted {abandoned} half-written feature cache shard{'s' if abandoned > 1 else ''} "
             f"left by a killed run")
    return rows


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
    """Decoded images (or None) -> uint8 [3,S,S] (or None); the same squash resize as models.encoder.resize_image
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
    CUDA stream, while the caller runs the CNN on the batch before. One task per batch, not per file:
    on an H200, a thread pool reading each file as its own task gave 5,300-5,400 images/s (more threads,
    less), this 8,200-8,450 in the same run (scripts/extract_ab.py); the GPU decoder alone decodes
    23,000 images/s, the bf16 ResNet-50 alone runs 14,800 (docs/gpu_bench_h200.log).
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


def _batches(paths, size, batch_size, num_workers, device):
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


@torch.no_grad()
def extract_features(encoder, paths: list[str], image_size: int, cache_dir: str | None, device,
                     batch_size: int = 64, num_workers: int = 2, desc: str = "features", wait_for_cache: bool = True):
    """Features for image files, from the cache where valid, else computed (and cached).

    Returns (features [n_ok, ...] fp16 on CPU, ok: list[bool] per path). Unreadable images are
    skipped with a warning and counted. On CUDA, batches hold at least CUDA_BATCH images.
    wait_for_cache=False returns while new shards may still be being written (on an error or Ctrl-C it
    always waits); the caller then calls wait_for_cache_writes() before it needs them on disk.
    """
    stamps = [file_stamp(p) if os.path.exists(p) else None for p in paths]
    cached, folder = {}, None
    if cache_dir:
        folder = os.path.join(cache_dir, cache_key(encoder, image_size))
        os.makedirs(folder, exist_ok=True)
        cached = _read_shards(folder)
    todo = [i for i, s in enumerate(stamps) if s is None or s not in cached]
    computed, done = None, [False] * len(todo)      # features [len(todo), ...] of the images read
    if todo:
        if encoder.training:          # eval() walks every module: a ResNet-50 costs ~1 ms, paid per image at batch 1
            encoder.eval()
        size = input_size(encoder.name, image_size)
        if device.type == "cuda":
            batch_size = max(batch_size, CUDA_BATCH)
        unsaved, bad, copying, finished = [], 0, None, False
        bar = tqdm(total=len(todo), desc=desc, unit="image", dynamic_ncols=True)

        def keep(host, good, copied):
            nonlocal computed, unsaved
            if copied is not None:
                copied.synchronize()
            if computed is None:
                computed = torch.empty((len(todo), *host.shape[1:]), dtype=torch.float16)
            computed[good] = host
            for j in good:
                done[j] = True
            unsaved += good
            if folder and len(unsaved) >= SHARD_SIZE:
                _submit_shard(folder, [list(stamps[todo[j]]) for j in unsaved], computed[unsaved])
                unsaved = []

        try:
            for images, good, rejected in _batches([paths[i] for i in todo], size, batch_size, num_workers, device):
                bad += len(rejected)
                bar.update(len(good) + len(rejected))
                if images is None or not len(images):
                    continue
                n, images = len(images), images.to(device, non_blocking=True)
                bf16 = device.type == "cuda" and n >= AMP_MIN_BATCH
                if bf16 and n < batch_size:
                    # A batch size the CNN has not run makes cuDNN build a plan for each convolution: on an H200
                    # a bf16 ResNet-50 took 0.07-0.19 s at a new size, 0.01 s at a known one. So a short batch
                    # is padded to the size every other batch has (scripts/profile_e2e.py).
                    images = torch.cat([images, images.new_zeros((batch_size - n, *images.shape[1:]))])
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    feats = encoder.extract(images)[:n]                                   # [n, P, C]
                # On CUDA the copy to pinned memory runs while the next batch is computed; its rows are kept then.
                host = torch.empty(feats.shape, dtype=torch.float16, pin_memory=device.type == "cuda")
                host.copy_(feats.half(), non_blocking=True)
                copied = torch.cuda.Event() if device.type == "cuda" else None
                if copied is not None:
                    copied.record()
                if copying:
                    keep(*copying)
                copying = (host, good, copied)
            if copying:
                keep(*copying)
            finished = True
        finally:                # also on Ctrl-C or an error: what was computed is cached, the next run starts there
            bar.close()
            if folder and unsaved:
                _submit_shard(folder, [list(stamps[todo[j]]) for j in unsaved], computed[unsaved])
            if wait_for_cache or not finished:
                wait_for_cache_writes()
        if bad:
            warn(f"{bad} of {len(paths)} images could not be read and were skipped")
    from_todo = dict(zip(todo, range(len(todo))))
    ok = [done[from_todo[i]] if i in from_todo else stamps[i] in cached for i in range(len(paths))]
    if not any(ok):
        raise ValueError(f"none of the {len(paths)} images could be read")
    if len(todo) == len(paths) and all(ok):
        return computed, ok                                                          # no copy
    rows = [computed[from_todo[i]] if i in from_todo else cached[stamps[i]] for i in range(len(paths)) if ok[i]]
    return torch.stack(rows), ok


def wait_for_cache_writes() -> None:
    """Return once every shard this process has submitted is written (or has failed, with a warning)."""
    while _shard_writes:
        _shard_writes.pop(0).result()


def _submit_shard(folder: str, files: list, feats: torch.Tensor) -> None:
    _shard_writes.append(_shard_writer.submit(_write_shard, folder, files, feats))


def _write_shard(folder: str, files: list, feats: torch.Tensor) -> None:
    # The pid keeps processes that fill one cache at once (torchrun ranks) from replacing each other's shards;
    # one thread writes all of this process's shards, so it alone picks their numbers.
    shard_id = 0
    while os.path.exists(path := os.path.join(folder, f"shard_{os.getpid()}_{shard_id:05d}.pt")):
        shard_id += 1
    try:
        # No fsync: a shard damaged by a power cut is detected and recomputed. On an H200 machine a 200 MB shard
        # took 0.29 s to write with fsync and 0.14 s without, and its 1,024 images 0.13 s to compute.
        atomic_save({"files": files, "features": feats}, path, durable=False)
    except OSError as e:        # a full disk: the features are in memory, only the next run pays for this
        warn(f"{path}: could not write {len(files)} images' features to the cache ({e}); the next run "
             f"computes them again; free disk space or set train.cache_dir to another disk")
