"""Mixed precision changes results only by numerical noise: fp32 vs bf16 autocast losses on CPU."""
import pytest
import torch

from config import load_config
from models import build_model


@pytest.mark.parametrize("decoder, gpu_loop", [("lstm", False), ("attention", False), ("attention", True),
                                               ("transformer", False)])
def test_bf16_autocast_loss_matches_fp32(decoder, gpu_loop, monkeypatch):
    torch.manual_seed(0)
    config = load_config(None, ["model.encoder=resnet18", "model.encoder_weights=none", f"model.decoder={decoder}",
                                "model.embed_size=32", "model.hidden_size=32", "model.attention_size=16",
                                "model.num_heads=4", "model.num_layers=2", "model.dropout=0"])
    model = build_model(config, vocab_size=50).eval()
    if gpu_loop:        # the attention decoder's whole-batch loop, which forward() runs on a GPU
        monkeypatch.setattr(model.decoder, "_run_packed", model.decoder._run_full)
    grid = torch.randn(4, 4, 512).half()
    captions = torch.tensor([[1, 5, 6, 7, 8, 2], [1, 9, 10, 2, 0, 0], [1, 11, 2, 0, 0, 0], [1, 12, 13, 14, 2, 0]])
    lengths = torch.tensor([6, 4, 3, 5])
    with torch.no_grad():
        fp32, _ = model(grid, captions, lengths)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16, _ = model(grid, captions, lengths)
    assert bf16.dtype == torch.float32                      # the loss itself is computed in fp32
    assert abs(bf16.item() - fp32.item()) < 0.02 * fp32.item()
    assert not torch.equal(bf16, fp32)                      # autocast really ran in bf16
