"""Consensus (minimum Bayes risk) re-ranking: of several candidate captions for an image, keep the one that agrees
most with the others.

The candidates are the beam's hypotheses (or the greedy caption) and decode.rerank_samples captions sampled at
decode.rerank_temperature (models.decoding.consensus_candidates draws them). A candidate's utility is its CIDEr-D
with the other candidates as references (evaluation.cider.CiderVectors.consensus), plus decode.rerank_bleu times
its smoothed sentence BLEU-4 against them (evaluation.metrics.smoothed_bleu4): what most of the model's likely
captions say is the safest bet on what the references say. Duplicate candidates are scored once, so a caption
drawn many times weighs as much as one drawn once.

CIDEr-D weighs n-grams by their document frequency in the training captions: models/rerank_frequencies.py counts,
stores and loads those, and rerank_cider(checkpoint, path) there gives the CiderVectors this module scores with.
"""
import numpy as np

from evaluation.cider import CiderVectors
from evaluation.metrics import smoothed_bleu4


def rerank(captions: list[str], cider: CiderVectors, bleu_weight: float = 0.0) -> list[tuple[int, float]]:
    """Consensus re-ranking of one image's candidates (strings of space-separated words): [(index in captions of
    a distinct caption's first occurrence, its utility)], best first; ties keep the candidates' order."""
    first = {}
    for i, caption in enumerate(captions):
        first.setdefault(caption, i)
    distinct = list(first)
    utility = cider.consensus(distinct)
    if bleu_weight and len(distinct) > 1:
        utility = utility + bleu_weight * np.array([smoothed_bleu4(c, distinct[:i] + distinct[i + 1:])
                                                    for i, c in enumerate(distinct)])
    order = sorted(range(len(distinct)), key=lambda i: -utility[i])
    return [(first[distinct[i]], float(utility[i])) for i in order]
