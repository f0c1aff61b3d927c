"""Caption generation: batched greedy decoding, beam search and sampling, the only copies.

All three drive any decoder through its two-method interface:
    state = model.init_state(features)            every state tensor is batch-first
    logits, state, alpha = model.step(tokens, state)
so beam search can expand and reorder any decoder's state with index_select(0, ...), and sampling can
repeat it for several captions per image.
"""
import torch
import torch.nn.functional as F

from data.text.vocab import Vocabulary
from utils import UserError


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
    hyps.sort(key=lambda h: -h[0])
    best_score, best_tokens, best_attn = hyps[0]
    return {"tokens": best_tokens, "score": best_score,
            "attention": None if best_attn is None else best_attn[:len(best_tokens)].cpu(),
            "beams": [(h[1], h[0]) for h in hyps[:k]]}


@torch.no_grad()
def sample_captions(model, features, samples_per_image: int, max_len: int, temperature: float = 1.0,
                    generator: torch.Generator | None = None, start_id: int = 1, end_id: int = 2, pad_id: int = 0,
                    banned: tuple = ()):
    """Draw K = samples_per_image captions per image from the model's word distribution (softmax of the
    logits / temperature); a temperature near 0 gives the greedy caption.

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
        probs = torch.softmax(logits.float() / max(temperature, 1e-6), dim=-1)
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


def never_said(vocab: Vocabulary) -> tuple:
    """Ids a caption never holds: <pad>, <start>, and <unk>, which would print as a placeholder."""
    return vocab.pad_id, vocab.start_id, vocab.unk_id


def decode_settings(decode: dict, **given) -> dict:
    """A checkpoint's decode section, with what a command line gave instead (None: not given): the keyword
    arguments of generate()."""
    settings = {key: decode[key] for key in ("beam_size", "max_len", "length_penalty", "no_repeat_ngram")}
    settings.update({key: value for key, value in given.items() if value is not None})
    if settings["length_penalty"] < 0:
        raise UserError(f"length penalty {settings['length_penalty']}: must be at least 0")
    return settings


def describe_decoding(decode: dict) -> str:
    """One line for a decode section (or the same keys given on a command line): what every tool prints."""
    search = "greedy decoding" if decode["beam_size"] <= 1 else f"beam search (beam {decode['beam_size']}, length penalty {decode['length_penalty']:g})"
    repeats = f"no {decode['no_repeat_ngram']}-gram said twice" if decode["no_repeat_ngram"] else "repeats allowed"
    return f"{search}, {repeats}, at most {decode['max_len']} words"


def generate(model, features, vocab: Vocabulary, beam_size: int = 1, max_len: int = 30, length_penalty: float = 1.0,
             no_repeat_ngram: int = 0):
    """Captions for a batch of features: list of {caption, tokens, score, attention, beams: [(caption, score)]}."""
    if beam_size <= 1:
        results = greedy_decode(model, features, max_len, vocab.start_id, vocab.end_id, banned=never_said(vocab),
                                no_repeat_ngram=no_repeat_ngram)
        for r in results:
            r["beams"] = [(r["tokens"], r["score"])]
    else:
        results = beam_search(model, features, beam_size, max_len, length_penalty, vocab.start_id, vocab.end_id,
                              banned=never_said(vocab), no_repeat_ngram=no_repeat_ngram)
    for r in results:
        r["caption"] = vocab.decode(r["tokens"])
        r["beams"] = [(vocab.decode(tokens), score) for tokens, score in r["beams"]]
    return results
