"""Several captioning models decoded as one: at every step the word log-probabilities are the mean of theirs.

The models share the CNN's frozen trunk (one encoder, input transform and weights hash), which runs once
per image; each has its own fine-tuned tail (if any) and its own decoder. Decoding sees the ensemble as one
model (decoding.py's init_state / step), so greedy decoding, beam search, evaluation, inference and the web
demo need nothing of their own.

    ensemble = CaptionEnsemble([model_a, model_b])
    stored = ensemble.encoder.extract(images)     # the shared trunk's output; each model runs its own tail
    generate(ensemble, stored, vocab, DecodeSettings(beam_size=3))
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import UserError


class SharedTrunk(nn.Module):
    """An ensemble's encoder as the tools see one: trunk() and extract() give the shared trunk's output (what the
    feature cache holds, keyed as the deepest-cut model's cache); tail() passes it on untouched, as
    each model runs its own."""

    def __init__(self, encoder):
        super().__init__()
        self._models_encoder = [encoder]        # in a list: the model owns it, the ensemble's state names it once

    @property
    def inner(self):
        return self._models_encoder[0]

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def tail_blocks(self) -> int:
        return self.inner.tail_blocks

    def weights_fingerprint(self, host_copy=None) -> str:
        return self.inner.weights_fingerprint(host_copy)

    def trunk(self, images: torch.Tensor) -> torch.Tensor:
        return self.inner.trunk(images)

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(images)

    def tail(self, stored: torch.Tensor) -> torch.Tensor:
        return stored


class CaptionEnsemble(nn.Module):
    def __init__(self, models: list, image_sizes: list[int] | None = None):
        """image_sizes: each model's data.image_size, when known: the shared trunk reads one size of image."""
        super().__init__()
        if image_sizes and len(set(image_sizes)) > 1:
            raise UserError(f"an ensemble's models must read images of one size; theirs have data.image_size "
                            f"{', '.join(map(str, image_sizes))}")
        names = {(m.encoder.name, m.encoder.spatial) for m in models}
        if len(names) > 1 or not all(m.encoder.spatial for m in models):
            raise UserError("an ensemble's models must share their encoder and read its grid (attention or "
                            "Transformer decoders): the LSTM's pooled input is a trained layer of its own")
        hashes = {m.encoder.weights_fingerprint() for m in models if not m.encoder.tail_blocks}
        if len(hashes) > 1:
            raise UserError("an ensemble's frozen models must have the same CNN weights")
        self.members = nn.ModuleList(models)
        self.encoder = SharedTrunk(max(models, key=lambda m: m.encoder.tail_blocks).encoder)
        self.state_sizes = []        # how many state tensors each model's decoder keeps (set by init_state)

    def forward(self, *args, **kwargs):
        raise UserError("an ensemble only decodes: train each of its models on its own")

    def init_state(self, stored: torch.Tensor):
        """The shared trunk's output -> every model's decoder state, one flat tuple (batch-first, as beam search
        reorders it)."""
        cut = self.encoder.tail_blocks
        states = [m.decoder.init_state(m.encoder.project(m.encoder.tail_from(stored, cut))) for m in self.members]
        self.state_sizes = [len(state) for state in states]
        return tuple(t for state in states for t in state)

    def step(self, tokens: torch.Tensor, state):
        """-> (the mean of the models' log-probabilities [B,V], as logits; new state; mean attention or None)."""
        log_probs, alphas, new_state, start = [], [], [], 0
        for model, size in zip(self.members, self.state_sizes):
            logits, own, alpha = model.decoder.step(tokens, state[start:start + size])
            start += size
            log_probs.append(F.log_softmax(logits.float(), dim=-1))
            alphas.append(alpha)
            new_state += list(own)
        alpha = None if any(a is None for a in alphas) else torch.stack([a.float() for a in alphas]).mean(0)
        return torch.stack(log_probs).mean(0), tuple(new_state), alpha
