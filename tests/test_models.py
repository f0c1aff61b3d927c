import threading
import time

import pytest
import torch

from config import ModelConfig, load_config
from models.caption_model import build_model
from models.decoder_lstm import DecoderRNN
from models.encoder import EncoderCNN


def test_encoder_shapes_frozen_and_batchnorm_eval():
    enc = EncoderCNN("resnet18", "none", embed_size=16, spatial=False)
    grid = enc.extract(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    assert grid.shape == (2, 4, 512)                                  # 64px / 32 = 2x2 cells
    assert enc.project(grid).shape == (2, 16)
    assert not any(p.requires_grad for p in enc.backbone.parameters())
    enc.train()
    assert not enc.backbone.training and enc.embed.training


def test_threads_wait_for_the_one_move_to_channels_last(monkeypatch):
    """The web demo captions each visitor's upload in its own thread. The first CPU call moves the weights to
    channels_last, which swaps their storage: a convolution in another thread meanwhile read freed memory
    and crashed the server. Slow the move down and check no thread runs the CNN while it is under way."""
    enc = EncoderCNN("resnet18", "none", embed_size=16, spatial=True)
    moving, moves, ran_during_move = threading.Event(), [], []
    move, run = enc.backbone.to, enc._trunk

    apart = threading.Lock()       # the test's own: move and CNN never overlap, so a regression fails, not crashes

    def slow_move(*args, **kwargs):
        moves.append(1)
        moving.set()
        time.sleep(0.3)                       # wide enough for the other threads to arrive
        with apart:
            out = move(*args, **kwargs)
        moving.clear()
        return out

    def watched_run(*args, **kwargs):
        ran_during_move.append(moving.is_set())
        with apart:
            return run(*args, **kwargs)

    monkeypatch.setattr(enc.backbone, "to", slow_move)
    monkeypatch.setattr(enc, "_trunk", watched_run)
    start, grids = threading.Barrier(4), []

    def caption_one():
        start.wait()
        grids.append(enc.extract(torch.zeros(1, 3, 64, 64, dtype=torch.uint8)).shape)

    threads = [threading.Thread(target=caption_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(moves) == 1 and len(ran_during_move) == 4 and not any(ran_during_move)
    assert grids == [(1, 4, 512)] * 4
    assert enc.backbone[0].weight.is_contiguous(memory_format=torch.channels_last)    # the first conv, moved


def test_fine_tuned_tail_is_the_last_blocks_and_keeps_batchnorm_statistics():
    enc = EncoderCNN("resnet18", "none", embed_size=16, spatial=False, tail_blocks=3)
    trainable = {".".join(n.split(".")[1:3]) for n, p in enc.named_parameters() if p.requires_grad and n.startswith("backbone")}
    assert trainable == {"6.1", "7.0", "7.1"}                  # ResNet-18's last 3 of 8 blocks: layer3's last, layer4
    assert enc.tail_keys() == {k for k in enc.backbone.state_dict() if k.startswith(("6.1.", "7."))}
    enc.train()
    assert not enc.backbone.training and not enc.backbone[7].training and enc.embed.training
    with pytest.raises(ValueError, match="resnet18 has 8 blocks"):
        EncoderCNN("resnet18", "none", embed_size=16, spatial=False, tail_blocks=9)


def test_resnet50_feature_dim_and_local_weights(tmp_path):
    import torchvision
    state = torchvision.models.resnet50().state_dict()
    torch.save(state, tmp_path / "r50.pth")
    enc = EncoderCNN("resnet50", str(tmp_path / "r50.pth"), 256, spatial=False)
    assert enc.feature_dim == 2048 and torch.equal(enc.backbone[0].weight, state["conv1.weight"])
    with pytest.raises(ValueError, match="no such file"):
        EncoderCNN("resnet50", str(tmp_path / "missing.pth"), 256, spatial=False)


def test_lstm_decoder_shapes_and_step_matches_forward():
    torch.manual_seed(0)
    dec = DecoderRNN(11, ModelConfig(embed_size=8, hidden_size=12)).eval()
    features, tokens = torch.randn(3, 8), torch.randint(4, 11, (3, 5))
    lengths = torch.tensor([5, 3, 4])
    logits, extra = dec(features, tokens, lengths)
    assert logits.shape == (3, 5, 11) and extra.item() == 0
    state = dec.init_state(features)
    assert all(s.size(0) == 3 for s in state)
    for t in range(5):
        step_logits, state, alpha = dec.step(tokens[:, t], state)
        assert alpha is None
        for b in range(3):
            if t < lengths[b]:
                assert torch.allclose(step_logits[b], logits[b, t], atol=1e-5)


@pytest.mark.parametrize("decoder", ["lstm", "attention", "updown"])
def test_build_model_loss_backward(decoder):
    config = load_config(None, ["model.encoder=resnet18", "model.encoder_weights=none", f"model.decoder={decoder}",
                                "model.embed_size=16", "model.hidden_size=16", "model.attention_size=8"])
    model = build_model(config, vocab_size=20)
    grid = torch.randn(2, 4, 512).half()
    captions = torch.tensor([[1, 5, 6, 7, 2], [1, 8, 2, 0, 0]])
    loss, extra = model(grid, captions, torch.tensor([5, 3]))
    (loss + extra).backward()
    assert loss.item() > 0 and model.decoder.fc.weight.grad is not None
    with pytest.raises(ValueError, match="model.decoder"):
        build_model(load_config(None, ["model.decoder=gru"]), 20)


@pytest.mark.parametrize("name, tail", [("resnet18", 3), ("efficientnet_lite2", 6)])
def test_tail_of_trunk_is_the_whole_cnn_and_only_the_tail_gets_gradients(name, tail):
    torch.manual_seed(0)
    frozen = EncoderCNN(name, "none", embed_size=16, spatial=True).eval()
    tuned = EncoderCNN(name, "none", embed_size=16, spatial=True, tail_blocks=tail).eval()
    tuned.load_state_dict(frozen.state_dict())
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        whole = frozen.extract(images)
        stored = tuned.trunk(images)
    assert stored.dim() == 4 and whole.dim() == 3                      # a map [B,C,H,W] enters the tail; grids leave
    assert torch.allclose(tuned.tail(stored), whole, atol=1e-4)
    assert torch.allclose(tuned.tail(stored.half()), whole, atol=0.05 * whole.abs().max().item())   # the fp16 cache
    tuned.train()
    tuned.tail(stored.half()).square().mean().backward()
    tail = {id(p) for p in tuned.tail_parameters()}
    assert tail and all(p.grad is not None and p.grad.abs().sum() > 0 for p in tuned.tail_parameters())
    assert all(p.grad is None for p in tuned.backbone.parameters() if id(p) not in tail)
    assert set(tuned.trunk_state()) | tuned.tail_keys() == set(tuned.backbone.state_dict())
    assert tuned.weights_fingerprint() != frozen.weights_fingerprint()    # the trunk's hash: fewer weights
