"""Tests for models/decoder_transformer.py: shapes, tying, cached vs uncached decoding, causality,
state reordering, decoding.py integration, input errors, overfit."""
import pytest
import torch

from config import ModelConfig
from models.decoder_transformer import TransformerDecoder
from models.decoding import DecodeSettings, SpecialIds, beam_search, greedy_decode
from tests.conftest import assert_padding_does_not_change_valid_logits, random_caption_batch

C, P, V, START, END = 16, 9, 12, 1, 2   # a 3x3 grid
IDS = SpecialIds(start=START, end=END)


@pytest.fixture(autouse=True)
def one_thread():
    """Tensors this small run fastest on one thread; extra threads only contend on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_decoder(**kwargs) -> TransformerDecoder:
    torch.manual_seed(0)
    sizes = dict(embed_size=16, num_layers=2, num_heads=4, dropout=0.1)
    return TransformerDecoder(C, V, ModelConfig(**{**sizes, **kwargs}), max_len=16)


def make_batch(lengths):
    return random_caption_batch(lengths, P, C, V, START)


def cached_logits(decoder, features, tokens):
    """Teacher-forced step() over the whole batch -> logits [B,T,V]."""
    state = decoder.init_state(features)
    logits = []
    for t in range(tokens.size(1)):
        step_logits, state, _ = decoder.step(tokens[:, t], state)
        logits.append(step_logits)
    return torch.stack(logits, dim=1)


def uncached_greedy(decoder, features, steps):
    """Greedy decoding that reruns forward() on the whole prefix at every step -> tokens [B,steps]."""
    prefix = torch.full((features.size(0), 1), START)
    for _ in range(steps):
        logits, _ = decoder(features, prefix, torch.full((features.size(0),), prefix.size(1)))
        prefix = torch.cat([prefix, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return prefix[:, 1:]


def test_shapes_batch_first_state_and_tied_output():
    decoder = make_decoder()
    features, tokens, lengths = make_batch([5, 3, 4])
    logits, extra_loss = decoder(features, tokens, lengths)
    assert logits.shape == (3, 5, V)
    assert extra_loss.dim() == 0 and extra_loss.item() == 0
    state = decoder.init_state(features)
    assert len(state) == 1 + 4 * 2 and all(s.size(0) == 3 for s in state)
    step_logits, new_state, attention = decoder.step(tokens[:, 0], state)
    assert step_logits.shape == (3, V) and attention.shape == (3, P)
    assert torch.allclose(attention.sum(1), torch.ones(3))
    assert all(s.size(0) == 3 for s in new_state)
    assert new_state[0].tolist() == [1, 1, 1]
    assert new_state[1].shape == (3, 4, 1, 4) and new_state[3].shape == (3, 4, P, 4)   # self cache grew by one
    assert decoder.fc.weight is decoder.embedding.weight


@pytest.mark.parametrize("lengths", [[4, 4, 4], [2, 5, 1, 3]])
def test_cached_steps_reproduce_forward(lengths):
    decoder = make_decoder().eval()
    features, tokens, lengths = make_batch(lengths)
    with torch.no_grad():
        logits, _ = decoder(features, tokens, lengths)
        stepped = cached_logits(decoder, features, tokens)
    for i, length in enumerate(lengths.tolist()):
        assert torch.allclose(logits[i, :length], stepped[i, :length], atol=1e-5)


def test_cached_and_uncached_greedy_give_the_same_tokens():
    decoder = make_decoder(dropout=0.0).eval()
    with torch.no_grad():   # larger weights than the 0.02 init, so different inputs give clearly different words
        for p in decoder.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5)
    features = torch.randn(6, P, C)
    steps = 10
    expected = uncached_greedy(decoder, features, steps).tolist()
    results = greedy_decode(decoder, features, DecodeSettings(max_len=steps), IDS)
    assert len({tuple(row) for row in expected}) > 1
    for row, result in zip(expected, results):
        n = row.index(END) if END in row else steps
        assert result["tokens"] == row[:n]
        if n:
            assert result["attention"].shape == (n, P)


def test_later_and_padding_tokens_do_not_change_earlier_logits():
    decoder = make_decoder().eval()
    features, tokens, lengths = make_batch([5, 5, 5])
    changed = tokens.clone()
    changed[:, 3] = (changed[:, 3] + 1 - 3) % (V - 3) + 3
    with torch.no_grad():
        a, _ = decoder(features, tokens, lengths)
        b, _ = decoder(features, changed, lengths)
    assert torch.allclose(a[:, :3], b[:, :3], atol=1e-6)
    assert not torch.allclose(a[:, 3], b[:, 3], atol=1e-6)   # the change is visible where it should be

    assert_padding_does_not_change_valid_logits(decoder, *make_batch([2, 5, 3]))


def test_index_select_on_state_equals_running_the_reordered_batch():
    decoder = make_decoder().eval()
    features, tokens, _ = make_batch([4, 4, 4])
    order = torch.tensor([2, 0, 0, 1])
    with torch.no_grad():
        state = decoder.init_state(features)
        for t in range(2):
            _, state, _ = decoder.step(tokens[:, t], state)
        state = tuple(s.index_select(0, order) for s in state)
        logits, _, attention = decoder.step(tokens[order, 2], state)
        expected = cached_logits(decoder, features[order], tokens[order, :3])[:, 2]
    assert torch.allclose(logits, expected, atol=1e-5)
    assert torch.allclose(attention[1], attention[2])


def test_drives_beam_search_and_beam_one_equals_greedy():
    decoder = make_decoder().eval()
    features = torch.randn(3, P, C)
    greedy = greedy_decode(decoder, features, DecodeSettings(max_len=6), IDS)
    beam_one = beam_search(decoder, features, DecodeSettings(beam_size=1, max_len=6), IDS)
    beams = beam_search(decoder, features, DecodeSettings(beam_size=3, max_len=6), IDS)
    assert [r["tokens"] for r in beam_one] == [r["tokens"] for r in greedy]
    for r in beams:
        assert 1 <= len(r["beams"]) <= 3 and len(r["tokens"]) <= 6
        if r["tokens"]:
            assert r["attention"].shape == (len(r["tokens"]), P)


def test_user_errors_are_value_errors():
    decoder = make_decoder()
    features, tokens, lengths = make_batch([3, 3])
    with pytest.raises(ValueError, match="not a square"):
        decoder(torch.randn(2, 8, C), tokens, lengths)
    with pytest.raises(ValueError, match="max_len"):
        long = torch.full((2, 17), START)
        decoder(features, long, torch.tensor([17, 17]))
    with pytest.raises(ValueError, match="num_heads"):
        TransformerDecoder(C, V, ModelConfig(embed_size=10, num_layers=1, num_heads=4))
    state = decoder.init_state(features)
    with pytest.raises(ValueError, match="decode.max_len"):
        for _ in range(17):
            _, state, _ = decoder.step(tokens[:, 0], state)


def test_overfits_four_captions():
    decoder = make_decoder(dropout=0.0)
    torch.manual_seed(2)
    features = torch.randn(4, P, C)
    words = torch.stack([torch.randperm(V - 3)[:5] + 3 for _ in range(4)])              # [4,5] words 3..V-1
    captions = torch.cat([torch.full((4, 1), START), words, torch.full((4, 1), END)], 1)  # [4,7]
    lengths = torch.full((4,), 6)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=3e-3)
    losses = []
    for _ in range(200):
        logits, _ = decoder(features, captions[:, :-1], lengths)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), captions[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0]
    decoder.eval()
    results = greedy_decode(decoder, features, DecodeSettings(max_len=8), IDS)
    assert [r["tokens"] for r in results] == words.tolist()
