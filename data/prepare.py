"""A config's splits as tensors ready for training: encoded captions and per-image inputs.

Inputs are what the feature cache holds (encoder.trunk's output): the CNN's feature grids when it
is frozen, or the maps that enter its fine-tuned tail. With train.hflip the train split also gets
the inputs of its images mirrored. Under torchrun, each rank first extracts features for its own
share of the images into the shared cache, then all ranks read the whole cache.
"""
import os

import torch
import torch.distributed as dist

from data.features.cache import Loading, extract_features
from data.features.store import FeatureStore
from data.text.captions import load_splits
from utils import UserError


def encode_captions(names, captions, vocab, max_words):
    """All captions of the given images -> (tokens [N,L] padded, lengths [N], image index [N])."""
    rows, image_index = [], []
    for i, name in enumerate(names):
        for caption in captions[name]:
            ids = vocab.encode(caption)
            rows.append(ids[:max_words + 1] + [vocab.end_id] if len(ids) > max_words + 2 else ids)
            image_index.append(i)
    lengths = torch.tensor([len(r) for r in rows])
    tokens = torch.full((len(rows), int(lengths.max())), vocab.pad_id, dtype=torch.long)
    # One copy of all ids, in row order, into the cells they fill: a tensor per row was several times slower.
    tokens[torch.arange(tokens.shape[1]) < lengths[:, None]] = torch.tensor([i for r in rows for i in r])
    return tokens, lengths, torch.tensor(image_index)


def load_inputs(encoder, config, paths, device, desc, mirrored=False):
    """(FeatureStore over the readable images, ok per path): encoder.trunk's output for each image, from the
    cache (train.cache_features) or computed in this run."""
    data, train = config.data, config.train
    cache_dir = train.cache_dir if train.cache_features else None
    if cache_dir and dist.is_initialized() and dist.get_world_size() > 1:
        rank, world = dist.get_rank(), dist.get_world_size()
        extract_features(encoder, paths[rank::world], data.image_size, cache_dir, device,
                         Loading(workers=train.num_workers, desc=f"{desc} (rank {rank} share)"), mirrored)
        dist.barrier()
    # On a GPU, training starts while the new cache shards are still being written (train.py waits for them at
    # its end): the host's cores are idle. On a CPU the writing thread takes cores from training and costs more
    # than it hides (docs/speed.md), so there extraction waits for it.
    return extract_features(encoder, paths, data.image_size, cache_dir, device,
                            Loading(workers=train.num_workers, desc=desc, wait_for_cache=device.type != "cuda"), mirrored)


def prepare_splits(config, vocab, encoder, device, loaded=None):
    """{"train": ..., "val": ... or None}, each with inputs (a FeatureStore), tokens, lengths, image_index,
    names, references. With train.hflip the train split's inputs hold 2N rows: row N + i is image i mirrored.

    loaded: load_splits' (captions, train names, val names) when the caller has them already.
    """
    captions, train_names, val_names = loaded or load_splits(config.data)
    # Both splits' images in one pass: one pipeline and one cache lookup, and no small batch of its own for val.
    both = list(dict.fromkeys(train_names + val_names))
    inputs, ok = load_inputs(encoder, config, [os.path.join(config.data.images, n) for n in both], device,
                             "features")
    row_of = {n: row for row, n in enumerate(n for n, good in zip(both, ok) if good)}
    splits = {}
    for split, names in (("train", train_names), ("val", val_names)):
        names = [n for n in names if n in row_of]
        if not names:
            if split == "train":
                raise UserError(f"none of the {len(train_names)} train images in {config.data.images} "
                                f"could be read; see the warnings above")
            splits[split] = None
            continue
        split_inputs = inputs.subset([row_of[n] for n in names])
        tokens, lengths, image_index = encode_captions(names, captions, vocab, config.data.max_caption_len)
        splits[split] = {"inputs": split_inputs, "tokens": tokens, "lengths": lengths, "image_index": image_index,
                         "names": names, "references": {n: captions[n] for n in names}}
    if config.train.hflip:
        names = splits["train"]["names"]
        mirrored, ok = load_inputs(encoder, config, [os.path.join(config.data.images, n) for n in names],
                                   device, "features, mirrored", mirrored=True)
        if not all(ok):
            raise UserError(f"{ok.count(False)} train images could be read once but not mirrored (e.g. "
                            f"{names[ok.index(False)]}); were they changed meanwhile? run again")
        splits["train"]["inputs"] = FeatureStore.concat(splits["train"]["inputs"], mirrored)
    return splits
