"""TransformerDecoder: a pre-norm Transformer caption decoder over the encoder's feature grid.

Each layer: causal self-attention over the words so far, cross-attention over the P grid
cells, a GELU MLP (4x); LayerNorm before each sublayer and once at the end. The grid gets
Linear(C -> d) plus learned row and column embeddings (a square grid, side = isqrt(P)).
Words get a learned 1-D position embedding; token embeddings are NOT scaled by sqrt(d)
(GPT-2 style: embeddings and positions both start at std 0.02), and the output
projection shares its weight with the token embedding.

Shares the decoder interface used by decoding.py:
    forward(features, tokens, lengths) -> (logits [B,T,V], extra_loss = 0)   teacher forcing
    init_state(features) -> tuple of batch-first tensors                     key/value cache
    step(tokens, state) -> (logits [B,V], new_state, attention [B,P])        one new query per step
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import ModelConfig
from models.teacher_forcing import check_teacher_forcing
from utils import UserError

READS_GRID = True


def build(m: ModelConfig, feature_dim: int, vocab_size: int):
    """The decoder of a config's model section."""
    return TransformerDecoder(feature_dim, vocab_size, m)


class DecoderBlock(nn.Module):
    """x + SelfAttention(LN x); x + CrossAttention(LN x, grid); x + MLP(LN x)."""

    def __init__(self, d_model: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads, self.attention_dropout = num_heads, dropout
        self.norm_self, self.norm_cross, self.norm_mlp = (nn.LayerNorm(d_model) for _ in range(3))
        self.self_qkv = nn.Linear(d_model, 3 * d_model)
        self.self_out = nn.Linear(d_model, d_model)
        self.cross_q = nn.Linear(d_model, d_model)
        self.cross_kv = nn.Linear(d_model, 2 * d_model)
        self.cross_out = nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))
        self.dropout = nn.Dropout(dropout)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B,T,d] -> [B,heads,T,d/heads]"""
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def grid_keys_values(self, grid: torch.Tensor):
        """grid [B,P,d] -> cross-attention keys, values [B,heads,P,d/heads]; computed once per image."""
        keys, values = self.cross_kv(grid).chunk(2, dim=-1)
        return self.split_heads(keys), self.split_heads(values)

    def forward(self, x, cross_k, cross_v, past_k=None, past_v=None, need_weights=False):
        """x [B,T,d]; cross_k/v [B,h,P,dh]; past_k/v [B,h,t,dh]: the cache of earlier positions, or None
        when x is the whole prefix (with a cache, x must be the one next position, T = 1).
        -> x [B,T,d], self-attention keys/values [B,h,t+T,dh], cross weights [B,h,T,P] or None."""
        p = self.attention_dropout if self.training else 0.0
        q, k, v = (self.split_heads(z) for z in self.self_qkv(self.norm_self(x)).chunk(3, dim=-1))
        if past_k is not None:
            k, v = torch.cat([past_k.to(k.dtype), k], dim=2), torch.cat([past_v.to(v.dtype), v], dim=2)
        # A single new query may see every cached position; only a whole prefix needs the causal mask.
        attended = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=past_k is None)
        x = x + self.dropout(self.self_out(attended.transpose(1, 2).flatten(2)))

        q = self.split_heads(self.cross_q(self.norm_cross(x)))                      # [B,h,T,dh]
        weights = None
        if need_weights:   # explicit softmax to return the weights (only in step(): one query, cheap)
            weights = torch.softmax(q @ cross_k.transpose(-2, -1) * q.size(-1) ** -0.5, dim=-1)  # [B,h,T,P]
            attended = weights.to(cross_v.dtype) @ cross_v
        else:
            attended = F.scaled_dot_product_attention(q, cross_k, cross_v, dropout_p=p)
        x = x + self.dropout(self.cross_out(attended.transpose(1, 2).flatten(2)))
        x = x + self.dropout(self.mlp(self.norm_mlp(x)))
        return x, k, v, weights


class TransformerDecoder(nn.Module):
    def __init__(self, feature_dim: int, vocab_size: int, config: ModelConfig, *, max_len: int = 64,
                 max_grid_side: int = 32):
        """feature_dim: the grid's channels; config: the model section (embed_size is the model's width d,
        num_layers, num_heads, dropout). max_len: the longest caption, in positions; max_grid_side: the widest grid,
        in cells (both size the position embeddings)."""
        super().__init__()
        d_model, num_layers, num_heads, dropout = config.embed_size, config.num_layers, config.num_heads, config.dropout
        if num_layers < 1 or d_model % num_heads:
            raise UserError(f"decoder_transformer.py: model.num_layers={num_layers}, model.embed_size={d_model}, "
                            f"model.num_heads={num_heads}; use num_layers >= 1 and an embed_size that is a "
                            f"multiple of num_heads")
        self.feature_dim, self.max_len, self.max_grid_side = feature_dim, max_len, max_grid_side
        self.grid_proj = nn.Linear(feature_dim, d_model)
        self.grid_rows = nn.Embedding(max_grid_side, d_model)
        self.grid_cols = nn.Embedding(max_grid_side, d_model)
        self.grid_norm = nn.LayerNorm(d_model)
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.positions = nn.Embedding(max_len, d_model)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(DecoderBlock(d_model, num_heads, dropout) for _ in range(num_layers))
        self.final_norm = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, vocab_size)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
        self.fc.weight = self.embedding.weight   # tied: one Parameter reads words in and scores them out

    def encode_grid(self, features: torch.Tensor) -> torch.Tensor:
        """features [B,P,C] -> grid [B,P,d] with 2-D positions; P = side * side, cells in row-major order."""
        if features.dim() != 3 or features.size(2) != self.feature_dim:
            raise ValueError(f"decoder_transformer.py: features have shape {tuple(features.shape)}, expected "
                             f"[B, P, {self.feature_dim}]; use a spatial encoder whose feature_dim matches the decoder")
        side = math.isqrt(features.size(1))
        if side * side != features.size(1) or side > self.max_grid_side:
            raise ValueError(f"decoder_transformer.py: a grid of {features.size(1)} cells is not a square of side "
                             f"<= {self.max_grid_side}; use a square data.image_size of at most {32 * self.max_grid_side}")
        cells = torch.arange(side * side, device=features.device)
        grid = self.grid_proj(features) + self.grid_rows(cells // side) + self.grid_cols(cells % side)
        return self.dropout(self.grid_norm(grid))

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens [B,T] or [B], positions broadcastable to them -> [B,T,d] or [B,d]"""
        return self.dropout(self.embedding(tokens) + self.positions(positions))

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor):
        """Teacher forcing. features [B,P,C], tokens [B,T], lengths [B] -> logits [B,T,V], extra_loss [] (0).

        The causal mask alone keeps padding out of the valid logits: pads only follow a row's words.
        """
        lengths = check_teacher_forcing(features, tokens, lengths, "decoder_transformer.py")
        if tokens.size(1) > self.max_len:
            raise UserError(f"decoder_transformer.py: captions of {tokens.size(1)} tokens exceed the decoder's "
                            f"max_len={self.max_len}; set data.max_caption_len to at most {self.max_len - 1}")
        grid = self.encode_grid(features)
        x = self.embed(tokens, torch.arange(tokens.size(1), device=tokens.device))   # [B,T,d]
        for block in self.blocks:
            x = block(x, *block.grid_keys_values(grid))[0]
        return self.fc(self.final_norm(x)), features.new_zeros(())                    # [B,T,V]

    def init_state(self, features: torch.Tensor):
        """features [B,P,C] -> (position [B], then per layer: self_k, self_v [B,h,0,dh], cross_k, cross_v [B,h,P,dh])."""
        grid = self.encode_grid(features)
        state = [torch.zeros(features.size(0), dtype=torch.long, device=features.device)]
        for block in self.blocks:
            cross_k, cross_v = block.grid_keys_values(grid)
            empty = cross_k[:, :, :0]            # no words yet: the self-attention cache starts empty
            state += [empty, empty, cross_k, cross_v]
        return tuple(state)

    def step(self, tokens: torch.Tensor, state):
        """tokens [B] (previous word) -> logits [B,V], state with caches one longer, attention [B,P]
        (the last layer's cross-attention, averaged over heads)."""
        position, *caches = state
        if caches[0].size(2) >= self.max_len:
            raise UserError(f"decoder_transformer.py: cannot generate more than max_len={self.max_len} words; "
                            f"set decode.max_len to at most {self.max_len}")
        x = self.embed(tokens, position).unsqueeze(1)                                 # [B,1,d]
        new_state = [position + 1]
        for i, block in enumerate(self.blocks):
            past_k, past_v, cross_k, cross_v = caches[4 * i:4 * i + 4]
            x, k, v, weights = block(x, cross_k, cross_v, past_k, past_v, need_weights=i == len(self.blocks) - 1)
            new_state += [k, v, cross_k, cross_v]                                     # k, v: [B,h,t+1,dh]
        logits = self.fc(self.final_norm(x[:, 0]))                                    # [B,V]
        return logits, tuple(new_state), weights[:, :, 0].mean(dim=1)                 # [B,h,1,P] -> [B,P]
