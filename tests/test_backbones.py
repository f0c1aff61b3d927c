"""models/backbones.py: the encoder table agrees with the backbones it builds, and each reads a local weights file
named as its source names it."""
import pytest
import torch

from config import ENCODERS
from models.backbones import build_backbone
from models.encoder import EncoderCNN


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "efficientnet_lite2"])
def test_each_rows_feature_size_is_what_its_backbone_gives(name):
    backbone = build_backbone(name, "none").eval()
    with torch.no_grad():
        final = backbone.trunk(torch.zeros(1, 3, 64, 64))
    assert final.shape[1] == ENCODERS[name].feature_dim == EncoderCNN(name, "none", 8, spatial=True).feature_dim


def test_efficientnet_lite2_reads_a_local_weights_file_in_its_packages_names(tmp_path):
    torch.manual_seed(0)
    state = build_backbone("efficientnet_lite2", "none").net.state_dict()
    state["_fc.weight"], state["_fc.bias"] = torch.zeros(1000, 1280), torch.zeros(1000)     # the classifier: unused
    torch.save(state, tmp_path / "lite2.pth")
    enc = EncoderCNN("efficientnet_lite2", str(tmp_path / "lite2.pth"), 8, spatial=True)
    assert torch.equal(enc.backbone.net._conv_stem.weight, state["_conv_stem.weight"])
    torch.save(build_backbone("resnet18", "none").state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(ValueError, match=r"resnet18\.pth: not a efficientnet_lite2 state dict \(missing _conv_stem"):
        EncoderCNN("efficientnet_lite2", str(tmp_path / "resnet18.pth"), 8, spatial=True)
    with pytest.raises(ValueError, match=r"no such file; give a state dict of efficientnet_lite2 \(named as efficientnet-lite-pytorch"):
        EncoderCNN("efficientnet_lite2", str(tmp_path / "missing.pth"), 8, spatial=True)
