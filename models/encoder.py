"""EncoderCNN: a pretrained CNN without its classifier, cut into a frozen trunk and a trainable tail.

The trunk turns images into what the feature cache stores, so it runs once per image, ever: the
whole backbone's grid of features when the CNN is frozen, or the map entering the last
`tail_blocks` blocks when those are fine-tuned (train.fine_tune_encoder). The tail and the small
trainable part after it (`project`) run in every training step.

    stored = encoder.trunk(images)       # uint8 [B,3,S,S] -> what the cache holds for each image
    grid = encoder.tail(stored)          # -> [B,P,C], what every decoder reads (stored itself when frozen)
    grid = encoder.extract(images)       # both at once
"""
import os
import threading

import torch
import torch.nn as nn

from config import ENCODERS
from data.features.key import weights_hash
from models.backbones import build_backbone
from utils import UserError

CPU_CHUNK = 4       # images per CNN call on a CPU (see EncoderCNN.trunk)
# Moving the weights to channels_last swaps each parameter's storage. A convolution running in another thread
# (the web demo captions every visitor's upload in its own thread) would read freed memory, so the move holds
# this lock and no thread passes it before the move is done. One lock for all encoders: a module holding a
# lock could not be deep-copied.
_LAYOUT_LOCK = threading.Lock()


class EncoderCNN(nn.Module):
    """Backbone (frozen but for its last tail_blocks blocks) plus, for the pooled LSTM path, Linear(C->embed)
    and BatchNorm."""

    def __init__(self, name: str, weights: str, embed_size: int, spatial: bool, tail_blocks: int = 0):
        """name: a row of config.ENCODERS; weights: imagenet, none, or a local state dict file."""
        super().__init__()
        self.name, self.spatial = name, spatial
        self._fingerprint = (None, None)    # (weights' identity stamp, hash): see weights_fingerprint
        self._channels_last = False         # whether the backbone's weights are in channels_last (see trunk)
        self.backbone = build_backbone(name, weights)
        row = ENCODERS[name]                # build_backbone has checked the name
        self.feature_dim = row.feature_dim
        if not 0 <= tail_blocks <= self.backbone.n_blocks:
            raise UserError(f"train.fine_tune_encoder={tail_blocks}: {name} has {self.backbone.n_blocks} blocks; "
                            f"give how many of the last ones train, from 0 (frozen) to {self.backbone.n_blocks}")
        self.tail_blocks = tail_blocks
        if weights not in ("imagenet", "none"):
            self._load_local(weights)
        self.register_buffer("mean", torch.tensor(row.mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(row.std).view(1, 3, 1, 1) * 255, persistent=False)
        for p in self.backbone.parameters():
            p.requires_grad = False
        for p in self.tail_parameters():
            p.requires_grad = True
        if not spatial:
            self.embed = nn.Sequential(nn.Linear(self.feature_dim, embed_size), nn.BatchNorm1d(embed_size))

    def _load_local(self, path: str) -> None:
        """model.encoder_weights=path: a state dict named as the backbone's source names it (backbone.load_file)."""
        if not os.path.isfile(path):
            raise UserError(f"model.encoder_weights={path}: no such file; give a state dict of {self.name} (named as "
                            f"{self.backbone.weights_source} names its weights), or imagenet, or none")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"{path}: not a loadable state dict ({str(e).splitlines()[0][:100]})") from None
        missing = self.backbone.load_file(state)
        if missing:
            raise UserError(f"{path}: not a {self.name} state dict (missing {missing[0]} and {len(missing) - 1} more)")

    def tail_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.backbone.tail_modules(self.tail_blocks) for p in m.parameters()]

    def tail_keys(self) -> set[str]:
        """The backbone.state_dict() keys of the tail: what a fine-tuned model ships beside its decoder."""
        tail = {id(t) for m in self.backbone.tail_modules(self.tail_blocks) for t in m.state_dict(keep_vars=True).values()}
        return {k for k, t in self.backbone.state_dict(keep_vars=True).items() if id(t) in tail}

    def trunk_state(self) -> dict:
        """The frozen part's weights: backbone.state_dict() without the tail."""
        tail = self.tail_keys()
        return {k: v for k, v in self.backbone.state_dict().items() if k not in tail}

    def train(self, mode: bool = True):
        super().train(mode)
        # The whole backbone keeps its ImageNet BatchNorm statistics (and EfficientNet its drop-connect off), the
        # fine-tuned tail too: a step's few images are too few to estimate them, and the cache's trunk was
        # computed in eval mode.
        self.backbone.eval()
        return self

    def _to_channels_last(self) -> None:
        if not self._channels_last:
            with _LAYOUT_LOCK:
                if not self._channels_last:                  # another thread may have moved them meanwhile
                    with torch.inference_mode(False), torch.no_grad():   # ordinary tensors, even under it
                        self.backbone.to(memory_format=torch.channels_last)   # once: the weights too
                    self._channels_last = True

    def trunk(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images [B,3,S,S] -> what the feature cache stores: the grid [B,P,C] (P = H*W) when the CNN is
        frozen, else the map [B,C,H,W] that enters the tail.

        On a CPU the CNN runs CPU_CHUNK images at a time, in channels_last: a few images' activations stay in
        the CPU's caches, and a batch of 16 at once ran several times slower per image (docs/speed.md)."""
        if images.device.type == "cpu":
            self._to_channels_last()
            return torch.cat([self._trunk(chunk, channels_last=True) for chunk in images.split(CPU_CHUNK)])
        # On CUDA channels_last feeds the bf16 tensor cores; in fp32 (small batches) it only costs layout changes.
        return self._trunk(images, channels_last=torch.is_autocast_enabled())

    def _trunk(self, images: torch.Tensor, channels_last: bool) -> torch.Tensor:
        x = (images.float() - self.mean) / self.std
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.backbone.trunk(x, self.tail_blocks)
        return x if self.tail_blocks else _grid(x)

    def tail(self, stored: torch.Tensor) -> torch.Tensor:
        """What trunk() gives (from the cache, often fp16) -> the grid [B,P,C]: the fine-tuned blocks run here."""
        return self.tail_from(stored, self.tail_blocks)

    def tail_from(self, stored: torch.Tensor, blocks: int) -> torch.Tensor:
        """The map entering the last `blocks` blocks (at least tail_blocks; a model of an ensemble whose trunk is cut
        earlier runs the frozen blocks between) -> the grid [B,P,C]."""
        if not blocks:
            return stored
        x = stored.float()
        if x.device.type == "cpu":
            self._to_channels_last()
            x = x.contiguous(memory_format=torch.channels_last)
        return _grid(self.backbone.tail(x, blocks))

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images [B,3,S,S] -> the grid [B,P,C] that every decoder reads."""
        return self.tail(self.trunk(images))

    def project(self, grid: torch.Tensor) -> torch.Tensor:
        """Grid [B,P,C] -> decoder input: the grid itself (attention), or mean-pooled [B,C] -> [B,embed] (LSTM)."""
        grid = grid.float()
        return grid if self.spatial else self.embed(grid.mean(dim=1))

    def weights_fingerprint(self, host_copy: dict | None = None) -> str:
        """data.features.key.weights_hash of the trunk's weights (the whole backbone's when frozen): they never change
        while a model trains, and they are what a package supplies at load time. Remembered until a tensor is
        replaced or written to in place (which bumps its version counter). host_copy: trunk_state() already
        copied to the CPU (train.py keeps one for its checkpoints), hashed instead of copying again."""
        weights = self.trunk_state()
        stamp = tuple((t.data_ptr(), t._version) for t in weights.values())
        if self._fingerprint[0] != stamp:
            self._fingerprint = stamp, weights_hash(host_copy or weights, self.name)
        return self._fingerprint[1]


def _grid(feature_map: torch.Tensor) -> torch.Tensor:
    return feature_map.flatten(2).transpose(1, 2)      # [B,C,H,W] -> [B,H*W,C]
