"""Tests for models/decoder_updown.py: shapes, forward/step agreement, state reordering, attention maps, overfit."""
import pytest
import torch

from config import ModelConfig
from models.decoder_updown import UpDownDecoder
from tests.conftest import assert_padding_does_not_change_valid_logits, random_caption_batch

C, P, V, START, END = 16, 4, 12, 1, 2


def make_decoder(**kwargs) -> UpDownDecoder:
    torch.manual_seed(0)
    sizes = dict(embed_size=8, hidden_size=32, attention_size=24)
    return UpDownDecoder(C, V, ModelConfig(**{**sizes, **kwargs}))


def make_batch(lengths):
    return random_caption_batch(lengths, P, C, V, START)


def test_shapes_and_batch_first_state():
    decoder = make_decoder()
    features, tokens, lengths = make_batch([5, 3, 4])
    logits, extra_loss = decoder(features, tokens, lengths)
    assert logits.shape == (3, 5, V)
    assert extra_loss.item() == 0.0
    state = decoder.init_state(features)
    assert len(state) == 7 and all(s.size(0) == 3 for s in state)
    step_logits, new_state, alpha = decoder.step(tokens[:, 0], state)
    assert step_logits.shape == (3, V) and alpha.shape == (3, P)
    assert [s.shape for s in new_state] == [s.shape for s in state]
    assert torch.allclose(alpha.sum(1), torch.ones(3))


@pytest.mark.parametrize("lengths", [[4, 4, 4], [2, 5, 1, 3]])
def test_step_reproduces_forward(lengths):
    decoder = make_decoder().eval()
    features, tokens, lengths = make_batch(lengths)
    with torch.no_grad():
        logits, _ = decoder(features, tokens, lengths)
        for i, length in enumerate(lengths.tolist()):
            state = decoder.init_state(features[i:i + 1])
            for t in range(length):
                step_logits, state, _ = decoder.step(tokens[i:i + 1, t], state)
                assert torch.allclose(logits[i, t], step_logits[0], atol=1e-5), (i, t)


def test_padding_tokens_do_not_change_valid_logits():
    decoder = make_decoder().eval()
    assert_padding_does_not_change_valid_logits(decoder, *make_batch([2, 5, 3]))


def test_reordered_state_matches_reordered_batch():
    decoder = make_decoder().eval()
    features, tokens, _ = make_batch([3, 3, 3])
    index = torch.tensor([2, 0, 0, 1])  # reorder and duplicate, as beam search does
    with torch.no_grad():
        state = decoder.init_state(features)
        _, state, _ = decoder.step(tokens[:, 0], state)
        reordered = tuple(s.index_select(0, index) for s in state)
        got_logits, _, got_alpha = decoder.step(tokens[index, 1], reordered)
        direct = decoder.init_state(features[index])
        _, direct, _ = decoder.step(tokens[index, 0], direct)
        want_logits, _, want_alpha = decoder.step(tokens[index, 1], direct)
    assert torch.allclose(got_logits, want_logits, atol=1e-6)
    assert torch.allclose(got_alpha, want_alpha, atol=1e-6)


def test_attention_follows_the_cells():
    """alpha weighs the grid's cells: moving a cell moves its weight with it (what the gallery's heatmaps draw)."""
    decoder = make_decoder().eval()
    features, tokens, _ = make_batch([3])
    flipped = features.flip(1)
    with torch.no_grad():
        _, _, alpha = decoder.step(tokens[:, 0], decoder.init_state(features))
        _, _, flipped_alpha = decoder.step(tokens[:, 0], decoder.init_state(flipped))
    assert torch.allclose(alpha, flipped_alpha.flip(1), atol=1e-6)
    assert not torch.allclose(alpha, torch.full_like(alpha, 1 / P))


def test_bad_feature_dim_is_a_value_error():
    decoder = make_decoder()
    features, tokens, lengths = make_batch([3, 2])
    with pytest.raises(ValueError, match="decoder_updown.py"):
        decoder(features[:, :, :8], tokens, lengths)


def test_overfits_four_captions_and_greedy_decodes_them():
    torch.manual_seed(2)
    decoder = make_decoder(dropout=0.1)
    features = torch.randn(4, P, C)
    captions = torch.tensor([[START, 3, 4, 5, END], [START, 6, 7, 8, END], [START, 9, 10, 11, END],
                             [START, 5, 3, 9, END]])
    inputs, targets, lengths = captions[:, :-1], captions[:, 1:], torch.full((4,), 4)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=3e-3)
    losses = []
    for _ in range(300):
        logits, _ = decoder(features, inputs, lengths)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 20
    decoder.eval()
    with torch.no_grad():
        state, token, decoded = decoder.init_state(features), torch.full((4,), START), []
        for _ in range(captions.size(1) + 2):
            logits, state, _ = decoder.step(token, state)
            token = logits.argmax(1)
            decoded.append(token)
    decoded = torch.stack(decoded, 1)
    for i in range(4):
        words = decoded[i].tolist()
        assert END in words, f"row {i} never ended: {words}"
        assert words[:words.index(END) + 1] == targets[i].tolist()
