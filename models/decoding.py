"""Caption generation: batched greedy decoding, beam search and sampling, the only copies.

All three drive any decoder through its two-method interface:
    state = model.init_state(features)            every state tensor is batch-first
    logits, state, alpha = model.step(tokens, state)
so beam search can expand and reorder any decoder's state with index_select(0, ...), and sampling can
repeat it for several captions per image. Consensus re-ranking (models/consensus.py) chooses among the beam's
hypotheses and sampled captions; the stepping along a chosen caption gives its score and attention.

Two small values say how to decode: DecodeSettings (the search, its limits and re-ranking: a checkpoint's decode
section with a tool's flags over it) and SpecialIds (the vocabulary's ids that decoding treats apart).

    settings = decode_settings(config.decode, beam_size=args.beam_size)      # None: the flag was not given
    results = generate(model, features, vocab, settings)
"""
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from config import check_value
from data.text.vocab import Vocabulary
from evaluation.cider import CiderVectors
from models.consensus import rerank
from utils import UserError, warn

SEARCH_KEYS = ("beam_size", "max_len", "length_penalty", "no_repeat_ngram")
RERANK_KEYS = ("rerank_samples", "rerank_temperature", "rerank_bleu")
RERANK_SEED = 0         # re-ranking's samples: the same batch of images always gets the same ones


@dataclass(frozen=True)
class SpecialIds:
    """The ids decoding treats apart: the first input, the word that ends a caption, what fills a sampled row after
    it, and the ids a caption never holds (their logits are set to -inf). The defaults ban nothing."""
    start: int = 1
    end: int = 2
    pad: int = 0
    banned: tuple = ()

    @classmethod
    def of(cls, vocab: Vocabulary) -> "SpecialIds":
        """A vocabulary's: its captions never hold <pad>, <start>, or <unk>, which would print as a placeholder."""
        return cls(vocab.start_id, vocab.end_id, vocab.pad_id, (vocab.pad_id, vocab.start_id, vocab.unk_id))


@dataclass(frozen=True)
class DecodeSettings:
    """How to decode (config.py's decode section says what each key means). The defaults are plain greedy decoding;
    decode_settings() gives a checkpoint's settings, with a tool's flags over them.

    rerank_cider is what re-ranking scores with when rerank_samples > 0: CIDEr-D with the training captions'
    document frequencies (models.rerank_frequencies.rerank_cider). It is data rather than a setting, so it is left
    out of comparisons and of to_dict()."""
    beam_size: int = 1
    max_len: int = 30
    length_penalty: float = 1.0
    no_repeat_ngram: int = 0
    rerank_samples: int = 0
    rerank_temperature: float = 0.7
    rerank_bleu: float = 0.0
    rerank_cider: CiderVectors | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict:
        """The settings as scores record them. Re-ranking's keys are left out when it is off, so the settings of
        plain decoding (and the scores that record them) read as they did before it existed."""
        keys = SEARCH_KEYS + (RERANK_KEYS if self.rerank_samples else ())
        return {key: getattr(self, key) for key in keys}

    def with_cider(self, cider: CiderVectors) -> "DecodeSettings":
        return replace(self, rerank_cider=cider)


def decode_settings(decode, **given) -> DecodeSettings:
    """A checkpoint's decode section (config.DecodeConfig), with what a command line gave instead (None: not
    given). UserError for a value out of its range."""
    settings = {key: decode[key] for key in SEARCH_KEYS + RERANK_KEYS}
    settings.update({key: value for key, value in given.items() if value is not None})
    if settings["length_penalty"] < 0:
        raise UserError(f"length penalty {settings['length_penalty']}: must be at least 0")
    for key in RERANK_KEYS:
        check_value(f"decode.{key}", settings[key], f"--{key.replace('_', '-')}")
    return DecodeSettings(**settings)


def describe_decoding(decode) -> str:
    """One line for DecodeSettings (or a config's decode section, which has the same keys): what every tool prints."""
    search = ("greedy decoding" if decode.beam_size <= 1 else
              f"beam search (beam {decode.beam_size}, length penalty {decode.length_penalty:g})")
    repeats = f"no {decode.no_repeat_ngram}-gram said twice" if decode.no_repeat_ngram else "repeats allowed"
    line = f"{search}, {repeats}, at most {decode.max_len} words"
    if not decode.rerank_samples:
        return line
    pool = "the beam" if decode.beam_size > 1 else "the greedy caption"
    utility = f"CIDEr-D + {decode.rerank_bleu:g} x BLEU-4" if decode.rerank_bleu else "CIDEr-D"
    return (f"{line}, consensus re-ranking of {pool} + {decode.rerank_samples} samples at temperature "
            f"{decode.rerank_temperature:g} ({utility})")


@torch.no_grad()
def step_logits(model, tokens, state, banned: tuple):
    """model.step, with the banned ids' logits (<pad>, <start>, <unk>: never words of a caption) set to -inf."""
    logits, state, alpha = model.step(tokens, state)
    if banned:
        logits = logits.float().index_fill(1, torch.tensor(banned, device=logits.device), float("-inf"))
    return logits, state, alpha


def ban_repeated_ngrams(logp: torch.Tensor, history: torch.Tensor, n: int) -> None:
    """Set to -inf, in place, the log-probs [R, V] of the words that would make the last n words of a row of
    history [R, t] (the words so far) an n-gram the row already holds ("in a red shirt ... in a red shirt")."""
    if n <= 0 or history.size(1) < n:
        return
    if n == 1:
        logp.scatter_(1, history, float("-inf"))
        return
    grams = history.unfold(1, n, 1)                                      # [R, t-n+1, n]
    rows, at = (grams[:, :, :-1] == history[:, None, -(n - 1):]).all(-1).nonzero(as_tuple=True)   # prefix matches
    logp[rows, grams[rows, at, -1]] = float("-inf")


def greedy_decode(model, features, settings: DecodeSettings, ids: SpecialIds = SpecialIds(), stop_check_every=None):
    """features [B,...] -> list of B dicts {tokens, score, attention}: argmax word each step, up to settings.max_len
    words, never one that repeats an n-gram of settings.no_repeat_ngram words (0: any word).

    Stopping once every caption has ended means reading a flag on the host, which waits for the device
    to catch up. On a GPU that empties its queue of kernels, so by default it looks only every 4 steps
    there (every step on a CPU); the extra steps change no result: captions are cut at <end>.
    """
    stop_check_every = stop_check_every or (1 if features.device.type == "cpu" else 4)
    state = model.init_state(features)
    batch = features.size(0)
    tokens = torch.full((batch,), ids.start, dtype=torch.long, device=features.device)
    words, alphas, logps = [], [], []
    finished = torch.zeros(batch, dtype=torch.bool, device=features.device)
    for step in range(settings.max_len):
        logits, state, alpha = step_logits(model, tokens, state, ids.banned)
        logp = F.log_softmax(logits.float(), dim=-1)
        if settings.no_repeat_ngram and words:
            ban_repeated_ngrams(logp, torch.stack(words, 1), settings.no_repeat_ngram)
        logp, tokens = logp.max(dim=-1)                                          # [B], [B]
        words.append(tokens)
        logps.append(logp.masked_fill(finished, 0.0))
        alphas.append(alpha)
        finished |= tokens == ids.end
        if (step + 1) % stop_check_every == 0 and finished.all():
            break
    words = torch.stack(words, 1).tolist()                                      # [B, t]
    total_logp = torch.stack(logps, 1).sum(1).tolist()
    results = []
    for b in range(batch):
        n = words[b].index(ids.end) if ids.end in words[b] else len(words[b])
        attention = torch.stack([a[b] for a in alphas[:n]]).float().cpu() if alphas[0] is not None and n else None
        results.append({"tokens": words[b][:n], "score": total_logp[b] / (min(n + 1, len(words[b]))),
                        "attention": attention})
    return results


@torch.no_grad()
def beam_search(model, features, settings: DecodeSettings, ids: SpecialIds = SpecialIds()):
    """Batched beam search. features [B,...] -> list of B dicts {tokens, score, attention, beams}.

    Score = sum of log-probs / length ** length_penalty, length counting <end>. A hypothesis
    is finished when it emits <end> within the top beam_size candidates; an image stops when
    beam_size hypotheses are finished. If none finishes by max_len, the best unfinished one
    is returned, so a model that never says <end> still gets a caption. With no_repeat_ngram = n > 0 no
    hypothesis holds the same n words twice.
    """
    batch, k, device = features.size(0), settings.beam_size, features.device
    state = tuple(s.repeat_interleave(k, dim=0) for s in model.init_state(features))   # [B*K, ...]
    scores = torch.full((batch, k), float("-inf"), device=device)
    scores[:, 0] = 0.0                      # all beams start identical: keep one so they differ after step 1
    tokens = torch.full((batch * k,), ids.start, dtype=torch.long, device=device)
    history = torch.zeros(batch * k, 0, dtype=torch.long, device=device)            # [B*K, t]
    attn_history = None                                                              # [B*K, t, P]
    finished = [[] for _ in range(batch)]   # per image: (normalised score, tokens, attention)
    done = [False] * batch
    for t in range(settings.max_len):
        logits, state, alpha = step_logits(model, tokens, state, ids.banned)
        logp = F.log_softmax(logits.float(), dim=-1)                                  # [B*K, V]
        vocab = logp.size(1)
        ban_repeated_ngrams(logp, history, settings.no_repeat_ngram)
        candidates = (scores.view(-1, 1) + logp).view(batch, k * vocab)              # [B, K*V]
        top_scores, top_index = candidates.topk(min(2 * k, k * vocab), dim=1)       # [B, n]
        top_beam, top_word = top_index // vocab, top_index % vocab
        is_end = top_word == ids.end
        # Candidates ending in <end> among the best K become finished hypotheses.
        ranks = torch.arange(top_index.size(1), device=device).expand_as(top_index)
        for b, j in (is_end & (ranks < k) & top_scores.isfinite()).nonzero().tolist():
            if not done[b]:
                row = b * k + top_beam[b, j].item()
                finished[b].append((top_scores[b, j].item() / (t + 1) ** settings.length_penalty,
                                    history[row].tolist(), None if attn_history is None else attn_history[row]))
        # The first K candidates that did not end stay alive (ends sort to the back).
        order = (is_end.long() * top_index.size(1) + ranks).argsort(dim=1)[:, :k]   # [B, K]
        if order.size(1) < k:               # K*V < K: pad with dead beams
            order = torch.cat([order, order[:, :1].expand(-1, k - order.size(1))], 1)
        scores = top_scores.gather(1, order).masked_fill(is_end.gather(1, order), float("-inf"))
        rows = (top_beam.gather(1, order) + torch.arange(batch, device=device).view(-1, 1) * k).view(-1)
        tokens = top_word.gather(1, order).view(-1)
        history = torch.cat([history[rows], tokens.unsqueeze(1)], dim=1)
        state = tuple(s.index_select(0, rows) for s in state)
        if alpha is not None:
            alpha = alpha.index_select(0, rows).float().unsqueeze(1)                  # [B*K, 1, P]
            attn_history = alpha if attn_history is None else torch.cat([attn_history[rows], alpha], 1)
        for b in range(batch):
            done[b] = done[b] or len(finished[b]) >= k
        if all(done):
            break
    return [_best(finished[b], None if done[b] else (scores[b], history[b * k:(b + 1) * k],
                                                     None if attn_history is None else attn_history[b * k:(b + 1) * k]),
                  k, settings.length_penalty) for b in range(batch)]


def _best(finished: list, alive, k: int, length_penalty: float) -> dict:
    """One image's result from its finished hypotheses and, when fewer than k finished by max_len, its beams still
    alive (scores [K], history [K, t], attention [K, t, P] or None), which then compete too."""
    hyps = list(finished)
    if alive is not None:
        scores, history, attention = alive
        hyps += [(scores[j].item() / history.size(1) ** length_penalty, history[j].tolist(),
                  None if attention is None else attention[j]) for j in range(k) if scores[j].isfinite()]
    if not hyps:            # every score is NaN or -inf: the features (or the weights) hold values that are no numbers
        warn("beam search found no hypothesis with a finite score (are the image features or the model's weights "
             "damaged?); returning its first beam")
        scores, history, attention = alive
        hyps = [(float("nan"), history[0].tolist(), None if attention is None else attention[0])]
    hyps.sort(key=lambda h: -h[0])
    best_score, best_tokens, best_attn = hyps[0]
    return {"tokens": best_tokens, "score": best_score,
            "attention": None if best_attn is None else best_attn[:len(best_tokens)].cpu(),
            "beams": [(h[1], h[0]) for h in hyps[:k]]}


@torch.no_grad()
def sample_captions(model, features, samples_per_image: int, settings: DecodeSettings, ids: SpecialIds = SpecialIds(),
                    temperature: float = 1.0, generator: torch.Generator | None = None):
    """Draw K = samples_per_image captions per image from the model's word distribution (softmax of the
    logits / temperature), up to settings.max_len words; a temperature near 0 gives the greedy caption. With
    settings.no_repeat_ngram = n > 0 no caption holds the same n words twice.

    features [B,...] -> (tokens [B*K, T+1]: <start> words <end> <pad>..., lengths [B*K]: tokens up to and
    including <end>, or T+1 for a caption that reached max_len without it). Rows are image-major: image b's
    samples are rows b*K .. b*K+K-1. With a seeded generator (on the features' device) the draws repeat exactly.
    """
    batch, device = features.size(0), features.device
    state = tuple(s.repeat_interleave(samples_per_image, dim=0) for s in model.init_state(features))
    rows = batch * samples_per_image
    tokens = torch.full((rows,), ids.start, dtype=torch.long, device=device)
    words = [tokens]
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    for _ in range(settings.max_len):
        logits, state, _ = step_logits(model, tokens, state, ids.banned)
        logits = logits.float() / max(temperature, 1e-6)
        if settings.no_repeat_ngram and len(words) > 1:
            ban_repeated_ngrams(logits, torch.stack(words[1:], 1), settings.no_repeat_ngram)
            logits.masked_fill_(finished.unsqueeze(1), 0.0)     # a finished row's draw is dropped: keep it valid
        probs = torch.softmax(logits, dim=-1)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1).masked_fill(finished, ids.pad)
        words.append(tokens)
        finished |= tokens == ids.end
        if finished.all():
            break
    tokens = torch.stack(words, 1)                                                   # [rows, 1 + t]
    ended = (tokens == ids.end).int()
    has_end = ended.any(1)
    lengths = torch.where(has_end, ended.argmax(1) + 1, torch.full_like(has_end, tokens.size(1), dtype=torch.long))
    return tokens, lengths


@torch.no_grad()
def follow(model, features, captions: list[list[int]], settings: DecodeSettings,
           ids: SpecialIds = SpecialIds()) -> tuple[list[float], list]:
    """Step the model along given captions (word ids, one per image of features): (each one's score as beam search
    scores it: the log-probs of its words and <end> / length ** length_penalty, where a caption of max_len words
    never ended and has no <end>; each one's attention [words, P], None without attention or words)."""
    device = features.device
    lengths = torch.tensor([len(c) + (len(c) < settings.max_len) for c in captions])    # words, and <end>
    targets = torch.full((len(captions), int(lengths.max())), ids.end, dtype=torch.long)
    for b, caption in enumerate(captions):
        targets[b, :len(caption)] = torch.tensor(caption, dtype=torch.long)
    targets = targets.to(device)
    state = model.init_state(features)
    tokens = torch.full((len(captions),), ids.start, dtype=torch.long, device=device)
    logps, alphas = [], []
    for t in range(targets.size(1)):
        logits, state, alpha = step_logits(model, tokens, state, ids.banned)
        logps.append(F.log_softmax(logits.float(), dim=-1).gather(1, targets[:, t:t + 1]).squeeze(1))
        alphas.append(alpha)
        tokens = targets[:, t]
    logp = torch.stack(logps, 1).cpu().masked_fill(torch.arange(targets.size(1)) >= lengths.unsqueeze(1), 0.0)
    scores = (logp.sum(1) / lengths.float() ** settings.length_penalty).tolist()
    attention = [torch.stack([a[b] for a in alphas[:len(c)]]).float().cpu() if alphas[0] is not None and c else None
                 for b, c in enumerate(captions)]
    return scores, attention


def consensus_candidates(model, features, results: list[dict], settings: DecodeSettings,
                         ids: SpecialIds) -> list[list[list[int]]]:
    """Each image's candidates for consensus re-ranking (word ids): its beams (results: greedy_decode's or
    beam_search's, with "beams" [(tokens, score)]), then settings.rerank_samples captions drawn at
    settings.rerank_temperature. The generator is seeded, so the same batch always gets the same ones."""
    samples = settings.rerank_samples
    generator = torch.Generator(device=features.device).manual_seed(RERANK_SEED)
    tokens, lengths = sample_captions(model, features, samples, settings, ids, settings.rerank_temperature, generator)
    drawn = []
    for row, length in zip(tokens.tolist(), lengths.tolist()):
        words = row[1:length]
        drawn.append(words[:-1] if words and words[-1] == ids.end else words)
    return [[beam for beam, _ in r["beams"]] + drawn[b * samples:(b + 1) * samples] for b, r in enumerate(results)]


def generate(model, features, vocab: Vocabulary, settings: DecodeSettings) -> list[dict]:
    """Captions for a batch of features: list of {caption, tokens, score, attention, beams: [(caption, score)]}.

    With settings.rerank_samples > 0 the caption is the consensus choice (models/consensus.py) among the beams and
    that many samples, scored with settings.rerank_cider; its score and attention come from stepping along it, and
    beams stay the beam's.
    """
    ids = SpecialIds.of(vocab)
    if settings.beam_size <= 1:
        results = greedy_decode(model, features, settings, ids)
        for r in results:
            r["beams"] = [(r["tokens"], r["score"])]
    else:
        results = beam_search(model, features, settings, ids)
    if settings.rerank_samples:
        if settings.rerank_cider is None:
            raise UserError("consensus re-ranking needs the training captions' document frequencies, and none were "
                            "given; decode without re-ranking")
        candidates = consensus_candidates(model, features, results, settings, ids)
        chosen = [c[rerank([vocab.decode(t) for t in c], settings.rerank_cider, settings.rerank_bleu)[0][0]]
                  for c in candidates]
        scores, attention = follow(model, features, chosen, settings, ids)
        for r, tokens, score, alpha in zip(results, chosen, scores, attention):
            r.update(tokens=tokens, score=score, attention=alpha)
    for r in results:
        r["caption"] = vocab.decode(r["tokens"])
        r["beams"] = [(vocab.decode(tokens), score) for tokens, score in r["beams"]]
    return results


@dataclass(frozen=True)
class Captioner:
    """A model as a tool loaded it, ready to caption: its vocabulary, config, decode settings and device."""
    model: torch.nn.Module
    vocab: Vocabulary
    config: object
    decode: DecodeSettings
    device: torch.device

    @torch.no_grad()
    def captions(self, grids: torch.Tensor) -> list[dict]:
        """generate()'s results for a batch of grids (what the encoder gives), moved to the device."""
        return generate(self.model, grids.to(self.device), self.vocab, self.decode)
