"""Caption metrics with coco-caption conventions: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D.

The scorers are pycocoevalcap's. Captions are tokenized the coco way (lower-cased PTB
tokens, punctuation tokens dropped) by the Stanford PTBTokenizer when Java works, else by
tokenize_ptb, a pure-Python copy that gives the same tokens on ordinary captions. METEOR
needs Java; without it METEOR is None and a note says why. CIDEr is CIDEr-D with document
frequencies taken from the evaluated references, exactly as in coco-caption.

    metrics, per_image, notes = score_captions({"img1": "a dog runs"},
                                               {"img1": ["A dog is running.", "a dog"]})
"""
import contextlib
import functools
import io
import math
import os
import re
import subprocess
import tempfile
import threading

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.bleu.bleu_scorer import cook_refs, cook_test
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor import meteor as meteor_module
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer

from evaluation.ptb_tokenizer import PUNCTUATIONS, tokenize_ptb
from utils import UserError

# The scores validation computes, by the names the config (train.select_metric) and the loss log give them,
# and their coco-caption names, which score dicts and evaluate.py's JSON use: the one place both are spelled.
# Validation, its line in train.py's output, the loss log's columns, train.select_metric's choices and the loss
# curve all loop over it: a new score is an entry here and its value in quick_scores (and in score_captions).
SCORE_NAMES = {"bleu4": "BLEU-4", "cider": "CIDEr"}
TOKENIZER_JAR = os.path.join(os.path.dirname(ptbtokenizer.__file__), ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
TOKENIZER_TIMEOUT_S = 300
METEOR_TIMEOUT_S = 600

# ---------------------------------------------------------------- Java helpers
@functools.lru_cache(maxsize=1)
def java_available() -> bool:
    """True when `java -version` runs (checked once per process)."""
    try:
        return subprocess.run(["java", "-version"], capture_output=True, timeout=15).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _java_tokenize(captions: list[str]) -> list[str]:
    """pycocoevalcap's PTBTokenizer, called with a timeout and without writing into site-packages."""
    # Any line break inside a caption would shift every later line of the Java output.
    lines = [re.sub(r"[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]", " ", c) for c in captions]
    with tempfile.NamedTemporaryFile("wb", suffix=".txt", delete=False) as tmp:
        tmp.write("\n".join(lines).encode())
    try:
        done = subprocess.run(["java", "-cp", TOKENIZER_JAR, "edu.stanford.nlp.process.PTBTokenizer",
                               "-preserveLines", "-lowerCase", tmp.name],
                              capture_output=True, timeout=TOKENIZER_TIMEOUT_S)
    finally:
        os.remove(tmp.name)
    out = done.stdout.decode(errors="replace").split("\n")
    if done.returncode != 0 or len(out) != len(lines):
        raise RuntimeError(f"PTBTokenizer exit code {done.returncode}, "
                           f"{len(out)} lines for {len(lines)} captions")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in PUNCTUATIONS) for line in out]


def _meteor(gts: dict, res: dict) -> tuple[float, list[float]]:
    """pycocoevalcap's Meteor with a time limit; the Java process is always ended."""
    scorer = meteor_module.Meteor()
    result = {}

    def work():
        try:
            result["value"] = scorer.compute_score(gts, res)
        except Exception as error:  # reported below, in the caller's thread
            result["error"] = error

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    worker.join(METEOR_TIMEOUT_S)
    # Killing the JVM unblocks a worker stuck on readline. Meteor.__del__ takes its lock,
    # which a failed worker never released, so hand it a fresh one.
    with contextlib.suppress(OSError):
        scorer.meteor_p.stdin.close()
    scorer.meteor_p.kill()
    scorer.meteor_p.wait()
    scorer.lock = threading.Lock()
    if "value" not in result:
        raise result.get("error") or TimeoutError(f"no answer within {METEOR_TIMEOUT_S} s")
    score, scores = result["value"]
    return float(score), [float(s) for s in scores]


# ---------------------------------------------------------------- scoring
def _check_inputs(hypotheses: dict, references: dict) -> list:
    """Image ids in hypothesis order; ValueError (UserError when there is nothing to score) with a one-line fix for
    bad input."""
    if not isinstance(hypotheses, dict) or not isinstance(references, dict):
        raise ValueError("score_captions: hypotheses and references must be dicts keyed by image id")
    if not hypotheses:
        raise UserError("score_captions: no hypotheses to score; pass at least one image")
    if hypotheses.keys() != references.keys():
        only_hyp = [k for k in hypotheses if k not in references]
        only_ref = [k for k in references if k not in hypotheses]
        raise ValueError(f"score_captions: hypotheses and references must have the same image ids "
                         f"({len(only_hyp)} only in hypotheses, e.g. {only_hyp[:1]}; {len(only_ref)} only in "
                         f"references, e.g. {only_ref[:1]}); score the same set of images")
    for image_id, hyp in hypotheses.items():
        refs = references[image_id]
        if not isinstance(hyp, str):
            raise ValueError(f"score_captions: hypothesis for image {image_id!r} is {type(hyp).__name__}, "
                             f"not a caption string")
        if isinstance(refs, str) or not isinstance(refs, (list, tuple)) or not refs \
                or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"score_captions: references for image {image_id!r} must be a non-empty list "
                             f"of caption strings")
    return list(hypotheses)


def _tokenize_all(ids: list, hypotheses: dict, references: dict, tokenize) -> tuple[dict, dict]:
    """coco-style gts/res dicts: image id -> list of tokenized captions."""
    flat_refs = [r for i in ids for r in references[i]]
    tok_refs = iter(tokenize(flat_refs))
    gts = {i: [next(tok_refs) for _ in references[i]] for i in ids}
    tok_hyps = tokenize([hypotheses[i] for i in ids])
    return gts, {i: [h] for i, h in zip(ids, tok_hyps)}


def _check_references(gts: dict) -> None:
    if not any(r.split() for refs in gts.values() for r in refs):  # CIDEr's idf would crash
        raise UserError("score_captions: every reference caption is empty after tokenization; "
                        "check the references")


def _one_line(error: Exception) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())


def _bleu(gts: dict, res: dict) -> tuple[list[float], list[list[float]]]:
    with contextlib.redirect_stdout(io.StringIO()):  # BleuScorer prints its length ratio
        score, scores = Bleu(4).compute_score(gts, res, verbose=0)
    return [float(s) for s in score], scores


def smoothed_bleu4(hypothesis: str, references: list[str]) -> float:
    """Sentence BLEU-4 of one caption against references (strings of space-separated words): coco-caption's
    clipped n-gram counts and closest reference length, with add-one smoothing of the 2- to 4-gram precisions
    (Lin and Och 2004), so that a caption sharing no 4-gram still scores by its shorter ones."""
    cooked = cook_test(hypothesis, cook_refs(references), eff="closest")
    if not cooked["correct"][0]:
        return 0.0
    log_precision = sum(math.log((cooked["correct"][k] + (k > 0)) / (cooked["guess"][k] + (k > 0))) for k in range(4))
    brevity = min(0.0, 1.0 - cooked["reflen"] / cooked["testlen"])
    return math.exp(log_precision / 4 + brevity)


def score_captions(hypotheses: dict[str, str], references: dict[str, list[str]],
                   use_java: bool | None = None) -> tuple[dict, dict[str, dict], list[str]]:
    """(metrics, per_image, notes) on the coco 0..1 scale; use_java=None means use it if present."""
    ids = _check_inputs(hypotheses, references)
    notes = []
    if use_java is None:
        use_java = java_available()
        if not use_java:
            notes.append("java not found: METEOR is None and captions use the Python PTB tokenizer")
    elif use_java and not java_available():
        notes.append("java requested but `java -version` failed: METEOR is None, Python PTB tokenizer used")
        use_java = False
    elif not use_java:
        notes.append("use_java=False: METEOR is None and captions use the Python PTB tokenizer")

    gts = res = None
    if use_java:
        try:
            gts, res = _tokenize_all(ids, hypotheses, references, _java_tokenize)
        except Exception as error:
            notes.append(f"Java PTBTokenizer failed ({_one_line(error)}); used the Python PTB tokenizer")
    if gts is None:
        gts, res = _tokenize_all(ids, hypotheses, references, tokenize_ptb)
    _check_references(gts)

    bleu, bleu_per_image = _bleu(gts, res)
    with contextlib.redirect_stdout(io.StringIO()):
        rouge, rouge_per_image = Rouge().compute_score(gts, res)
        cider, cider_per_image = Cider().compute_score(gts, res)
    meteor, meteor_per_image = None, [None] * len(ids)
    if use_java:
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                meteor, meteor_per_image = _meteor(gts, res)
        except Exception as error:
            notes.append(f"METEOR failed ({_one_line(error)}); METEOR is None")

    metrics = {f"BLEU-{n + 1}": bleu[n] for n in range(4)}
    metrics.update({"METEOR": meteor, "ROUGE-L": float(rouge), "CIDEr": float(cider)})
    per_image = {i: {"BLEU-4": float(bleu_per_image[3][k]), "ROUGE-L": float(rouge_per_image[k]),
                     "CIDEr": float(cider_per_image[k]), "METEOR": meteor_per_image[k]}
                 for k, i in enumerate(ids)}
    return metrics, per_image, notes


def quick_scores(hypotheses: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """Each score of SCORE_NAMES (corpus BLEU-4 and CIDEr-D), by its coco name, with the Python tokenizer only, no
    Java: train.py's validation. Each equals score_captions(..., use_java=False)'s."""
    ids = _check_inputs(hypotheses, references)
    gts, res = _tokenize_all(ids, hypotheses, references, tokenize_ptb)
    _check_references(gts)
    with contextlib.redirect_stdout(io.StringIO()):
        cider = Cider().compute_score(gts, res)[0]
    return {"BLEU-4": _bleu(gts, res)[0][3], "CIDEr": float(cider)}
