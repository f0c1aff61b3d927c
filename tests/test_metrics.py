"""Tests for metrics.py: hand-computed BLEU / ROUGE-L / CIDEr-D cases, the Python PTB
tokenizer against the Java one, and the Java-free fallbacks. Java tests skip without Java."""
import math
from collections import Counter

import numpy as np
import pytest

from evaluation import metrics

needs_java = pytest.mark.skipif(not metrics.java_available(),
                                reason="java not installed (`java -version` failed)")


def test_bleu_brevity_penalty_by_hand():
    refs = {"img": ["a man is riding a brown horse on the beach",            # 10 words
                    "A man rides a horse along the sandy beach at sunset."]}  # 11 words
    hyps = {"img": "A man is riding a black horse."}  # 7 words after tokenization
    # Clipped n-gram matches against the references (by hand):
    #   1-grams: a a man is riding horse match, black does not          -> 6/7
    #   2-grams: "a man" "man is" "is riding" "riding a" match           -> 4/6
    #   3-grams: "a man is" "man is riding" "is riding a"                -> 3/5
    #   4-grams: "a man is riding" "man is riding a"                     -> 2/4
    precisions = [6 / 7, 4 / 6, 3 / 5, 2 / 4]
    brevity_penalty = math.exp(1 - 10 / 7)  # closest reference length is 10, hypothesis is 7
    scores, per_image, _ = metrics.score_captions(hyps, refs, use_java=False)
    for n in range(1, 5):
        expected = brevity_penalty * math.prod(precisions[:n]) ** (1 / n)
        assert scores[f"BLEU-{n}"] == pytest.approx(expected, rel=1e-6)
    assert per_image["img"]["BLEU-4"] == pytest.approx(scores["BLEU-4"], rel=1e-6)
    assert metrics.quick_scores(hyps, refs) == {"BLEU-4": scores["BLEU-4"], "CIDEr": scores["CIDEr"]}
    assert list(metrics.quick_scores(hyps, refs)) == list(metrics.SCORE_NAMES.values())   # what validation reports


def test_rouge_l_by_hand():
    refs = {"img": ["the cat is sitting on the mat", "the cat"]}
    hyps = {"img": "the cat sat on the mat"}
    # LCS with ref 1 is "the cat on the mat" (5): P = 5/6, R = 5/7.  With ref 2 it is
    # "the cat" (2): P = 2/6, R = 2/2.  coco takes max P and max R over references
    # separately, then F with beta = 1.2.
    precision, recall, beta = 5 / 6, 1.0, 1.2
    expected = (1 + beta**2) * precision * recall / (recall + beta**2 * precision)
    scores, per_image, _ = metrics.score_captions(hyps, refs, use_java=False)
    assert scores["ROUGE-L"] == pytest.approx(expected)
    assert per_image["img"]["ROUGE-L"] == pytest.approx(expected)


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def _cider_d_numpy(hyps: dict, refs: dict, sigma: float = 6.0) -> dict:
    """Independent CIDEr-D (Vedantam et al. 2015, coco-caption variant): tf-idf n-gram
    vectors with raw counts, idf from the references of the evaluated images (an n-gram
    no reference has counts as document frequency 1), clipped cosine, Gaussian length
    penalty, x10, averaged over n = 1..4 and the references."""
    ids = list(hyps)
    num_images = len(ids)
    scores = {}
    for image_id in ids:
        hyp = hyps[image_id].split()
        per_n = []
        for n in range(1, 5):
            doc_freq = Counter(g for i in ids for g in set().union(*(_ngrams(r.split(), n) for r in refs[i])))
            hyp_counts = _ngrams(hyp, n)
            vocab = sorted(set(doc_freq) | set(hyp_counts))
            idf = np.array([math.log(num_images) - math.log(max(1, doc_freq[g])) for g in vocab])
            hyp_vec = np.array([hyp_counts[g] for g in vocab]) * idf
            total = 0.0
            for ref in refs[image_id]:
                ref_words = ref.split()
                ref_counts = _ngrams(ref_words, n)
                ref_vec = np.array([ref_counts[g] for g in vocab]) * idf
                norms = np.linalg.norm(hyp_vec) * np.linalg.norm(ref_vec)
                cosine = np.minimum(hyp_vec, ref_vec) @ ref_vec / norms if norms else 0.0
                total += cosine * math.exp(-((len(hyp) - len(ref_words)) ** 2) / (2 * sigma**2))
            per_n.append(10 * total / len(refs[image_id]))
        scores[image_id] = float(np.mean(per_n))
    return scores


CIDER_REFS = {
    "1": ["a dog runs across the green grass", "a brown dog running on grass"],
    "2": ["a man rides a red bike down the street", "a person riding a bicycle on a road"],
    "3": ["two cats sleep on a sofa", "a pair of cats sleeping on the couch"],
}


def test_cider_d_identical_captions_score_highest():
    perfect = {i: refs[0] for i, refs in CIDER_REFS.items()}
    all_refs_equal = {i: [refs[0], refs[0]] for i, refs in CIDER_REFS.items()}
    top, _, _ = metrics.score_captions(perfect, all_refs_equal, use_java=False)
    assert top["CIDEr"] == pytest.approx(10.0)  # cosine 1 for every n, no length penalty, x10
    worse = {"1": "a dog runs", "2": "a man rides a red bike", "3": "a cat on a sofa"}
    lower, _, _ = metrics.score_captions(worse, all_refs_equal, use_java=False)
    assert 0 < lower["CIDEr"] < top["CIDEr"]


def test_cider_d_matches_independent_numpy():
    hyps = {"1": "a dog running on the grass", "2": "a man riding a bike on the street",
            "3": "two cats on a couch"}
    expected = _cider_d_numpy(hyps, CIDER_REFS)
    scores, per_image, _ = metrics.score_captions(hyps, CIDER_REFS, use_java=False)
    for image_id in hyps:
        assert per_image[image_id]["CIDEr"] == pytest.approx(expected[image_id], rel=1e-9)
    assert scores["CIDEr"] == pytest.approx(np.mean(list(expected.values())), rel=1e-9)


REALISTIC_CAPTIONS = [
    "A man riding a wave on top of a surfboard.",
    "The man's shirt is red, and his hat is blue .",
    "A black-and-white photo of a 1950's car.",
    'A bus that says "Downtown" on the front.',
    "A sign that reads 'Welcome to Seattle'.",
    "A man in a suit (and tie) is talking on a cell phone.",
    "A kitchen with stainless-steel appliances [and a window].",
    "There are 3 cows in the field; 2 are brown.",
    "A clock showing 10:30 on a tower",
    "A pizza with pepperoni, mushrooms & olives!",
    "Is this a real cat?",
    "The dogs aren't sleeping, they're playing.",
    "A street sign for Main St. and 5th Ave.",
    "Mr. and Mrs. Smith cutting a wedding cake at 3 p.m.",
    "A person at a desk with a computer, a phone, etc.",
    "A surfer -- wearing a black wetsuit -- rides a wave...",
    "A 12-year-old girl can't reach the kids' toys: they're too high.",
    "A pizza costs $12.99 and is 50% off",
    "A laptop, a mouse and a keyboard on a desk .",
    "The bathroom has a toilet, sink, and shower/tub combo.",
    "\u201cCurly quotes\u201d and it\u2019s a dog\u2019s life \u2014 really.",
    "A woman cutting a cake that is 2 1/2 feet tall.",
]


@needs_java
def test_tokenize_ptb_matches_java_tokenizer():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    java = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(REALISTIC_CAPTIONS)})
    java_lines = [java[i][0] for i in range(len(REALISTIC_CAPTIONS))]
    assert metrics.tokenize_ptb(REALISTIC_CAPTIONS) == java_lines
    assert metrics._java_tokenize(REALISTIC_CAPTIONS) == java_lines  # our timeout-guarded call


@needs_java
def test_java_and_python_paths_agree(capsys):
    refs = {str(i): [REALISTIC_CAPTIONS[i], REALISTIC_CAPTIONS[i + 1]] for i in range(0, 20, 2)}
    hyps = {str(i): REALISTIC_CAPTIONS[i + 2].lower() for i in range(0, 20, 2)}
    hyps["0"] = refs["0"][1]
    hyps["2"] = ""
    with_java, per_image_java, notes_java = metrics.score_captions(hyps, refs, use_java=True)
    no_java, per_image_py, notes_py = metrics.score_captions(hyps, refs, use_java=False)
    for name in ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"]:
        assert with_java[name] == no_java[name]
    assert 0 < with_java["METEOR"] < 1 and no_java["METEOR"] is None
    assert notes_java == [] and len(notes_py) == 1
    assert all(isinstance(s["METEOR"], float) for s in per_image_java.values())
    assert per_image_java["2"]["METEOR"] == 0.0 and per_image_java["2"]["CIDEr"] == 0.0
    assert {k: {m: v for m, v in s.items() if m != "METEOR"} for k, s in per_image_java.items()} == \
        {k: {m: v for m, v in s.items() if m != "METEOR"} for k, s in per_image_py.items()}
    assert capsys.readouterr().out == ""


def test_empty_hypothesis_scores_zero_and_stdout_stays_clean(capsys):
    refs = {"a": ["a dog runs on the grass"], "b": ["a man rides a bike"]}
    scores, per_image, notes = metrics.score_captions({"a": "", "b": "."}, refs, use_java=False)
    assert all(scores[f"BLEU-{n}"] == 0 for n in range(1, 5))
    assert scores["ROUGE-L"] == 0 and scores["CIDEr"] == 0 and scores["METEOR"] is None
    assert per_image["a"] == {"BLEU-4": 0.0, "ROUGE-L": 0.0, "CIDEr": 0.0, "METEOR": None}
    assert notes and "METEOR" in notes[0]
    quick = metrics.quick_scores({"a": "", "b": "a man"}, refs)
    full = metrics.score_captions({"a": "", "b": "a man"}, refs, use_java=False)[0]
    assert quick == {"BLEU-4": full["BLEU-4"], "CIDEr": full["CIDEr"]}
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("hyps, refs", [
    ({"a": "x"}, {"b": ["x"]}),
    ({"a": "x", "b": "y"}, {"a": ["x"]}),
    ({}, {}),
    ({"a": "x"}, {"a": []}),
    ({"a": "x"}, {"a": "x"}),
    ({"a": "x"}, {"a": ["...", "!"]}),
])
def test_bad_inputs_raise_value_error(hyps, refs):
    with pytest.raises(ValueError, match="score_captions"):
        metrics.score_captions(hyps, refs, use_java=False)


def test_java_failures_fall_back_without_crashing(monkeypatch, capsys):
    refs = {"a": ["a dog runs on the grass"], "b": ["a man rides a bike"]}
    hyps = {"a": "a dog on grass", "b": "a man on a bike"}
    expected, _, _ = metrics.score_captions(hyps, refs, use_java=False)

    def broken(*args):
        raise RuntimeError("simulated java failure")
    monkeypatch.setattr(metrics, "_java_tokenize", broken)
    monkeypatch.setattr(metrics, "_meteor", broken)
    monkeypatch.setattr(metrics, "java_available", lambda: True)
    scores, per_image, notes = metrics.score_captions(hyps, refs, use_java=True)
    assert scores == expected and per_image["a"]["METEOR"] is None
    assert len(notes) == 2 and all("simulated java failure" in n for n in notes)

    monkeypatch.setattr(metrics, "java_available", lambda: False)
    scores, _, notes = metrics.score_captions(hyps, refs)  # auto-detect: no Java
    assert scores == expected and len(notes) == 1 and "java" in notes[0]
    assert capsys.readouterr().out == ""
