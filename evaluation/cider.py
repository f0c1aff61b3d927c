"""CIDEr-D as the self-critical reward and the utility of consensus re-ranking: coco-caption's formula,
with document frequencies fixed once.

coco-caption computes CIDEr-D's document frequencies from the references it scores. A reward scores
a few images at a time, so their frequencies come instead from all training references, computed once
(Rennie et al. 2017). N-grams are counted and frequencies taken with pycocoevalcap's own code; the
references' tf-idf vectors are computed once too, so a sample costs one vector and five similarities.
With the same inputs and frequencies, the scores equal pycocoevalcap's CiderScorer (tests check it).

    reward = CiderD(train_references)                # {image: [caption, ...]}
    scores = reward.score(["a dog runs", ...], ["img1.jpg", ...])   # numpy [n]

CiderVectors is the formula alone, with frequencies given: consensus re-ranking (models/consensus.py) scores
captions against each other with it, the training captions' frequencies travelling inside a checkpoint.
"""
import math

import numpy as np
from pycocoevalcap.cider.cider_scorer import CiderScorer, cook_refs, cook_test

from evaluation.ptb_tokenizer import tokenize_ptb

END_WORD = "<end>"     # appended to samples and references: the reward sees whether a caption ends well


def document_frequencies(documents: list[list[str]], n: int = 4) -> dict[tuple, float]:
    """n-gram (a tuple of words) -> how many documents hold it, counted by pycocoevalcap. A document is one
    image's captions, each a string of space-separated words (tokenized already)."""
    return _frequencies([cook_refs(captions, n) for captions in documents], n)


def _frequencies(cooked_documents: list, n: int) -> dict[tuple, float]:
    corpus = CiderScorer(n=n)
    corpus.crefs = cooked_documents
    corpus.compute_doc_freq()
    return corpus.document_frequency


class CiderVectors:
    """CIDEr-D's tf-idf vectors and their similarity, with the document frequencies given: n-gram -> count
    among n_documents (an n-gram missing counts as 1, as CIDEr-D's max(1, df) would take it)."""

    def __init__(self, document_frequency: dict, n_documents: int, n: int = 4, sigma: float = 6.0):
        self.document_frequency, self.n, self.sigma = document_frequency, n, sigma
        self.ref_len = math.log(float(n_documents))

    def _vector(self, counts: dict):
        """(tf-idf weights per n-gram order, their norms, the length CIDEr-D's penalty uses), as coco-caption's
        counts2vec computes them."""
        vector = [{} for _ in range(self.n)]
        norm = [0.0] * self.n
        length = 0
        for ngram, term_freq in counts.items():
            order = len(ngram) - 1
            weight = float(term_freq) * (self.ref_len - np.log(max(1.0, self.document_frequency.get(ngram, 0.0))))
            vector[order][ngram] = weight
            norm[order] += weight ** 2
            if order == 1:          # coco-caption counts the bigrams here: its length is theirs
                length += term_freq
        return vector, [math.sqrt(x) for x in norm], length

    def _similarity(self, hyp, ref) -> float:
        (vec_h, norm_h, len_h), (vec_r, norm_r, len_r) = hyp, ref
        penalty = math.exp(-((len_h - len_r) ** 2) / (2 * self.sigma ** 2))
        total = 0.0
        for order in range(self.n):
            ref_order = vec_r[order]
            value = sum(min(w, ref_order[g]) * ref_order[g] for g, w in vec_h[order].items() if g in ref_order)
            if norm_h[order] != 0 and norm_r[order] != 0:
                value /= norm_h[order] * norm_r[order]
            total += value * penalty
        return total / self.n

    def consensus(self, captions: list[str]) -> np.ndarray:
        """CIDEr-D (coco scale: x10) of each caption with all the others as its references. Captions are strings
        of space-separated words, scored as they are (not tokenized here); a lone caption scores 0."""
        vectors = [self._vector(cook_test(caption, self.n)) for caption in captions]
        others = max(len(vectors) - 1, 1)
        return np.array([10.0 * sum(self._similarity(hyp, ref) for j, ref in enumerate(vectors) if j != i) / others
                         for i, hyp in enumerate(vectors)])


class CiderD(CiderVectors):
    def __init__(self, references: dict[str, list[str]], n: int = 4, sigma: float = 6.0, with_end: bool = True):
        """references: image -> its captions as written (tokenized here the coco way)."""
        self.with_end = with_end
        names = list(references)
        flat = tokenize_ptb([c for name in names for c in references[name]])
        cooked, at = {}, 0
        for name in names:
            cooked[name] = cook_refs([self._words(c) for c in flat[at:at + len(references[name])]], n)
            at += len(references[name])
        super().__init__(_frequencies(list(cooked.values()), n), len(cooked), n, sigma)
        self.references = {name: [self._vector(counts) for counts in refs] for name, refs in cooked.items()}

    def _words(self, tokenized: str) -> str:
        return f"{tokenized} {END_WORD}".strip() if self.with_end else tokenized

    def score(self, captions: list[str], images: list[str]) -> np.ndarray:
        """CIDEr-D (coco scale: x10) of each caption against its image's references."""
        tokenized = tokenize_ptb(captions)
        scores = np.empty(len(captions))
        for i, (caption, image) in enumerate(zip(tokenized, images)):
            hyp = self._vector(cook_test(self._words(caption), self.n))
            refs = self.references[image]
            scores[i] = 10.0 * sum(self._similarity(hyp, ref) for ref in refs) / len(refs)
        return scores

