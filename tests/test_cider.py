"""evaluation/cider.py: the self-critical reward equals pycocoevalcap's CIDEr-D on the same inputs and frequencies."""
import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider

from evaluation.cider import END_WORD, CiderD

REFERENCES = {"a": ["a dog runs on the grass", "a brown dog running", "the dog is running outside"],
              "b": ["a man rides a bike", "a person on a bicycle", "man riding bike down the street"],
              "c": ["two kids play in the water", "children splash in a pool"]}
SAMPLES = [("a", "a dog runs"), ("b", "a man riding a bike on the street"), ("c", "a dog in the water"),
           ("a", ""), ("b", "a man rides a bike"), ("c", "two kids play in the water")]


@pytest.mark.parametrize("with_end", [False, True])
def test_equals_pycocoevalcap_with_the_same_document_frequencies(with_end):
    """pycocoevalcap takes its frequencies from the references it scores: score every image's references at
    once, as CiderD takes them from all training references."""
    end = f" {END_WORD}" if with_end else ""
    ours = CiderD(REFERENCES, with_end=with_end).score([c for _, c in SAMPLES], [i for i, _ in SAMPLES])
    for round_start in (0, 3):   # pycocoevalcap scores one caption per image per call
        chunk = SAMPLES[round_start:round_start + 3]
        gts = {i: [r + end for r in REFERENCES[i]] for i, _ in chunk}
        res = {i: [(c + end).strip()] for i, c in chunk}
        _, theirs = Cider().compute_score(gts, res)
        assert np.allclose(ours[round_start:round_start + 3], theirs, rtol=1e-12, atol=1e-12)


def test_an_empty_caption_gets_a_reward_and_a_reference_itself_the_most():
    scores = CiderD(REFERENCES).score(["", "kids in the water", "two kids play in the water"], ["c", "c", "c"])
    assert np.isfinite(scores).all() and 0 == scores[0] < scores[1] < scores[2]
