"""models/consensus.py: the candidate most like the others wins; generate re-ranks deterministically."""
import numpy as np
import pytest
import torch
from pycocoevalcap.cider.cider_scorer import cook_test

from config import load_config
from data.text.vocab import Vocabulary, tokenize
from evaluation.cider import CiderD, CiderVectors, document_frequencies
from evaluation.metrics import smoothed_bleu4
from models.caption_model import build_model
from models.consensus import rerank
from models.decoding import DecodeSettings, SpecialIds, consensus_candidates, generate
from utils import UserError

TRAINING = [["a dog runs on the grass", "a brown dog running on grass", "the dog is running outside"],
            ["a man rides a bike on the street", "a person on a bicycle", "man riding a bike down the street"],
            ["two kids play in the water", "children splash in a pool", "two children in the water"],
            ["a dog in the water", "a wet dog swims", "a black dog is swimming in a lake"],
            ["a cat sleeps on a bed", "a cat on the grass", "a kitten sleeping"]]


def training_cider(documents=TRAINING):
    return CiderVectors(document_frequencies(documents), len(documents))


def test_the_candidate_most_like_the_others_wins_and_duplicates_count_once():
    centre, one_off, other_off, odd = ("a dog runs on the grass", "a dog runs on grass", "the dog runs on the grass",
                                       "a cat sleeps on a bed")
    ranked = rerank([odd, one_off, centre, other_off, odd, odd], training_cider())
    assert [i for i, _ in ranked][0] == 2 and [i for i, _ in ranked][-1] == 0      # the odd one out comes last
    assert len(ranked) == 4 and sorted(i for i, _ in ranked) == [0, 1, 2, 3]      # its repeats are scored once
    assert all(a >= b for (_, a), (_, b) in zip(ranked, ranked[1:]))
    assert rerank(["a dog", "a dog"], training_cider()) == [(0, 0.0)]               # one distinct caption


def test_utilities_equal_cider_d_of_each_candidate_against_the_others():
    """The slow way: evaluation.cider.CiderD, its frequencies taken from the same training captions, scoring each
    candidate against a reference set made of the other candidates."""
    candidates = ["a dog runs on the grass", "a brown dog running", "a dog is running in the water",
                  "two dogs play", "a dog runs on the grass outside"]
    slow = CiderD({str(i): captions for i, captions in enumerate(TRAINING)}, with_end=False)
    expected = []
    for i, candidate in enumerate(candidates):
        slow.references["others"] = [slow._vector(cook_test(c)) for j, c in enumerate(candidates) if j != i]
        expected.append(slow.score([candidate], ["others"])[0])
    ranked = rerank(candidates, training_cider())
    found = [utility for _, utility in sorted(ranked)]
    assert np.allclose(found, expected, rtol=1e-12, atol=1e-12)
    assert ranked[0][0] == int(np.argmax(expected))


def test_the_bleu_term_adds_each_candidates_smoothed_bleu4_against_the_others():
    candidates = ["a dog runs on the grass", "a dog runs", "a dog in the water", "a dog runs on the grass"]
    cider_only = dict(rerank(candidates, training_cider()))
    mixed = dict(rerank(candidates, training_cider(), bleu_weight=0.5))
    distinct = candidates[:3]
    for i, caption in enumerate(distinct):
        bleu = smoothed_bleu4(caption, distinct[:i] + distinct[i + 1:])
        assert 0 < bleu <= 1 and mixed[i] == pytest.approx(cider_only[i] + 0.5 * bleu, abs=1e-12)
    assert smoothed_bleu4("a dog runs", ["a dog runs"]) == pytest.approx(1.0)
    assert smoothed_bleu4("two cats", ["a dog runs"]) == 0.0


def tiny_model(decoder: str, vocab_size: int):
    torch.manual_seed(0)
    config = load_config(None, ["model.encoder=resnet18", "model.encoder_weights=none", f"model.decoder={decoder}",
                                "model.embed_size=16", "model.hidden_size=16", "model.attention_size=8"])
    return build_model(config, vocab_size).eval()


@pytest.mark.parametrize("decoder", ["lstm", "attention"])
@pytest.mark.parametrize("beam_size", [1, 3])
def test_generate_re_ranks_into_valid_captions_and_repeats_itself(decoder, beam_size):
    vocab = Vocabulary.build([c for captions in TRAINING for c in captions])
    model, features = tiny_model(decoder, len(vocab)), torch.randn(3, 4, 512)
    cider = training_cider([[" ".join(tokenize(c)) for c in captions] for captions in TRAINING])
    settings = DecodeSettings(beam_size=beam_size, max_len=8, no_repeat_ngram=2, rerank_samples=6,
                              rerank_temperature=1.0, rerank_cider=cider)
    results = generate(model, features, vocab, settings)
    for result, again in zip(results, generate(model, features, vocab, settings)):   # the same captions, again
        attention, again_attention = result.pop("attention"), again.pop("attention")
        assert result == again and (attention is again_attention is None or torch.equal(attention, again_attention))
        result["attention"] = attention
    plain = generate(model, features, vocab, DecodeSettings(beam_size=beam_size, max_len=8, no_repeat_ngram=2))
    for result, alone in zip(results, plain):
        assert result.keys() == alone.keys() and result["beams"] == alone["beams"]
        words = result["caption"].split()
        assert result["tokens"] == [vocab.stoi[w] for w in words] and all(t > vocab.unk_id for t in result["tokens"])
        assert len(set(zip(words, words[1:]))) == max(len(words) - 1, 0) and np.isfinite(result["score"])
        if decoder == "attention" and words:
            assert result["attention"].shape == (len(words), 4)
        else:
            assert result["attention"] is None
    results_beams = [[(vocab.encode(c)[1:-1], s) for c, s in r["beams"]] for r in plain]
    candidates = consensus_candidates(model, features, [{"beams": b} for b in results_beams], settings,
                                      SpecialIds.of(vocab))
    for result, theirs in zip(results, candidates):
        assert result["tokens"] == theirs[rerank([vocab.decode(t) for t in theirs], cider)[0][0]]


def test_without_frequencies_generate_says_what_is_missing():
    vocab = Vocabulary.build(["a dog"])
    with pytest.raises(UserError, match="re-ranking needs the training captions' document frequencies"):
        generate(tiny_model("lstm", len(vocab)), torch.randn(1, 4, 512), vocab, DecodeSettings(rerank_samples=2))
