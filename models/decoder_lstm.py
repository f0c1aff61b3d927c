"""DecoderRNN: Show and Tell (Vinyals et al. 2015).

The projected image feature is the LSTM's first input; its output there is not used.
Then the caption's words follow, from <start>, each predicting the next one.
"""
import torch
import torch.nn as nn

from config import ModelConfig
from data.text.vocab import Vocabulary
from models.teacher_forcing import check_teacher_forcing

READS_GRID = False      # it reads the grid mean-pooled and embedded (EncoderCNN.project)


def build(m: ModelConfig, feature_dim: int, vocab_size: int):
    """The decoder of a config's model section. The CNN's width (feature_dim) is not its concern: it reads the
    image as EncoderCNN.project embeds it, m.embed_size wide."""
    return DecoderRNN(vocab_size, m)


class DecoderRNN(nn.Module):
    def __init__(self, vocab_size: int, config: ModelConfig):
        """config: the model section (embed_size: the image's and the words' width, hidden_size, dropout)."""
        super().__init__()
        self.embed = nn.Embedding(vocab_size, config.embed_size, padding_idx=Vocabulary.pad_id)
        self.lstm = nn.LSTM(config.embed_size, config.hidden_size, batch_first=True)
        self.dropout = nn.Dropout(config.dropout)
        self.fc = nn.Linear(config.hidden_size, vocab_size)

    def forward(self, features, tokens, lengths):
        """features [B,E], tokens [B,T] from <start>, lengths [B] -> (logits [B,T,V], zero extra loss).

        The padded batch runs unpacked: the LSTM reads left to right, so an output never depends on
        the padding after it, and the loss ignores padded targets. Packing would give the same logits
        but costs a host-device sync per batch (its sort indices), which stalls a GPU step.
        """
        check_teacher_forcing(features, tokens, lengths, "decoder_lstm.py")
        inputs = torch.cat([features.unsqueeze(1), self.embed(tokens)], dim=1)       # [B, 1+T, E]
        hidden, _ = self.lstm(inputs)                                                # [B, 1+T, H]
        logits = self.fc(self.dropout(hidden[:, 1:]))                                # [B, T, V]
        return logits, logits.new_zeros(())

    def init_state(self, features):
        """Feed the image: returns (h, c), each [B, 1, H] (batch first, so beam search can reorder it)."""
        _, (h, c) = self.lstm(features.unsqueeze(1))                                  # [1, B, H] each
        return h.transpose(0, 1), c.transpose(0, 1)

    def step(self, tokens, state):
        """tokens [B] -> (logits [B,V], state, no attention)."""
        h, c = (s.transpose(0, 1).contiguous() for s in state)
        out, (h, c) = self.lstm(self.embed(tokens).unsqueeze(1), (h, c))             # out [B, 1, H]
        return self.fc(out[:, 0]), (h.transpose(0, 1), c.transpose(0, 1)), None
