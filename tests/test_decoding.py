"""Greedy and beam search, driven through a toy decoder whose next-token scores are fixed tables."""
import pytest
import torch
import torch.nn as nn

from config import DEFAULTS, ModelConfig
from data.text.vocab import Vocabulary
from models.decoder_lstm import DecoderRNN
from models.decoding import (
    DecodeSettings,
    SpecialIds,
    ban_repeated_ngrams,
    beam_search,
    decode_settings,
    describe_decoding,
    follow,
    generate,
    greedy_decode,
    sample_captions,
)


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
    greedy = greedy_decode(model, features, DecodeSettings(max_len=3))
    beam = beam_search(model, features, DecodeSettings(beam_size=2, max_len=3, length_penalty=0.0))
    assert greedy[0]["tokens"][:2] == [4, 4]
    assert beam[0]["tokens"] == [5] and beam[1]["tokens"] == [5]
    assert beam[0]["score"] == pytest.approx(torch.log(torch.tensor(0.4)).item(), abs=1e-5)


def test_no_end_returns_best_unfinished_at_max_len():
    table = [[0.0, 0.0, 0.0, 0.7, 0.3] for _ in range(5)]    # <end>(2) has probability 0
    for k in (1, 3):
        result = beam_search(TableDecoder(table), torch.zeros(1, 1), DecodeSettings(beam_size=k, max_len=4))[0]
        assert result["tokens"] == [3, 3, 3, 3]


def test_max_len_one_and_beam_larger_than_vocab():
    table = [[0.0, 0.0, 0.2, 0.8] for _ in range(4)]
    one = beam_search(TableDecoder(table), torch.zeros(1, 1), DecodeSettings(beam_size=2, max_len=1))[0]
    assert one["tokens"] == [3]
    wide = beam_search(TableDecoder(table), torch.zeros(2, 1), DecodeSettings(beam_size=10, max_len=3))
    assert wide[0]["tokens"] == [3, 3, 3] and len(wide[0]["beams"]) <= 10
    assert all(torch.isfinite(torch.tensor(s)) for _, s in wide[0]["beams"])


def test_beam_one_equals_greedy_on_a_real_decoder():
    torch.manual_seed(0)
    model = DecoderRNN(9, ModelConfig(embed_size=8, hidden_size=16)).eval()
    features = torch.randn(16, 8)
    greedy = greedy_decode(model, features, DecodeSettings(max_len=7))
    beam = beam_search(model, features, DecodeSettings(beam_size=1, max_len=7))
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
    every_step = greedy_decode(CountdownDecoder(), features, DecodeSettings(max_len=12), stop_check_every=1)
    assert [len(r["tokens"]) for r in every_step] == [0, 3, 5, 9]
    for check_every in (3, 4, 5):
        sparse = greedy_decode(CountdownDecoder(), features, DecodeSettings(max_len=12), stop_check_every=check_every)
        assert [r["tokens"] for r in sparse] == [r["tokens"] for r in every_step]
        assert [r["score"] for r in sparse] == pytest.approx([r["score"] for r in every_step], abs=1e-6)


def test_batched_beam_equals_one_image_at_a_time():
    torch.manual_seed(1)
    model = DecoderRNN(9, ModelConfig(embed_size=8, hidden_size=16)).eval()
    features = torch.randn(5, 8)
    together = beam_search(model, features, DecodeSettings(beam_size=3, max_len=6))
    alone = [beam_search(model, features[i:i + 1], DecodeSettings(beam_size=3, max_len=6))[0] for i in range(5)]
    assert [r["tokens"] for r in together] == [r["tokens"] for r in alone]
    assert [r["score"] for r in together] == pytest.approx([r["score"] for r in alone], abs=1e-5)


def test_generate_returns_text_and_beams():
    vocab = Vocabulary.build(["big dog", "small cat"])
    torch.manual_seed(2)
    model = DecoderRNN(len(vocab), ModelConfig(embed_size=8, hidden_size=16)).eval()
    for k in (1, 3):
        results = generate(model, torch.randn(2, 8), vocab, DecodeSettings(beam_size=k, max_len=5))
        assert all(isinstance(r["caption"], str) and "<" not in r["caption"] for r in results)
        assert 1 <= len(results[0]["beams"]) <= k


def test_sampling_with_a_seed_repeats_and_a_cold_temperature_gives_the_greedy_caption():
    torch.manual_seed(0)
    model = DecoderRNN(9, ModelConfig(embed_size=8, hidden_size=16)).eval()
    features = torch.randn(6, 8)

    def draw(seed, temperature=1.0):
        return sample_captions(model, features, 4, DecodeSettings(max_len=7), temperature=temperature,
                               generator=torch.Generator().manual_seed(seed))
    tokens, lengths = draw(1)
    assert tokens.shape[0] == 24 and (tokens[:, 0] == 1).all()        # 4 samples per image, image-major
    again, again_lengths = draw(1)
    assert torch.equal(tokens, again) and torch.equal(lengths, again_lengths)
    assert not torch.equal(tokens, draw(2)[0])
    for row, length in zip(tokens.tolist(), lengths.tolist()):        # after <end> (or max_len): padding only
        assert all(t == 0 for t in row[length:]) and (row[length - 1] == 2 or length == tokens.size(1))
    cold, _ = draw(3, temperature=1e-4)
    greedy = greedy_decode(model, features, DecodeSettings(max_len=7))
    for b, result in enumerate(greedy):
        for k in range(4):
            words = cold[b * 4 + k, 1:].tolist()
            assert words[:len(result["tokens"])] == result["tokens"]


@pytest.mark.parametrize("decoder", ["lstm", "attention", "transformer", "updown"])
def test_every_decoder_samples_through_its_step_interface(decoder):
    from config import load_config
    from models.caption_model import build_model
    torch.manual_seed(0)
    config = load_config(None, ["model.encoder=resnet18", "model.encoder_weights=none", f"model.decoder={decoder}",
                                "model.embed_size=16", "model.hidden_size=16", "model.attention_size=8",
                                "model.num_heads=2", "model.num_layers=1"])
    model = build_model(config, vocab_size=12).eval()
    tokens, lengths = sample_captions(model, torch.randn(3, 4, 512), 2, DecodeSettings(max_len=5))
    assert tokens.shape[0] == 6 and tokens.shape[1] <= 6 and ((lengths >= 2) & (lengths <= tokens.shape[1])).all()
    log_probs = model(torch.randn(3, 4, 512).repeat_interleave(2, 0), tokens, lengths, log_probs=True)
    assert log_probs.shape == (6,) and (log_probs <= 0).all()


def test_generate_never_says_unk_pad_or_start():
    vocab = Vocabulary(["<pad>", "<start>", "<end>", "<unk>", "dog"])
    table = [[0.0] * 5 for _ in range(5)]
    for row in table:                    # <unk> is the likeliest word after anything; then "dog", then <end>
        row[3], row[4], row[2], row[0], row[1] = 0.5, 0.3, 0.1, 0.05, 0.05
    model = TableDecoder(table)
    for beam in (1, 2):
        result = generate(model, torch.zeros(1, 1), vocab, DecodeSettings(beam_size=beam, max_len=3))[0]
        assert "<unk>" not in result["caption"] and result["caption"].split() == ["dog"] * len(result["caption"].split())
    tokens, _ = sample_captions(model, torch.zeros(2, 1), 8, DecodeSettings(max_len=4), SpecialIds.of(vocab))
    words = tokens[:, 1:]
    assert not (words == 1).any() and not (words == 3).any()         # <pad> (0) only follows an <end>


def banned_words(history, n, vocab_size=10):
    logp = torch.zeros(history.size(0), vocab_size)
    ban_repeated_ngrams(logp, history, n)
    return (logp == float("-inf")).nonzero().tolist()


def test_ban_repeated_ngrams_on_a_hand_made_history():
    history = torch.tensor([[5, 6, 7, 9, 5, 6], [1, 2, 3, 4, 5, 6], [5, 5, 5, 5, 5, 5]])
    assert banned_words(history, 3) == [[0, 7], [2, 5]]                  # "5 6" came before 7
    assert banned_words(history, 2) == [[0, 7], [2, 5]]                  # "6" came before 7
    assert [w for row, w in banned_words(history, 1) if row == 1] == [1, 2, 3, 4, 5, 6]
    assert banned_words(history, 0) == []
    assert banned_words(history[:, :2], 3) == []                         # shorter than n


def ngrams(tokens, n):
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def test_no_repeat_ngram_breaks_a_loop_in_greedy_and_beam_search():
    # <start> -> in a red shirt -> in a red shirt ...: after "shirt" the table prefers "in" to <end>.
    vocab = Vocabulary(["<pad>", "<start>", "<end>", "<unk>", "in", "a", "red", "shirt"])
    table = [[0.02] * 8 for _ in range(8)]
    for prev, nxt in ((1, 4), (4, 5), (5, 6), (6, 7), (7, 4)):
        table[prev][nxt] = 0.8
    table[7][2] = 0.15
    model = TableDecoder(table)
    for beam in (1, 3):
        looping = generate(model, torch.zeros(1, 1), vocab, DecodeSettings(beam_size=beam, max_len=12))[0]["tokens"]
        assert len(set(ngrams(looping, 3))) < len(ngrams(looping, 3))               # the loop, unblocked
        for n in (2, 3):
            settings = DecodeSettings(beam_size=beam, max_len=12, no_repeat_ngram=n)
            tokens = generate(model, torch.zeros(1, 1), vocab, settings)[0]["tokens"]
            assert tokens[:4] == [4, 5, 6, 7] and len(set(ngrams(tokens, n))) == len(ngrams(tokens, n))



def test_sampling_never_repeats_an_ngram_when_told_not_to():
    # The loop "in a red shirt in a red shirt ..." is what the table draws most.
    table = [[0.02] * 8 for _ in range(8)]
    for prev, nxt in ((1, 4), (4, 5), (5, 6), (6, 7), (7, 4)):
        table[prev][nxt] = 0.8
    model = TableDecoder(table)
    for n in (1, 2, 3):
        tokens, lengths = sample_captions(model, torch.zeros(4, 1), 8, DecodeSettings(max_len=12, no_repeat_ngram=n),
                                          SpecialIds(banned=(0, 1, 3)), generator=torch.Generator().manual_seed(0))
        for row, length in zip(tokens.tolist(), lengths.tolist()):
            words = row[1:length]
            assert len(set(ngrams(words, n))) == len(ngrams(words, n))


@pytest.mark.parametrize("beam_size", [1, 3])
def test_stepping_along_a_caption_gives_the_score_and_attention_decoding_gave_it(beam_size):
    from models.decoder_attention import AttentionDecoder
    torch.manual_seed(3)
    model = AttentionDecoder(12, 9, ModelConfig(embed_size=8, hidden_size=16, attention_size=8)).eval()
    features = torch.randn(4, 5, 12)
    decoded = (greedy_decode(model, features, DecodeSettings(max_len=6)) if beam_size == 1 else
               beam_search(model, features, DecodeSettings(beam_size, max_len=6, length_penalty=0.7)))
    scores, attention = follow(model, features, [r["tokens"] for r in decoded],
                               DecodeSettings(max_len=6, length_penalty=1.0 if beam_size == 1 else 0.7))
    assert scores == pytest.approx([r["score"] for r in decoded], abs=1e-5)
    for r, alpha in zip(decoded, attention):
        assert (alpha is None) == (not r["tokens"]) and (alpha is None or torch.allclose(alpha, r["attention"], atol=1e-6))


def test_the_decoding_line_names_re_ranking_only_when_it_is_on():
    plain = decode_settings(DEFAULTS.decode)
    assert not any(key.startswith("rerank") for key in plain.to_dict())        # as scores measured before it read
    assert describe_decoding(plain) == describe_decoding(DEFAULTS.decode) == (
        "beam search (beam 3, length penalty 1), no 2-gram said twice, at most 30 words")
    on = decode_settings(DEFAULTS.decode, rerank_samples=20, rerank_temperature=None)
    assert on.to_dict() == {"beam_size": 3, "max_len": 30, "length_penalty": 1.0, "no_repeat_ngram": 2,   # as scores
                            "rerank_samples": 20, "rerank_temperature": 0.7, "rerank_bleu": 0.0}  # record them
    assert describe_decoding(on) == ("beam search (beam 3, length penalty 1), no 2-gram said twice, at most 30 words, "
                                     "consensus re-ranking of the beam + 20 samples at temperature 0.7 (CIDEr-D)")
    mixed = decode_settings(DEFAULTS.decode, beam_size=1, rerank_samples=5, rerank_temperature=1.0, rerank_bleu=0.5)
    assert describe_decoding(mixed).endswith("consensus re-ranking of the greedy caption + 5 samples at temperature 1 "
                                             "(CIDEr-D + 0.5 x BLEU-4)")
    with pytest.raises(ValueError, match=r"^--rerank-temperature: decode.rerank_temperature=0.0 is out of range"):
        decode_settings(DEFAULTS.decode, rerank_samples=5, rerank_temperature=0.0)


def test_beam_search_returns_a_caption_when_every_score_is_nan(capsys):
    from models.decoding import beam_search

    class Broken(torch.nn.Module):
        def init_state(self, features):
            return (features,)

        def step(self, tokens, state):
            return torch.full((len(tokens), 6), float("nan")), state, None

    results = beam_search(Broken(), torch.zeros(2, 3), DecodeSettings(beam_size=3, max_len=4))
    assert len(results) == 2 and all(isinstance(r["tokens"], list) for r in results)
    assert "no hypothesis with a finite score" in capsys.readouterr().err
