"""The feature cache: each image goes through the frozen CNN (its trunk) once, ever.

Layout: <cache_dir>/<key>/shard_<pid>_NNNNN.pt, each {"files": [[path, size, mtime_ns], ...],
"features": fp16 [n, ...]}: grids [n, P, C] of a frozen CNN, or the maps [n, C, H, W] that enter
its fine-tuned tail. The key (data.features.key) hashes the encoder name, its trunk's weights, the
transform (mirrored or not) and the layout; each entry also records its file's size and mtime, so a changed file,
encoder, weight or transform never reuses stale features. Shards are memory-mapped when read: a
cache is opened without reading its features, and extract_features returns a FeatureStore over
them. Shards are written atomically by a background thread as extraction goes, so a killed run
resumes where it stopped, and a truncated or foreign shard is detected, deleted and recomputed (as
is, after an hour, the temp file of a shard whose writer was killed mid-write). A shard whose
images have all changed or gone is deleted when the cache is next read.

On CUDA, JPEGs are decoded on the GPU (data.images.gpu_jpeg) and features come back to pinned memory
while the next batch runs. Batches of AMP_MIN_BATCH or more images run the CNN under bf16 autocast,
and a short one is padded to the full batch size: a new batch size costs cuDNN more time than the
padding (docs/speed.md).
"""
import errno
import os
import pickle
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import torch
from tqdm import tqdm

from data.features.key import cache_key
from data.features.store import FeatureStore
from data.images.gpu_jpeg import image_batches
from data.images.reading import input_size
from utils import TEMP_PREFIX, UserError, atomic_save, disk_error, remove_if_present, warn

# What reading a truncated, corrupt or foreign shard raises (torch.load's zip reader, its memory map of a cut
# file, its unpickler; _check_shard for a readable file of the wrong form). Nothing else deletes a shard: a bug,
# Ctrl-C, or the system refusing a file (permissions, too many open files) leaves the cache as it is.
DAMAGED_SHARD = (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError)
SHARD_SIZE = 1024
CUDA_BATCH = 256          # images per CNN batch on CUDA at least: smaller batches leave the GPU idle
AMP_MIN_BATCH = 16        # below this, casting the weights to bf16 costs more than it saves
ABANDONED_TEMP_S = 3600   # a .tmp-*.pt shard untouched this long is no write in progress: its writer was killed
MAX_PENDING_SHARDS = 4    # shards computed but not yet written, at most: they are held in memory until then
CHECKSUM_ROWS = 32        # rows summed at once: their int64 copy stays a few tens of MB
# Shards are written by one background thread while the CNN, and then training, go on: on a GPU writing a
# shard takes longer than computing it. torch.save lets go of the GIL meanwhile.
_shard_writer = ThreadPoolExecutor(1)
_shard_writes = []        # futures, waited for by wait_for_cache_writes()
_failed_writes = []       # paths of shards that could not be written (a full disk)


def file_stamp(path: str) -> tuple:
    st = os.stat(path)
    return os.path.abspath(path), st.st_size, st.st_mtime_ns


def _is_current(stamp) -> bool:
    try:
        return file_stamp(stamp[0]) == tuple(stamp)
    except OSError:
        return False



def _is_abandoned(path: str) -> bool:
    try:
        return time.time() - os.stat(path).st_mtime > ABANDONED_TEMP_S
    except FileNotFoundError:                              # renamed into place, or removed, since listdir
        return False


def _load_mapped(path: str):
    """torch.load of a shard, memory-mapped. A file cut short cannot be mapped (EINVAL): that is a damaged shard,
    a ValueError; any other refusal of the system stays an OSError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except OSError as e:
        if e.errno == errno.EINVAL:
            raise ValueError(f"cannot be mapped ({e.strerror}): cut short") from None
        raise


def _check_shard(shard) -> tuple[list, torch.Tensor, torch.Tensor]:
    """(files, features, checksums) of a loaded shard; ValueError when it is not of the form this module writes."""
    if not isinstance(shard, dict) or not isinstance(shard.get("files"), list) \
            or not isinstance(shard.get("features"), torch.Tensor) or not isinstance(shard.get("checksums"), torch.Tensor):
        raise ValueError("not a feature cache shard")
    return shard["files"], shard["features"], shard["checksums"]


def row_checksums(features: torch.Tensor) -> torch.Tensor:
    """One int64 per row: its fp16 values' bits, weighted by position and summed (exact integer arithmetic, so the
    same on any machine and thread count). A flipped byte, a NaN written in, or two values swapped changes it."""
    flat = features.reshape(len(features), -1).view(torch.int16)
    weights = torch.arange(flat.size(1), dtype=torch.int64) % 65_521 + 1
    return torch.cat([(chunk.to(torch.int64) * weights).sum(1) for chunk in flat.split(CHECKSUM_ROWS)]) \
        if len(flat) else torch.zeros(0, dtype=torch.int64)


def damaged_rows(features: torch.Tensor, checksums: torch.Tensor, rows: torch.Tensor) -> bool:
    """Whether any of these rows no longer holds what was written, or holds a value that is not finite (read a
    few rows at a time: a shard is not copied whole)."""
    for chunk in rows.split(CHECKSUM_ROWS):
        picked = features[chunk]
        if not torch.equal(row_checksums(picked), checksums[chunk]) or not bool(torch.isfinite(picked).all()):
            return True
    return False


def _read_shards(folder: str) -> tuple[list, dict, list]:
    """(sources, rows, shards): every readable shard's features, mapped; stamp -> (source, row); each source's
    (path, checksums). Unreadable shards are removed, and so are shards none of whose images still exist
    unchanged (their rows could never be used again)."""
    sources, rows, shards, stale, abandoned = [], {}, [], 0, 0
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(TEMP_PREFIX) and name.endswith(".pt"):  # atomic_write's temp: another DDP rank may be writing it
            if _is_abandoned(path):
                abandoned += 1
                remove_if_present(path)
            continue
        if not name.endswith(".pt") or name.startswith("."):
            continue
        try:
            # Mapped, not read: only the rows a caller asks for (the val split's, say) are ever read from disk.
            files, features, checksums = _check_shard(_load_mapped(path))
            if not len(files) == len(features) == len(checksums) \
                    or (sources and features.shape[1:] != sources[0].shape[1:]):
                raise ValueError("its rows do not match its file list, or the other shards' grids")
        except FileNotFoundError:                          # another DDP rank deleted it since listdir
            continue
        except DAMAGED_SHARD as e:
            warn(f"{path}: feature cache shard is damaged ({str(e).splitlines()[0][:60]}); deleting and recomputing it")
            remove_if_present(path)
            continue
        if not any(_is_current(f) for f in files):       # stops at the first current image: cheap when valid
            stale += 1
            remove_if_present(path)
            continue
        rows.update({tuple(f): (len(sources), i) for i, f in enumerate(files)})
        sources.append(features)
        shards.append((path, checksums))
    if stale:
        warn(f"{folder}: deleted {stale} feature cache shard{'s' if stale > 1 else ''} whose images have all changed or gone")
    if abandoned:
        warn(f"{folder}: deleted {abandoned} half-written feature cache shard{'s' if abandoned > 1 else ''} "
             f"left by a killed run")
    return sources, rows, shards


def _drop_damaged(where: dict, sources: list, shards: list) -> None:
    """Check the cached rows about to be used against their shard's checksums; a shard with a damaged row is
    deleted, with a warning, and its rows leave `where`, to be computed again."""
    used = {}
    for source, row in where.values():
        used.setdefault(source, []).append(row)
    for source, rows in used.items():
        path, checksums = shards[source]
        if damaged_rows(sources[source], checksums, torch.tensor(rows)):
            warn(f"{path}: feature cache shard is damaged (its checksums do not match, or it holds values that are "
                 f"not numbers); deleting and recomputing it")
            remove_if_present(path)
            for i in [i for i, (s, _) in where.items() if s == source]:
                del where[i]


@dataclass(frozen=True)
class Loading:
    """How images go through the CNN when features are computed: batch size, loader workers, the progress bar's
    label, and whether to wait for the new shards to be on disk before returning."""
    batch_size: int = 64
    workers: int = 2
    desc: str = "features"
    wait_for_cache: bool = True


@torch.no_grad()
def extract_features(encoder, paths: list[str], image_size: int, cache_dir: str | None, device,
                     loading: Loading = Loading(), mirrored: bool = False):
    """encoder.trunk's output for image files (mirrored left to right if asked), from the cache where valid,
    else computed (and cached).

    Returns (FeatureStore over the readable images, ok: list[bool] per path). Unreadable images are
    skipped with a warning and counted. On CUDA, batches hold at least CUDA_BATCH images. A computed
    shard is held in memory until it is written, then read back mapped from its file.
    loading.wait_for_cache=False returns while new shards may still be being written (on an error or Ctrl-C it
    always waits); the caller then calls wait_for_cache_writes() before it needs them on disk.
    """
    stamps = [file_stamp(p) if os.path.exists(p) else None for p in paths]
    sources, cached, folder = [], {}, None
    if cache_dir:
        folder = os.path.join(cache_dir, cache_key(encoder, image_size, mirrored))
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise UserError(f"train.cache_dir: {disk_error(e)}; set train.cache_dir to a folder you can write") from None
        sources, cached, shards = _read_shards(folder)
    where = {i: cached[s] for i, s in enumerate(stamps) if s is not None and s in cached}
    if where:
        _drop_damaged(where, sources, shards)
    todo = [i for i in range(len(paths)) if i not in where]
    if todo:
        new_rows = _NewRows(folder, sources, where, stamps, todo)
        if device.type == "cuda":
            loading = replace(loading, batch_size=max(loading.batch_size, CUDA_BATCH))
        bad = _compute(encoder, [paths[i] for i in todo], input_size(encoder.name, image_size), device, loading,
                       mirrored, new_rows)
        if bad:
            warn(f"{bad} of {len(paths)} images could not be read and were skipped")
    ok = [i in where for i in range(len(paths))]
    if not any(ok):
        raise UserError(f"none of the {len(paths)} images could be read")
    return FeatureStore(sources, torch.tensor([where[i] for i in range(len(paths)) if ok[i]], dtype=torch.long)), ok


def _compute(encoder, paths, size, device, loading: Loading, mirrored: bool, new_rows) -> int:
    """Run the trunk over the files paths (new_rows.indices: their positions in the caller's list) into new_rows;
    returns how many could not be read. On CUDA a batch's copy to the host runs while the next batch is computed."""
    if encoder.training:          # eval() walks every module, paid per call: only when needed
        encoder.eval()
    bad, copying, finished = 0, None, False
    bar = tqdm(total=len(paths), desc=loading.desc, unit="image", dynamic_ncols=True)
    try:
        for images, good, rejected in image_batches(paths, size, loading.batch_size, loading.workers, device):
            bad += len(rejected)
            bar.update(len(good) + len(rejected))
            if images is None or not len(images):
                continue
            host, copied = _trunk_to_host(encoder, images, device, loading.batch_size, mirrored)
            if copying:
                done, copying = copying, None
                new_rows.keep(*done, rows_to_come=len(paths) - bar.n)
            copying = ([new_rows.indices[j] for j in good], host, copied)
        finished = True
    finally:                # also on Ctrl-C or an error: all that was computed is cached, the next run starts there
        bar.close()
        if copying:         # the last batch computed, whose copy to the host may have been under way
            new_rows.keep(*copying, rows_to_come=0)
        new_rows.flush(rows_to_come=len(paths) - bar.n)
        if loading.wait_for_cache or not finished:
            wait_for_cache_writes()
    return bad


def _trunk_to_host(encoder, images, device, batch_size: int, mirrored: bool):
    """One batch through the trunk -> (fp16 rows on the host, the CUDA event after which they are there, or None)."""
    n, images = len(images), images.to(device, non_blocking=True)
    bf16 = device.type == "cuda" and n >= AMP_MIN_BATCH
    if bf16 and n < batch_size:
        # A batch size the CNN has not run makes cuDNN build a plan for each convolution, which costs more than
        # computing the padding: a short batch is padded to the size every other batch has.
        images = torch.cat([images, images.new_zeros((batch_size - n, *images.shape[1:]))])
    if mirrored:
        images = images.flip(-1)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        features = encoder.trunk(images)[:n]                           # [n, P, C] or [n, C, H, W]
    host = torch.empty(features.shape, dtype=torch.float16, pin_memory=device.type == "cuda")
    host.copy_(features.half(), non_blocking=True)
    copied = torch.cuda.Event() if device.type == "cuda" else None
    if copied is not None:
        copied.record()
    return host, copied


class _NewRows:
    """Rows computed in this run, gathered into shard-sized sources of the FeatureStore (where: path index ->
    (source, row)), each also written to the cache folder (if any) by the background writer."""

    def __init__(self, folder: str | None, sources: list, where: dict, stamps: list, indices: list):
        """indices: the positions, in the caller's list of paths, of the paths computed (in their order)."""
        self.folder, self.sources, self.where, self.stamps, self.indices = folder, sources, where, stamps, indices
        self.unsaved = []         # (path indices, their host rows)

    def keep(self, indices: list, host: torch.Tensor, copied, rows_to_come: int) -> None:
        if copied is not None:
            copied.synchronize()
        self.unsaved.append((indices, host))
        if sum(len(batch) for batch, _ in self.unsaved) >= SHARD_SIZE:
            self.flush(rows_to_come)

    def flush(self, rows_to_come: int) -> None:
        """The unsaved rows become a source of their own, and a cache shard written in the background."""
        if not self.unsaved:
            return
        indices = [i for batch, _ in self.unsaved for i in batch]
        features = torch.cat([rows for _, rows in self.unsaved]) if len(self.unsaved) > 1 else self.unsaved[0][1]
        for row, i in enumerate(indices):
            self.where[i] = (len(self.sources), row)
        self.sources.append(features)
        if self.folder:
            check_memory_after_failed_writes(rows_to_come, features[:1].nbytes)
            _submit_shard(self.folder, [list(self.stamps[i]) for i in indices], features, self.sources,
                          len(self.sources) - 1)
        self.unsaved = []


def check_memory_after_failed_writes(rows_to_come: int, row_bytes: int) -> None:
    """Once a shard could not be written, the features stay in memory: stop with a clear line before they
    would fill it."""
    if not _failed_writes or not os.path.exists("/proc/meminfo"):
        return
    with open("/proc/meminfo") as f:
        available = next((int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")), None)
    needed = rows_to_come * row_bytes
    if available is not None and needed > 0.8 * available:
        raise UserError(f"the feature cache's disk is full, and the features of the {rows_to_come:,} images to come "
                        f"({needed / 2**30:.1f} GiB) do not fit in memory ({available / 2**30:.1f} GiB free): free "
                        f"disk space, or set train.cache_dir to another disk")


def wait_for_cache_writes() -> None:
    """Return once every shard this process has submitted is written (or has failed, with a warning)."""
    while _shard_writes:
        _shard_writes.pop(0).result()


def _submit_shard(folder: str, files: list, features: torch.Tensor, sources: list, index: int) -> None:
    while len([w for w in _shard_writes if not w.done()]) >= MAX_PENDING_SHARDS:   # bounds the memory held
        next(w for w in _shard_writes if not w.done()).result()
    _shard_writes.append(_shard_writer.submit(_write_shard, folder, files, features, sources, index))


def _write_shard(folder: str, files: list, features: torch.Tensor, sources: list, index: int) -> None:
    """Write a shard, then put its mapped file in place of the rows held in memory. A full disk is a warning:
    the rows stay in memory for this run, and the next run computes them again."""
    # The pid keeps processes that fill one cache at once (torchrun ranks) from replacing each other's shards;
    # one thread writes all of this process's shards, so it alone picks their numbers.
    shard_id = 0
    while os.path.exists(path := os.path.join(folder, f"shard_{os.getpid()}_{shard_id:05d}.pt")):
        shard_id += 1
    try:
        # No fsync: a shard damaged by a power cut is detected and recomputed.
        atomic_save({"files": files, "features": features, "checksums": row_checksums(features)}, path, durable=False)
        sources[index] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["features"]
    except OSError as e:
        _failed_writes.append(path)
        warn(f"could not write {len(files)} images' features to the feature cache ({disk_error(e)}); training "
             f"goes on from memory, and the next run computes them again; or set train.cache_dir to another disk")
