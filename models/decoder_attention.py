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
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from models import check_teacher_forcing


def _unpack(data: torch.Tensor, like: PackedSequence, total_length: int) -> torch.Tensor:
    """Packed rows [N,D] laid out as `like` -> [B,total_length,D] in the original row order, zero-padded."""
    packed = PackedSequence(data, like.batch_sizes, like.sorted_indices, like.unsorted_indices)
    return pad_packed_sequence(packed, batch_first=True, total_length=total_length)[0]


class AttentionDecoder(nn.Module):
    def __init__(self, feature_dim: int, vocab_size: int, embed_size: int = 256, hidden_size: int = 512,
                 attention_size: int = 512, dropout: float = 0.5, alpha_c: float = 1.0, pad_id: int = 0):
        super().__init__()
        self.feature_dim = feature_dim
        self.alpha_c = alpha_c
        self.embedding = nn.Embedding(vocab_size, embed_size, padding_idx=pad_id)
        self.enc_att = nn.Linear(feature_dim, attention_size)
        self.dec_att = nn.Linear(hidden_size, attention_size)
        self.full_att = nn.Linear(attention_size, 1)
        self.f_beta = nn.Linear(hidden_size, feature_dim)  # gate: how much context this step uses
        self.init_h = nn.Linear(feature_dim, hidden_size)
        self.init_c = nn.Linear(feature_dim, hidden_size)
        self.lstm = nn.LSTMCell(embed_size + feature_dim, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden_size, vocab_size)
        # Small uniform init as in the reference implementations; training is less jumpy early on.
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.uniform_(self.fc.weight, -0.1, 0.1)
        nn.init.zeros_(self.fc.bias)

    def _check(self, features: torch.Tensor) -> None:
        if features.dim() != 3 or features.size(2) != self.feature_dim:
            raise ValueError(f"decoder_attention.py: features have shape {tuple(features.shape)}, expected "
                             f"[B, P, {self.feature_dim}]; use a spatial encoder whose feature_dim matches the decoder")

    def _lstm_step(self, embedded, features, projected, h, c):
        """One attention + LSTM step; shared by forward() and step() so both compute the same thing.

        embedded [b,E], features [b,P,C], projected [b,P,A], h/c [b,H] -> h, c [b,H], alpha [b,P]
        """
        scores = self.full_att(torch.relu(projected + self.dec_att(h).unsqueeze(1))).squeeze(2)  # [b,P]
        alpha = torch.softmax(scores, dim=1)
        context = torch.bmm(alpha.unsqueeze(1), features).squeeze(1)  # [b,1,P] x [b,P,C] -> [b,C], no [b,P,C] temporary
        context = torch.sigmoid(self.f_beta(h)) * context
        h, c = self.lstm(torch.cat([embedded, context], dim=1), (h, c))
        return h, c, alpha

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
        h, c, alpha = self._lstm_step(self.embedding(tokens), features, projected, h, c)
        return self.fc(self.dropout(h)), (h, c, features, projected), alpha

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor):
        """Teacher forcing. features [B,P,C], tokens [B,T], lengths [B] (CPU) -> logits [B,T,V], extra_loss []."""
        self._check(features)
        lengths = check_teacher_forcing(features, tokens, lengths, "decoder_attention.py")
        # Packing sorts rows by length (descending) and lays the embeddings out step by step, so
        # step t touches just the first batch_sizes[t] rows: finished captions cost nothing.
        packed = pack_padded_sequence(self.embedding(tokens), lengths, batch_first=True, enforce_sorted=False)
        order = packed.sorted_indices
        features = features.index_select(0, order)
        h, c, _, projected = self.init_state(features)  # attention projection computed once per batch

        hiddens, alphas, offset = [], [], 0
        for batch_size in packed.batch_sizes.tolist():
            embedded = packed.data[offset:offset + batch_size]  # [b,E]
            offset += batch_size
            h, c, alpha = self._lstm_step(embedded, features[:batch_size], projected[:batch_size],
                                          h[:batch_size], c[:batch_size])
            hiddens.append(h)
            alphas.append(alpha)

        # One vocabulary matmul over all valid positions: [sum(lengths),H] -> [sum(lengths),V].
        logits = self.fc(self.dropout(torch.cat(hiddens)))
        logits = _unpack(logits, packed, tokens.size(1))  # [B,T,V], original row order
        # Doubly stochastic attention: each cell should get about one unit of attention over the
        # caption. Padded steps unpack as zeros, so the sum covers valid steps only.
        alphas = _unpack(torch.cat(alphas), packed, tokens.size(1))  # [B,T,P]
        # Averaged over the P cells (not summed as in the paper) so alpha_c means the same for any grid size.
        extra_loss = self.alpha_c * ((1.0 - alphas.sum(dim=1)) ** 2).mean()
        return logits, extra_loss
