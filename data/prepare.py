"""A config's splits as tensors ready for training: encoded captions and per-image inputs.

Inputs are the cached CNN feature grids when the encoder is frozen, or resized uint8
images when it is fine-tuned. Under torchrun, each rank first extracts features for its
own share of the images into the shared cache, then all ranks read the whole cache.
"""
import os

import torch
import torch.distributed as dist
from tqdm import tqdm

from data.captions import load_splits
from data.feature_store import FeatureStore
from data.features import extract_features
from data.images import image_loader, input_size


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


def load_inputs(encoder, config, paths, device, desc, show_progress=True):
    """(FeatureStore over the readable images, ok per path): cached feature grids, or uint8 images when
    fine-tuning."""
    data, train = config["data"], config["train"]
    if train["fine_tune_encoder"]:
        images, ok = [], [False] * len(paths)
        loader = image_loader(paths, input_size(encoder.name, data["image_size"]), 64, train["num_workers"])
        for batch, good, _ in tqdm(loader, desc=desc, unit="batch", disable=not show_progress):
            if batch is not None:
                images.append(batch)
                for i in good:
                    ok[i] = True
        if not images:
            raise ValueError(f"none of the {len(paths)} images could be read")
        return FeatureStore.of(torch.cat(images)), ok
    cache_dir = train["cache_dir"] if train["cache_features"] else None
    if cache_dir and dist.is_initialized() and dist.get_world_size() > 1:
        rank, world = dist.get_rank(), dist.get_world_size()
        extract_features(encoder, paths[rank::world], data["image_size"], cache_dir, device,
                         num_workers=train["num_workers"], desc=f"{desc} (rank {rank} share)")
        dist.barrier()
    # On a GPU, training starts while the new cache shards are still being written (train.py waits for them at
    # its end): the host's cores are idle. On a CPU the writing thread takes cores from training and costs more
    # than it hides (docs/speed.md), so there extraction waits for it.
    return extract_features(encoder, paths, data["image_size"], cache_dir, device, num_workers=train["num_workers"],
                            desc=desc, wait_for_cache=device.type != "cuda")


def prepare_splits(config, vocab, encoder, device, show_progress=True, loaded=None):
    """{"train": ..., "val": ... or None}, each with inputs (a FeatureStore), tokens, lengths, image_index,
    names, references.

    loaded: load_splits' (captions, train names, val names) when the caller has them already.
    """
    captions, train_names, val_names = loaded or load_splits(config["data"])
    # Both splits' images in one pass: one pipeline and one cache lookup, and no small batch of its own for val.
    both = list(dict.fromkeys(train_names + val_names))
    inputs, ok = load_inputs(encoder, config, [os.path.join(config["data"]["images"], n) for n in both], device,
                             "features", show_progress)
    row_of = {n: row for row, n in enumerate(n for n, good in zip(both, ok) if good)}
    splits = {}
    for split, names in (("train", train_names), ("val", val_names)):
        names = [n for n in names if n in row_of]
        if not names:
            if split == "train":
                raise ValueError(f"none of the {len(train_names)} train images in {config['data']['images']} "
                                 f"could be read; see the warnings above")
            splits[split] = None
            continue
        split_inputs = inputs.subset([row_of[n] for n in names])
        tokens, lengths, image_index = encode_captions(names, captions, vocab, config["data"]["max_caption_len"])
        splits[split] = {"inputs": split_inputs, "tokens": tokens, "lengths": lengths, "image_index": image_index,
                         "names": names, "references": {n: captions[n] for n in names}}
    return splits
