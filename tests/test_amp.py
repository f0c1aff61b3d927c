"""Mixed precision changes results only by numerical noise: fp32 vs bf16 autocast losses on CPU."""
import pytest
import torch

from config import load_config
from models.caption_model import build_model


@pytest.mark.parametrize("decoder", ["lstm", "attention", "transformer", "updown"])
def test_bf16_autocast_loss_matches_fp32(decoder):
    torch.manual_seed(0)
    config = load_config(None, ["model.encoder=resnet18", "model.encoder_weights=none", f"model.decoder={decoder}",
                                "model.embed_size=32", "model.hidden_size=32", "model.attention_size=16",
                                "model.num_heads=4", "model.num_layers=2", "model.dropout=0"])
    model = build_model(config, vocab_size=50).eval()
    grid = torch.randn(4, 4, 512).half()
    captions = torch.tensor([[1, 5, 6, 7, 8, 2], [1, 9, 10, 2, 0, 0], [1, 11, 2, 0, 0, 0], [1, 12, 13, 14, 2, 0]])
    lengths = torch.tensor([6, 4, 3, 5])
    with torch.no_grad():
        fp32, _ = model(grid, captions, lengths)
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                bf16, _ = model(grid, captions, lengths)
        except RuntimeError as e:     # oneDNN without a bf16 LSTM on this CPU; train.py never autocasts on a CPU
            pytest.skip(f"this CPU's oneDNN cannot run the LSTM in bf16 ({str(e).splitlines()[0][:60]})")
    assert bf16.dtype == torch.float32                      # the loss itself is computed in fp32
    assert abs(bf16.item() - fp32.item()) < 0.02 * fp32.item()
    assert not torch.equal(bf16, fp32)                      # autocast really ran in bf16
