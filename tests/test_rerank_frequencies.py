"""models/rerank_frequencies.py: the compact training-caption frequencies score as the full table; a checkpoint's
frequencies come from its file or its data."""
import io

import numpy as np
import pytest
import torch

from config import DEFAULTS, merge
from data.text.captions import load_splits
from data.text.vocab import Vocabulary, tokenize
from evaluation.cider import CiderVectors, document_frequencies
from models.checkpoint import load_checkpoint
from models.rerank_frequencies import count_frequencies, rerank_cider, unpack_frequencies
from tests.test_consensus import TRAINING
from utils import UserError


def test_the_compact_frequencies_score_exactly_as_the_full_table():
    vocab = Vocabulary.build([c for captions in TRAINING for c in captions], min_freq=2)     # rare words left out
    tokenized = [[" ".join(tokenize(c)) for c in captions] for captions in TRAINING]
    full = CiderVectors(document_frequencies(tokenized), len(TRAINING))
    buffer = io.BytesIO()
    torch.save(count_frequencies(TRAINING, vocab), buffer)
    stored = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    table = unpack_frequencies(stored, vocab)
    assert table and all(count >= 2 and all(w in vocab.stoi for w in gram) for gram, count in table.items())
    assert all(full.document_frequency[gram] == count for gram, count in table.items())
    assert len(table) < len(full.document_frequency)
    compact = CiderVectors(table, stored["images"])
    words = vocab.itos[4:]
    generator = np.random.default_rng(0)
    for _ in range(30):    # random captions of vocabulary words, and ones that follow the training captions
        drawn = list(generator.choice(words, size=generator.integers(1, 9)))
        caption = tokenized[generator.integers(5)][generator.integers(3)].split()
        kept = [w for w in caption if w in vocab.stoi]
        candidates = [" ".join(drawn), " ".join(kept), " ".join(kept[:4] + drawn[:2]), " ".join(kept[1:])]
        assert np.array_equal(compact.consensus(candidates), full.consensus(candidates))


def test_a_training_checkpoint_counts_them_from_its_dataset(tiny_checkpoints, tmp_path):
    path = tiny_checkpoints["lstm"]
    checkpoint = load_checkpoint(path)
    vocab = Vocabulary(checkpoint["vocab"])
    captions, train_names, _ = load_splits(merge(DEFAULTS, checkpoint["config"], path).data)
    expected = unpack_frequencies(count_frequencies([captions[n] for n in train_names], vocab), vocab)
    cider = rerank_cider(checkpoint, path)
    assert cider.document_frequency == expected and cider.ref_len == pytest.approx(np.log(len(train_names)))
    checkpoint["config"]["data"]["captions"] = str(tmp_path / "gone.csv")
    with pytest.raises(UserError, match=r"^the training captions.*cannot be read: .*gone\.csv: cannot read") as error:
        rerank_cider(checkpoint, path)
    assert "\n" not in str(error.value)
