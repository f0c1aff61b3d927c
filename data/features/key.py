"""Hashes that say whether stored features still belong to the CNN that would compute them now.

weights_hash names a backbone's weights: the feature cache's key holds it, so new weights never reuse
old features, and an exported checkpoint records it, so the weights a package supplies at load time
are checked to be the ones the model was trained on.
"""
import hashlib
from concurrent.futures import ThreadPoolExecutor

import torch

from data.images.reading import transform_id

HASH_THREADS = 8   # tensors are hashed on this many threads: hashlib lets go of the GIL


def weights_hash(state: dict, label: str) -> str:
    """16 hex digits over a label (the encoder's name) and a state dict's names, dtypes, shapes and bytes
    (on any device)."""
    tensors = [t.detach() for t in state.values()]
    if tensors and tensors[0].device.type != "cpu":       # one copy to the host, not one per tensor
        flat = torch.cat([t.reshape(-1).view(torch.uint8) for t in tensors]).cpu()
        tensors = flat.split([t.numel() * t.element_size() for t in tensors])
    data = [t.contiguous().reshape(-1).view(torch.uint8).numpy() for t in tensors]
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        digests = list(pool.map(lambda d: hashlib.sha1(d).digest(), data))
    layout = "|".join(f"{key}:{t.dtype}:{tuple(t.shape)}" for key, t in state.items())
    return hashlib.sha1(f"{label}|{layout}".encode() + b"".join(digests)).hexdigest()[:16]


def cache_key(encoder, image_size: int, mirrored: bool = False) -> str:
    """The feature cache folder of an encoder: its name, the weights of its trunk (the frozen part), the input
    transform and the stored layout: fp16 grids [P, C], which every decoder reads, or, when the last blocks are
    fine-tuned, the fp16 maps [C, H, W] that enter them."""
    layout = f"trunk-{encoder.tail_blocks}" if encoder.tail_blocks else "grid"
    parts = [encoder.name, encoder.weights_fingerprint(), transform_id(encoder.name, image_size, mirrored), layout, "fp16",
             "row-checksums"]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]
