"""Greedy and beam search, driven through a toy decoder whose next-token scores are fixed tables."""
import pytest
import torch
import torch.nn as nn

from data.vocab import Vocabulary
from models.decoding import beam_search, generate, greedy_decode
from models.decoder_lstm import DecoderRNN


class TableDecoder(nn.Module):
    """Next-token log-probs depend only on the previous token: table[prev] -> [V]."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.log(torch.tensor(table, dtype=torch.float))

    def init_state(self, features):
        return (features.clone(),)

    def step(self, tokens, state):
        return self.table[tokens], state, None


def test_beam_finds_better_sequence_than_greedy():
    # From <start>(1): token 4 (0.6) then only bad continuations; token 5 (0.4) then <end> for sure.
    V = 6
    table = [[1 / V] * V for _ in range(V)]
    table[1] = [0, 0, 0, 0, 0.6, 0.4]
    table[4] = [0, 0, 0.3, 0.0, 0.35, 0.35]
    table[5] = [0, 0, 1.0, 0, 0, 0]
    model = TableDecoder(table)
    features = torch.zeros(2, 1)
    greedy = greedy_decode(model, features, max_len=3)
    beam = beam_search(model, features, beam_size=2, max_len=3, length_penalty=0.0)
    assert greedy[0]["tokens"][:2] == [4, 4]
    assert beam[0]["tokens"] == [5] and beam[1]["tokens"] == [5]
    assert beam[0]["score"] == pytest.approx(torch.log(torch.tensor(0.4)).item(), abs=1e-5)


def test_no_end_returns_best_unfinished_at_max_len():
    table = [[0.0, 0.0, 0.0, 0.7, 0.3] for _ in range(5)]    # <end>(2) has probability 0
    for k in (1, 3):
        result = beam_search(TableDecoder(table), torch.zeros(1, 1), beam_size=k, max_len=4)[0]
        assert result["tokens"] == [3, 3, 3, 3]


def test_max_len_one_and_beam_larger_than_vocab():
    table = [[0.0, 0.0, 0.2, 0.8] for _ in range(4)]
    one = beam_search(TableDecoder(table), torch.zeros(1, 1), beam_size=2, max_len=1)[0]
    assert one["tokens"] == [3]
    wide = beam_search(TableDecoder(table), torch.zeros(2, 1), beam_size=10, max_len=3)
    assert wide[0]["tokens"] == [3, 3, 3] and len(wide[0]["beams"]) <= 10
    assert all(torch.isfinite(torch.tensor(s)) for _, s in wide[0]["beams"])


def test_beam_one_equals_greedy_on_a_real_decoder():
    torch.manual_seed(0)
    model = DecoderRNN(embed_size=8, vocab_size=9, hidden_size=16).eval()
    features = torch.randn(16, 8)
    greedy = greedy_decode(model, features, max_len=7)
    beam = beam_search(model, features, beam_size=1, max_len=7)
    assert [g["tokens"] for g in greedy] == [b["tokens"] for b in beam]


class CountdownDecoder(nn.Module):
    """Row i says word 3 features[i] times, then <end>(2): captions of known, different lengths."""

    def init_state(self, features):
        return (features[:, 0].clone(),)

    def step(self, tokens, state):
        left = state[0] - 1
        logits = torch.zeros(len(left), 5)
        logits[:, 3] = 1.0
        logits[:, 2] = -left                # <end> wins once left < -1; the scores differ from step to step
        return logits, (left,), None


def test_greedy_stops_the_same_however_often_it_checks():
    """On a GPU greedy_decode looks for the end every 4 steps: the captions and scores are those of every step."""
    features = torch.tensor([[0.0], [3.0], [5.0], [9.0]])
    every_step = greedy_decode(CountdownDecoder(), features, max_len=12, stop_check_every=1)
    assert [len(r["tokens"]) for r in every_step] == [0, 3, 5, 9]
    for check_every in (3, 4, 5):
        sparse = greedy_decode(CountdownDecoder(), features, max_len=12, stop_check_every=check_every)
        assert [r["tokens"] for r in sparse] == [r["tokens"] for r in every_step]
        assert [r["score"] for r in sparse] == pytest.approx([r["score"] for r in every_step], abs=1e-6)


def test_batched_beam_equals_one_image_at_a_time():
    torch.manual_seed(1)
    model = DecoderRNN(embed_size=8, vocab_size=9, hidden_size=16).eval()
    features = torch.randn(5, 8)
    together = beam_search(model, features, beam_size=3, max_len=6)
    alone = [beam_search(model, features[i:i + 1], beam_size=3, max_len=6)[0] for i in range(5)]
    assert [r["tokens"] for r in together] == [r["tokens"] for r in alone]
    assert [r["score"] for r in together] == pytest.approx([r["score"] for r in alone], abs=1e-5)


def test_generate_returns_text_and_beams():
    vocab = Vocabulary.build(["big dog", "small cat"])
    torch.manual_seed(2)
    model = DecoderRNN(embed_size=8, vocab_size=len(vocab), hidden_size=16).eval()
    for k in (1, 3):
        results = generate(model, torch.randn(2, 8), vocab, beam_size=k, max_len=5)
        assert all(isinstance(r["caption"], str) and "<" not in r["caption"] for r in results)
        assert 1 <= len(results[0]["beams"]) <= k
