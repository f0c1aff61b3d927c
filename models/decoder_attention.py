"""AttentionDecoder: Show, Attend and Tell soft-attention LSTM decoder (Xu et al. 2015).

At every step an MLP scores each of the P grid cells of the encoder's feature map
against the previous hidden state; the softmax-weighted context, scaled by a learned
gate, is fed to the LSTM together with the previous word's embedding.

Shares the decoder interface used by decoding.py:
    forward(features, tokens, lengths) -> (logits [B,T,V], extra_loss)   teacher forcing
    init_state(features) -> tuple of batch-first tensors
    step(tokens, state) -> (logits [B,V], new_state, alpha [B,P])        one decoding step
"""
import torch
import torch.nn as nn

from config import ModelConfig
from data.text.vocab import Vocabulary
from models.teacher_forcing import check_teacher_forcing

READS_GRID = True


def build(m: ModelConfig, feature_dim: int, vocab_size: int):
    """The decoder of a config's model section."""
    return AttentionDecoder(feature_dim, vocab_size, m)


class AttentionDecoder(nn.Module):
    def __init__(self, feature_dim: int, vocab_size: int, config: ModelConfig):
        """feature_dim: the grid's channels; config: the model section (embed_size, hidden_size, attention_size,
        dropout, alpha_c)."""
        super().__init__()
        embed_size, hidden_size, attention_size = config.embed_size, config.hidden_size, config.attention_size
        self.feature_dim = feature_dim
        self.alpha_c = config.alpha_c
        self.embedding = nn.Embedding(vocab_size, embed_size, padding_idx=Vocabulary.pad_id)
        self.enc_att = nn.Linear(feature_dim, attention_size)
        self.dec_att = nn.Linear(hidden_size, attention_size)
        self.full_att = nn.Linear(attention_size, 1)
        self.f_beta = nn.Linear(hidden_size, feature_dim)  # gate: how much context this step uses
        self.init_h = nn.Linear(feature_dim, hidden_size)
        self.init_c = nn.Linear(feature_dim, hidden_size)
        self.lstm = nn.LSTMCell(embed_size + feature_dim, hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.fc = nn.Linear(hidden_size, vocab_size)
        # Small uniform init as in the reference implementations; training is less jumpy early on.
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.uniform_(self.fc.weight, -0.1, 0.1)
        nn.init.zeros_(self.fc.bias)

    def _check(self, features: torch.Tensor) -> None:
        if features.dim() != 3 or features.size(2) != self.feature_dim:
            raise ValueError(f"decoder_attention.py: features have shape {tuple(features.shape)}, expected "
                             f"[B, P, {self.feature_dim}]; use a spatial encoder whose feature_dim matches the decoder")

    def _lstm_step(self, embedded, features, projected, h, c, h_weight, h_bias):
        """One attention + LSTM step; shared by forward() and step() so both compute the same thing.

        embedded [b,E], features [b,P,C], projected [b,P,A], h/c [b,H], (h_weight, h_bias) from
        _h_projection() -> h, c [b,H], alpha [b,P]
        """
        # dec_att and f_beta both read h: one matmul for both, [b,H] -> [b,A+C] -> [b,A] and [b,C]
        h_att, gate = nn.functional.linear(h, h_weight, h_bias).split([projected.size(2), self.feature_dim], 1)
        scores = self.full_att(torch.relu(projected + h_att.unsqueeze(1))).squeeze(2)  # [b,P]
        alpha = torch.softmax(scores, dim=1)
        context = torch.bmm(alpha.unsqueeze(1), features).squeeze(1)  # [b,1,P] x [b,P,C] -> [b,C], no [b,P,C] temporary
        h, c = self.lstm(torch.cat([embedded, torch.sigmoid(gate) * context], dim=1), (h, c))
        return h, c, alpha

    def _h_projection(self, dtype: torch.dtype):
        """dec_att and f_beta stacked: (weight [A+C,H], bias [A+C]) in `dtype`, the grid's (bf16 under
        autocast): cast here once, as autocast would cast a computed weight again at every step."""
        return (torch.cat([self.dec_att.weight, self.f_beta.weight]).to(dtype),
                torch.cat([self.dec_att.bias, self.f_beta.bias]).to(dtype))

    def init_state(self, features: torch.Tensor):
        """features [B,P,C] -> (h [B,H], c [B,H], features [B,P,C], projected [B,P,A]); all batch-first."""
        self._check(features)
        mean_feature = features.mean(dim=1)  # [B,C]
        projected = self.enc_att(features)
        # Under autocast projected is bf16: cast the grid to it once here, not in every step's bmm.
        return self.init_h(mean_feature), self.init_c(mean_feature), features.to(projected.dtype), projected

    def step(self, tokens: torch.Tensor, state):
        """tokens [B] (previous word) -> logits [B,V], new state, alpha [B,P]."""
        h, c, features, projected = state
        h, c, alpha = self._lstm_step(self.embedding(tokens), features, projected, h, c,
                                      *self._h_projection(projected.dtype))
        return self.fc(self.dropout(h)), (h, c, features, projected), alpha

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor):
        """Teacher forcing. features [B,P,C], tokens [B,T], lengths [B] -> logits [B,T,V], extra_loss [].

        Every row runs all T steps (the loss ignores a finished row's extra steps, which change nothing
        before them): no slices, no gradients of slices, no host-device sync. Skipping finished rows was
        no faster on a CPU either (docs/speed.md).
        """
        self._check(features)
        lengths = check_teacher_forcing(features, tokens, lengths, "decoder_attention.py")
        h, c, features, projected = self.init_state(features)  # attention projection computed once per batch
        h_weight, h_bias = self._h_projection(projected.dtype)
        embedded = self.embedding(tokens).to(projected.dtype)  # [B,T,E]
        hiddens, alphas = [], []
        for step_embedded in embedded.unbind(1):  # T x [B,E]
            h, c, alpha = self._lstm_step(step_embedded, features, projected, h, c, h_weight, h_bias)
            hiddens.append(h)
            alphas.append(alpha)
        logits = self.fc(self.dropout(torch.stack(hiddens, 1)))  # one vocabulary matmul after the loop: [B,T,V]
        alphas = torch.stack(alphas, 1)                          # [B,T,P]
        valid = torch.arange(tokens.size(1), device=lengths.device) < lengths.unsqueeze(1)  # [B,T], where lengths are
        if valid.device != tokens.device:   # built on the CPU: pinned, so a copy to CUDA need not wait for the GPU
            valid = (valid.pin_memory() if tokens.is_cuda else valid).to(tokens.device, non_blocking=True)
        # Doubly stochastic attention: each cell should get about one unit of attention over the caption's
        # valid steps. Averaged over the P cells (not summed as in the paper) so alpha_c means the same
        # for any grid size.
        attention_sum = torch.einsum("btp,bt->bp", alphas, valid.to(alphas.dtype))  # [B,P]
        return logits, self.alpha_c * ((1.0 - attention_sum) ** 2).mean()
