"""The training captions' n-gram document frequencies that consensus re-ranking's CIDEr-D weighs by
(models/consensus.py): counted from a dataset, packed into an exported file, and unpacked for a checkpoint.

A candidate holds vocabulary words only, and CIDEr-D reads max(1, df), so only n-grams (n = 1..4) of vocabulary
words held by two training images or more matter: the compact frequencies keep exactly those, and score as the
full table does. An exported file carries them (export.py); a training checkpoint's are counted from its config's
training split when asked for. Compact frequencies, plain types that torch.load(weights_only=True) reads:

    {"images": training images counted, "ngrams": [{"word", "count"}, {"prefix", "word", "count"}, ...]}

one dict per order n, of int16 (int32 where a value needs it) tensors: each n-gram's last word id, how many
images hold it, and for n > 1 the index of its first n-1 words among order n-1's (which are kept too: every
image holding an n-gram holds its prefix).

The tools ask for re-ranking's CIDEr-D here, never models/decoding.py, which takes it in its DecodeSettings:

    decode = with_rerank_cider(decode_settings(config.decode), checkpoint, path)
"""
import torch

from config import DEFAULTS, merge
from data.text.captions import load_splits
from data.text.vocab import Vocabulary, tokenize
from evaluation.cider import CiderVectors, document_frequencies
from models.checkpoint import RERANK_FREQUENCIES, is_inference
from utils import UserError, warn

MAX_ORDER = 4       # CIDEr-D's n-grams


def count_frequencies(documents: list[list[str]], vocab: Vocabulary) -> dict:
    """The compact document frequencies (see the module's docstring) of documents: each image's captions as
    written, tokenized here as the vocabulary tokenizes them."""
    counted = document_frequencies([[" ".join(tokenize(c)) for c in captions] for captions in documents], MAX_ORDER)
    kept = {}
    for gram, count in counted.items():
        ids = tuple(vocab.stoi.get(word, vocab.unk_id) for word in gram)
        if count >= 2 and min(ids) > vocab.unk_id:       # ids up to <unk> are never words of a caption
            kept[ids] = int(count)
    orders, index = [], {}
    for n in range(1, MAX_ORDER + 1):
        grams = sorted(gram for gram in kept if len(gram) == n)
        order = {"word": _small([g[-1] for g in grams]), "count": _small([kept[g] for g in grams])}
        if n > 1:
            order["prefix"] = _small([index[g[:-1]] for g in grams])
        orders.append(order)
        index = {gram: i for i, gram in enumerate(grams)}
    return {"images": len(documents), "ngrams": orders}


def _small(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int16 if max(values, default=0) < 2 ** 15 else torch.int32)


def unpack_frequencies(frequencies: dict, vocab: Vocabulary) -> dict[tuple, int]:
    """Compact frequencies -> {n-gram (a tuple of words): how many training images hold it}."""
    table, previous = {}, [()]
    for order in frequencies["ngrams"]:
        words = [vocab.itos[i] for i in order["word"].tolist()]
        prefixes = order["prefix"].tolist() if "prefix" in order else [0] * len(words)
        grams = [previous[p] + (word,) for p, word in zip(prefixes, words)]
        table.update(zip(grams, order["count"].tolist()))
        previous = grams
    return table


def cider_of(frequencies: dict, vocab: Vocabulary) -> CiderVectors:
    """The CIDEr-D that re-ranking scores with, from compact frequencies."""
    return CiderVectors(unpack_frequencies(frequencies, vocab), frequencies["images"], MAX_ORDER)


def training_frequencies(data, vocab: Vocabulary) -> dict:
    """Compact frequencies of the training captions of a config's data section; UserError when they cannot be read."""
    try:
        captions, train_names, _ = load_splits(data)
    except UserError as e:
        raise UserError(f"the training captions, whose document frequencies consensus re-ranking needs, cannot be "
                        f"read: {e}") from None
    return count_frequencies([captions[name] for name in train_names], vocab)


def training_cider(config, vocab: Vocabulary) -> CiderVectors:
    """Re-ranking's CIDEr-D for a run: its config's training captions (validation during training)."""
    return cider_of(training_frequencies(config.data, vocab), vocab)


def rerank_cider(checkpoint: dict, path: str) -> CiderVectors:
    """Re-ranking's CIDEr-D for a checkpoint: the frequencies an exported file carries, or for a training checkpoint
    those of its config's training split, counted now. UserError when there are none to be had."""
    vocab = Vocabulary(checkpoint["vocab"])
    if not is_inference(checkpoint):
        return training_cider(merge(DEFAULTS, checkpoint["config"], path), vocab)
    if RERANK_FREQUENCIES not in checkpoint:
        raise UserError(f"{path} holds no document frequencies of its training captions, which consensus re-ranking "
                        f"needs: export it again where its training captions can be read, or decode without it")
    try:
        return cider_of(checkpoint[RERANK_FREQUENCIES], vocab)
    except (KeyError, IndexError, TypeError, AttributeError, ValueError):
        raise UserError(f"{path}: its document frequencies for consensus re-ranking are damaged; export it "
                        f"again") from None


def with_rerank_cider(decode, checkpoint: dict, path: str):
    """decode (a models.decoding.DecodeSettings) with the checkpoint's rerank_cider when it re-ranks; as it is when
    it does not, so a file without frequencies still decodes plainly."""
    return decode.with_cider(rerank_cider(checkpoint, path)) if decode.rerank_samples else decode


def frequencies_to_export(config, vocab: Vocabulary) -> dict | None:
    """The training captions' compact frequencies for an exported file, or None, with a warning, when they cannot
    be read (UserError instead when the file's own decode section re-ranks)."""
    try:
        return training_frequencies(config.data, vocab)
    except UserError as e:
        if config.decode.rerank_samples:
            raise
        warn(f"{e}; the exported file will not offer consensus re-ranking: export it where they can be read")
        return None
