"""The feature cache: each image goes through the frozen CNN once, ever.

Layout: <cache_dir>/<key>/shard_NNNNN.pt, each {"files": [[path, size, mtime_ns], ...],
"features": fp16 [n, ...]}. The key hashes the encoder name, its weights, the transform
and the layout (fp16 grids [P,C], which every decoder reads); each entry also records its file's size and mtime, so a changed
file, encoder, weight or transform never reuses stale features. Shards are written
atomically as extraction goes, so a killed run resumes where it stopped, and a truncated
shard is detected, deleted and recomputed.
"""
import hashlib
import os

import torch
from tqdm import tqdm

from data.dataset import image_loader, warn
from models.encoder import input_size, transform_id
from utils import atomic_save

SHARD_SIZE = 1024


def cache_key(encoder, image_size: int) -> str:
    parts = [encoder.name, encoder.weights_fingerprint(), transform_id(encoder.name, image_size), "grid", "fp16"]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


def file_stamp(path: str) -> tuple:
    st = os.stat(path)
    return os.path.abspath(path), st.st_size, st.st_mtime_ns


def _read_shards(folder: str) -> dict:
    """stamp -> feature row, from every readable shard; unreadable shards are removed."""
    rows = {}
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".pt"):
            continue
        path = os.path.join(folder, name)
        try:
            shard = torch.load(path, map_location="cpu", weights_only=True)
            files, features = shard["files"], shard["features"]
            if len(files) != len(features):
                raise ValueError("length mismatch")
        except Exception as e:
            warn(f"{path}: feature cache shard is damaged ({str(e).splitlines()[0][:60]}); deleting and recomputing it")
            os.remove(path)
            continue
        rows.update({tuple(f): features[i] for i, f in enumerate(files)})
    return rows


@torch.no_grad()
def extract_features(encoder, paths: list[str], image_size: int, cache_dir: str | None, device,
                     batch_size: int = 64, num_workers: int = 2, desc: str = "features"):
    """Features for image files, from the cache where valid, else computed (and cached).

    Returns (features [n_ok, ...] fp16 on CPU, ok: list[bool] per path). Unreadable images are
    skipped with a warning and counted.
    """
    stamps = [file_stamp(p) if os.path.exists(p) else None for p in paths]
    cached, folder = {}, None
    if cache_dir:
        folder = os.path.join(cache_dir, cache_key(encoder, image_size))
        os.makedirs(folder, exist_ok=True)
        cached = _read_shards(folder)
    todo = [i for i, s in enumerate(stamps) if s is None or s not in cached]
    if todo:
        encoder.eval()
        size = input_size(encoder.name, image_size)
        loader = image_loader([paths[i] for i in todo], size, batch_size, num_workers, pin_memory=device.type == "cuda")
        pending_files, pending_feats, shard_id = [], [], len(os.listdir(folder)) if folder else 0
        bad = 0
        amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        for images, good, failed in tqdm(loader, desc=desc, unit="batch", dynamic_ncols=True):
            bad += len(failed)
            if images is None:
                continue
            with amp:
                feats = encoder.extract(images.to(device, non_blocking=True)).half().cpu()   # [b, ...]
            for j, i in enumerate(good):
                cached[stamps[todo[i]]] = feats[j]
                pending_files.append(list(stamps[todo[i]]))
                pending_feats.append(feats[j])
            if folder and len(pending_files) >= SHARD_SIZE:
                shard_id = _write_shard(folder, shard_id, pending_files, pending_feats)
                pending_files, pending_feats = [], []
        if folder and pending_files:
            _write_shard(folder, shard_id, pending_files, pending_feats)
        if bad:
            warn(f"{bad} of {len(paths)} images could not be read and were skipped")
    ok = [s is not None and s in cached for s in stamps]
    if not any(ok):
        raise ValueError(f"none of the {len(paths)} images could be read")
    return torch.stack([cached[s] for s, good in zip(stamps, ok) if good]), ok


def _write_shard(folder: str, shard_id: int, files: list, feats: list) -> int:
    while os.path.exists(os.path.join(folder, f"shard_{shard_id:05d}.pt")):
        shard_id += 1
    atomic_save({"files": files, "features": torch.stack(feats)}, os.path.join(folder, f"shard_{shard_id:05d}.pt"))
    return shard_id + 1
