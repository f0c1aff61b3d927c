"""Caption generation: batched greedy decoding, beam search and sampling, the only copies.

All three drive any decoder through its two-method interface:
    state = model.init_state(features)            every state tensor is batch-first
    logits, state, alpha = model.step(tokens, state)
so beam search can expand and reorder any decoder's state with index_select(0, ...), and sampling can
repeat it for several captions per image. Consensus re-ranking (models/consensus.py) chooses among the beam's
hypotheses and sampled captions; the stepping along a chosen caption gives its score and attention.
"""
import torch
import torch.nn.functional as F

from config import check_value
from data.text.vocab import Vocabulary
from models.consensus import rerank
from utils import UserError, warn

RERANK_KEYS = ("rerank_samples", "rerank_temperature", "rerank_bleu")
RERANK_SEED = 0         # re-ranking's samples: the same batch of images always gets the same ones


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


def greedy_decode(model, features, max_len: int, start_id: int = 1, end_id: int = 2, stop_check_every=None,
                  banned: tuple = (), no_repeat_ngram: int = 0):
    """features [B,...] -> list of B dicts {tokens, score, attention}: argmax word each step, up to max_len words,
    never one that repeats an n-gram of no_repeat_ngram words (0: any word).

    Stopping once every caption has ended means reading a flag on the host, which waits for the device
    to catch up. On a GPU that empties its queue of kernels, so by default it looks only every 4 steps
    there (every step on a CPU); the extra steps change no result: captions are cut at <end>.
    """
    stop_check_every = stop_check_every or (1 if features.device.type == "cpu" else 4)
    state = model.init_state(features)
    batch = features.size(0)
    tokens = torch.full((batch,), start_id, dtype=torch.long, device=features.device)
    words, alphas, logps = [], [], []
    finished = torch.zeros(batch, dtype=torch.bool, device=features.device)
    for step in range(max_len):
        logits, state, alpha = step_logits(model, tokens, state, banned)
        logp = F.log_softmax(logits.float(), dim=-1)
        if no_repeat_ngram and words:
            ban_repeated_ngrams(logp, torch.stack(words, 1), no_repeat_ngram)
        logp, tokens = logp.max(dim=-1)                                          # [B], [B]
        words.append(tokens)
        logps.append(logp.masked_fill(finished, 0.0))
        alphas.append(alpha)
        finished |= tokens == end_id
        if (step + 1) % stop_check_every == 0 and finished.all():
            break
    words = torch.stack(words, 1).tolist()                                      # [B, t]
    total_logp = torch.stack(logps, 1).sum(1).tolist()
    results = []
    for b in range(batch):
        n = words[b].index(end_id) if end_id in words[b] else len(words[b])
        attention = torch.stack([a[b] for a in alphas[:n]]).float().cpu() if alphas[0] is not None and n else None
        results.append({"tokens": words[b][:n], "score": total_logp[b] / (min(n + 1, len(words[b]))), "attention": attention})
    return results


@torch.no_grad()
def beam_search(model, features, beam_size: int, max_len: int, length_penalty: float = 1.0,
                start_id: int = 1, end_id: int = 2, banned: tuple = (), no_repeat_ngram: int = 0):
    """Batched beam search. features [B,...] -> list of B dicts {tokens, score, attention, beams}.

    Score = sum of log-probs / length ** length_penalty, length counting <end>. A hypothesis
    is finished when it emits <end> within the top beam_size candidates; an image stops when
    beam_size hypotheses are finished. If none finishes by max_len, the best unfinished one
    is returned, so a model that never says <end> still gets a caption. With no_repeat_ngram = n > 0 no
    hypothesis holds the same n words twice.
    """
    batch, k, device = features.size(0), beam_size, features.device
    state = tuple(s.repeat_interleave(k, dim=0) for s in model.init_state(features))   # [B*K, ...]
    scores = torch.full((batch, k), float("-inf"), device=device)
    scores[:, 0] = 0.0                      # all beams start identical: keep one so they differ after step 1
    tokens = torch.full((batch * k,), start_id, dtype=torch.long, device=device)
    history = torch.zeros(batch * k, 0, dtype=torch.long, device=device)            # [B*K, t]
    attn_history = None                                                              # [B*K, t, P]
    finished = [[] for _ in range(batch)]   # per image: (normalised score, tokens, attention)
    done = [False] * batch
    for t in range(max_len):
        logits, state, alpha = step_logits(model, tokens, state, banned)
        logp = F.log_softmax(logits.float(), dim=-1)                                  # [B*K, V]
        vocab = logp.size(1)
        ban_repeated_ngrams(logp, history, no_repeat_ngram)
        candidates = (scores.view(-1, 1) + logp).view(batch, k * vocab)              # [B, K*V]
        top_scores, top_index = candidates.topk(min(2 * k, k * vocab), dim=1)       # [B, n]
        top_beam, top_word = top_index // vocab, top_index % vocab
        is_end = top_word == end_id
        # Candidates ending in <end> among the best K become finished hypotheses.
        ranks = torch.arange(top_index.size(1), device=device).expand_as(top_index)
        for b, j in (is_end & (ranks < k) & top_scores.isfinite()).nonzero().tolist():
            if not done[b]:
                row = b * k + top_beam[b, j].item()
                finished[b].append((top_scores[b, j].item() / (t + 1) ** length_penalty, history[row].tolist(),
                                    None if attn_history is None else attn_history[row]))
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
                  k, length_penalty) for b in range(batch)]


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
def sample_captions(model, features, samples_per_image: int, max_len: int, temperature: float = 1.0,
                    generator: torch.Generator | None = None, start_id: int = 1, end_id: int = 2, pad_id: int = 0,
                    banned: tuple = (), no_repeat_ngram: int = 0):
    """Draw K = samples_per_image captions per image from the model's word distribution (softmax of the
    logits / temperature); a temperature near 0 gives the greedy caption. With no_repeat_ngram = n > 0 no
    caption holds the same n words twice.

    features [B,...] -> (tokens [B*K, T+1]: <start> words <end> <pad>..., lengths [B*K]: tokens up to and
    including <end>, or T+1 for a caption that reached max_len without it). Rows are image-major: image b's
    samples are rows b*K .. b*K+K-1. With a seeded generator (on the features' device) the draws repeat exactly.
    """
    batch, device = features.size(0), features.device
    state = tuple(s.repeat_interleave(samples_per_image, dim=0) for s in model.init_state(features))
    rows = batch * samples_per_image
    tokens = torch.full((rows,), start_id, dtype=torch.long, device=device)
    words = [tokens]
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    for _ in range(max_len):
        logits, state, _ = step_logits(model, tokens, state, banned)
        logits = logits.float() / max(temperature, 1e-6)
        if no_repeat_ngram and len(words) > 1:
            ban_repeated_ngrams(logits, torch.stack(words[1:], 1), no_repeat_ngram)
            logits.masked_fill_(finished.unsqueeze(1), 0.0)     # a finished row's draw is dropped: keep it valid
        probs = torch.softmax(logits, dim=-1)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1).masked_fill(finished, pad_id)
        words.append(tokens)
        finished |= tokens == end_id
        if finished.all():
            break
    tokens = torch.stack(words, 1)                                                   # [rows, 1 + t]
    ended = (tokens == end_id).int()
    has_end = ended.any(1)
    lengths = torch.where(has_end, ended.argmax(1) + 1, torch.full_like(has_end, tokens.size(1), dtype=torch.long))
    return tokens, lengths


@torch.no_grad()
def follow(model, features, captions: list[list[int]], max_len: int, length_penalty: float = 1.0, start_id: int = 1,
           end_id: int = 2, banned: tuple = ()) -> tuple[list[float], list]:
    """Step the model along given captions (word ids, one per image of features): (each one's score as beam search
    scores it: the log-probs of its words and <end> / length ** length_penalty, where a caption of max_len words
    never ended and has no <end>; each one's attention [words, P], None without attention or words)."""
    device = features.device
    lengths = torch.tensor([len(c) + (len(c) < max_len) for c in captions])              # words, and <end>
    targets = torch.full((len(captions), int(lengths.max())), end_id, dtype=torch.long)
    for b, caption in enumerate(captions):
        targets[b, :len(caption)] = torch.tensor(caption, dtype=torch.long)
    targets = targets.to(device)
    state = model.init_state(features)
    tokens = torch.full((len(captions),), start_id, dtype=torch.long, device=device)
    logps, alphas = [], []
    for t in range(targets.size(1)):
        logits, state, alpha = step_logits(model, tokens, state, banned)
        logps.append(F.log_softmax(logits.float(), dim=-1).gather(1, targets[:, t:t + 1]).squeeze(1))
        alphas.append(alpha)
        tokens = targets[:, t]
    logp = torch.stack(logps, 1).cpu().masked_fill(torch.arange(targets.size(1)) >= lengths.unsqueeze(1), 0.0)
    scores = (logp.sum(1) / lengths.float() ** length_penalty).tolist()
    attention = [torch.stack([a[b] for a in alphas[:len(c)]]).float().cpu() if alphas[0] is not None and c else None
                 for b, c in enumerate(captions)]
    return scores, attention


def consensus_candidates(model, features, vocab: Vocabulary, results: list[dict], samples: int, temperature: float,
                         max_len: int, no_repeat_ngram: int = 0) -> list[list[list[int]]]:
    """Each image's candidates for consensus re-ranking (word ids): its beams (results: greedy_decode's or
    beam_search's, with "beams" [(tokens, score)]), then `samples` captions drawn at temperature. The generator is
    seeded, so the same batch always gets the same ones."""
    generator = torch.Generator(device=features.device).manual_seed(RERANK_SEED)
    tokens, lengths = sample_captions(model, features, samples, max_len, temperature, generator, vocab.start_id,
                                      vocab.end_id, vocab.pad_id, never_said(vocab), no_repeat_ngram)
    drawn = []
    for row, length in zip(tokens.tolist(), lengths.tolist()):
        words = row[1:length]
        drawn.append(words[:-1] if words and words[-1] == vocab.end_id else words)
    return [[beam for beam, _ in r["beams"]] + drawn[b * samples:(b + 1) * samples] for b, r in enumerate(results)]


def never_said(vocab: Vocabulary) -> tuple:
    """Ids a caption never holds: <pad>, <start>, and <unk>, which would print as a placeholder."""
    return vocab.pad_id, vocab.start_id, vocab.unk_id


def decode_settings(decode: dict, **given) -> dict:
    """A checkpoint's decode section, with what a command line gave instead (None: not given): the keyword
    arguments of generate(). Re-ranking's keys are left out when it is off, so the settings of plain decoding
    (and the scores that record them) read as they did before it existed."""
    settings = {key: decode[key] for key in ("beam_size", "max_len", "length_penalty", "no_repeat_ngram", *RERANK_KEYS)}
    settings.update({key: value for key, value in given.items() if value is not None})
    if settings["length_penalty"] < 0:
        raise UserError(f"length penalty {settings['length_penalty']}: must be at least 0")
    for key in RERANK_KEYS:
        check_value(f"decode.{key}", settings[key], f"--{key.replace('_', '-')}")
    return settings if settings["rerank_samples"] else {k: v for k, v in settings.items() if k not in RERANK_KEYS}


def describe_decoding(decode: dict) -> str:
    """One line for a decode section (or the same keys given on a command line): what every tool prints."""
    search = "greedy decoding" if decode["beam_size"] <= 1 else f"beam search (beam {decode['beam_size']}, length penalty {decode['length_penalty']:g})"
    repeats = f"no {decode['no_repeat_ngram']}-gram said twice" if decode["no_repeat_ngram"] else "repeats allowed"
    line = f"{search}, {repeats}, at most {decode['max_len']} words"
    if not decode.get("rerank_samples"):
        return line
    pool = "the beam" if decode["beam_size"] > 1 else "the greedy caption"
    utility = f"CIDEr-D + {decode['rerank_bleu']:g} x BLEU-4" if decode["rerank_bleu"] else "CIDEr-D"
    return (f"{line}, consensus re-ranking of {pool} + {decode['rerank_samples']} samples at temperature "
            f"{decode['rerank_temperature']:g} ({utility})")


def generate(model, features, vocab: Vocabulary, beam_size: int = 1, max_len: int = 30, length_penalty: float = 1.0,
             no_repeat_ngram: int = 0, rerank_samples: int = 0, rerank_temperature: float = 0.7,
             rerank_bleu: float = 0.0, rerank_cider=None):
    """Captions for a batch of features: list of {caption, tokens, score, attention, beams: [(caption, score)]}.

    With rerank_samples > 0 the caption is the consensus choice (models/consensus.py) among the beams and that many
    samples, scored with rerank_cider (models.consensus.rerank_cider(checkpoint, path)); its score and attention
    come from stepping along it, and beams stay the beam's.
    """
    if beam_size <= 1:
        results = greedy_decode(model, features, max_len, vocab.start_id, vocab.end_id, banned=never_said(vocab),
                                no_repeat_ngram=no_repeat_ngram)
        for r in results:
            r["beams"] = [(r["tokens"], r["score"])]
    else:
        results = beam_search(model, features, beam_size, max_len, length_penalty, vocab.start_id, vocab.end_id,
                              banned=never_said(vocab), no_repeat_ngram=no_repeat_ngram)
    if rerank_samples:
        if rerank_cider is None:
            raise UserError("consensus re-ranking needs the training captions' document frequencies, and none were "
                            "given; decode without re-ranking")
        candidates = consensus_candidates(model, features, vocab, results, rerank_samples, rerank_temperature,
                                          max_len, no_repeat_ngram)
        chosen = [c[rerank([vocab.decode(t) for t in c], rerank_cider, rerank_bleu)[0][0]] for c in candidates]
        scores, attention = follow(model, features, chosen, max_len, length_penalty, vocab.start_id, vocab.end_id,
                                   never_said(vocab))
        for r, tokens, score, alpha in zip(results, chosen, scores, attention):
            r.update(tokens=tokens, score=score, attention=alpha)
    for r in results:
        r["caption"] = vocab.decode(r["tokens"])
        r["beams"] = [(vocab.decode(tokens), score) for tokens, score in r["beams"]]
    return results
