"""UpDownDecoder: the top-down attention decoder of Anderson et al. 2018 ("Bottom-Up and Top-Down
Attention for Image Captioning"), over the CNN's grid of features.

Two LSTMs run per word:
- the attention LSTM reads the language LSTM's previous state, the mean image feature and the previous
  word; its state decides where to look: soft attention over the grid's P cells;
- the language LSTM reads the attended feature and the attention LSTM's state, and predicts the word.

The grid is first embedded to hidden_size (Linear, ReLU, dropout), as the widely used PyTorch
implementation does, so that both LSTMs and the attention work at one width whatever the CNN's.

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
    return UpDownDecoder(feature_dim, vocab_size, m)


class UpDownDecoder(nn.Module):
    def __init__(self, feature_dim: int, vocab_size: int, config: ModelConfig):
        """feature_dim: the grid's channels; config: the model section (embed_size, hidden_size, attention_size,
        dropout)."""
        super().__init__()
        embed_size, hidden_size, attention_size = config.embed_size, config.hidden_size, config.attention_size
        self.feature_dim, self.hidden_size = feature_dim, hidden_size
        self.embedding = nn.Embedding(vocab_size, embed_size, padding_idx=Vocabulary.pad_id)
        self.grid_embed = nn.Sequential(nn.Linear(feature_dim, hidden_size), nn.ReLU(), nn.Dropout(config.dropout))
        self.cell_keys = nn.Linear(hidden_size, attention_size)      # each cell's side of the attention score
        self.query = nn.Linear(hidden_size, attention_size)          # the attention LSTM's side
        self.score = nn.Linear(attention_size, 1)
        self.attention_lstm = nn.LSTMCell(hidden_size + hidden_size + embed_size, hidden_size)
        self.language_lstm = nn.LSTMCell(hidden_size + hidden_size, hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.fc = nn.Linear(hidden_size, vocab_size)
        # Small uniform init as in the reference implementations; training is less jumpy early on.
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.uniform_(self.fc.weight, -0.1, 0.1)
        nn.init.zeros_(self.fc.bias)

    def _check(self, features: torch.Tensor) -> None:
        if features.dim() != 3 or features.size(2) != self.feature_dim:
            raise ValueError(f"decoder_updown.py: features have shape {tuple(features.shape)}, expected "
                             f"[B, P, {self.feature_dim}]; use a spatial encoder whose feature_dim matches the decoder")

    def init_state(self, features: torch.Tensor):
        """features [B,P,C] -> (h_att, c_att, h_lang, c_lang [B,H], mean cell [B,H], cells [B,P,H], keys [B,P,A]).

        The cells, their mean and their attention keys are computed once per image; the LSTMs start at zero."""
        self._check(features)
        cells = self.grid_embed(features)
        keys = self.cell_keys(cells)
        zeros = cells.new_zeros(features.size(0), self.hidden_size)
        return zeros, zeros, zeros, zeros, cells.mean(dim=1), cells, keys

    def _step(self, embedded, state):
        """One word: embedded [b,E] and the state -> (the language LSTM's output h [b,H], new state, alpha [b,P])."""
        h_att, c_att, h_lang, c_lang, mean_cell, cells, keys = state
        h_att, c_att = self.attention_lstm(torch.cat([h_lang, mean_cell, embedded], dim=1), (h_att, c_att))
        scores = self.score(torch.tanh(keys + self.query(h_att).unsqueeze(1))).squeeze(2)     # [b,P]
        alpha = torch.softmax(scores, dim=1)
        attended = torch.bmm(alpha.unsqueeze(1).to(cells.dtype), cells).squeeze(1)         # [b,H]
        h_lang, c_lang = self.language_lstm(torch.cat([attended, h_att], dim=1), (h_lang, c_lang))
        return h_lang, (h_att, c_att, h_lang, c_lang, mean_cell, cells, keys), alpha

    def step(self, tokens: torch.Tensor, state):
        """tokens [B] (previous word) -> logits [B,V], new state, alpha [B,P]."""
        embedded = self.embedding(tokens).to(state[5].dtype)
        h, state, alpha = self._step(embedded, state)
        return self.fc(self.dropout(h)), state, alpha

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor):
        """Teacher forcing. features [B,P,C], tokens [B,T], lengths [B] -> logits [B,T,V], zero extra loss.

        Every row runs all T steps: the loss ignores a finished row's extra steps, which change nothing before
        them (as in decoder_attention.py)."""
        self._check(features)
        check_teacher_forcing(features, tokens, lengths, "decoder_updown.py")
        state = self.init_state(features)
        embedded = self.embedding(tokens).to(state[5].dtype)                          # [B,T,E]
        outputs = []
        for step_embedded in embedded.unbind(1):
            h, state, _ = self._step(step_embedded, state)
            outputs.append(h)
        logits = self.fc(self.dropout(torch.stack(outputs, 1)))     # one vocabulary matmul after the loop: [B,T,V]
        return logits, logits.new_zeros(())
