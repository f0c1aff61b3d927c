"""CaptionModel = EncoderCNN + one decoder, built from a config's model section.

The decoders are the modules models/decoder_<name>.py, one per choice of model.decoder (config.py lists
them): each has build(model_section, feature_dim, vocab_size) and READS_GRID, whether it attends over the
CNN's grid or reads it mean-pooled. Adding a decoder is its file, its name among model.decoder's choices,
and a config in configs/.
"""
import importlib

import torch.nn as nn
import torch.nn.functional as F

from config import Config
from models.encoder import EncoderCNN


class CaptionModel(nn.Module):
    def __init__(self, encoder: EncoderCNN, decoder: nn.Module, pad_id: int = 0):
        super().__init__()
        self.encoder, self.decoder, self.pad_id = encoder, decoder, pad_id

    def forward(self, inputs, captions, lengths, label_smoothing: float = 0.0, normalizer=None, image_of_row=None,
                log_probs=False):
        """Teacher forcing. inputs: what the feature cache holds for each image (encoder.trunk's output: the grid
        [N,P,C], or the map entering a fine-tuned tail); captions [B,L] = <start> .. <end> <pad>..; lengths [B];
        image_of_row [B]: the image (row of inputs) each caption describes, when it is not row i for caption i.
        So a fine-tuned tail runs once per image, for all of its captions. Returns (loss, extra_loss).

        The loss is summed over target tokens and divided by `normalizer` (default: their count),
        so data-parallel ranks can each divide by the global batch's count and sum to its mean.
        log_probs=True returns instead each caption's summed log-probability of its words and <end>, [B]
        (self-critical training; through forward, so that DDP averages its gradients).
        """
        features = self.encoder.tail(inputs)
        if image_of_row is not None:
            features = features[image_of_row]
        tokens, targets = captions[:, :-1], captions[:, 1:]                          # [B, L-1] each
        logits, extra_loss = self.decoder(self.encoder.project(features), tokens, lengths - 1)
        if log_probs:
            picked = F.log_softmax(logits.float(), dim=-1).gather(2, targets.unsqueeze(2)).squeeze(2)  # [B, L-1]
            return picked.masked_fill(targets == self.pad_id, 0.0).sum(1)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                               ignore_index=self.pad_id, label_smoothing=label_smoothing, reduction="sum")
        return loss / (normalizer if normalizer is not None else (targets != self.pad_id).sum()), extra_loss

    def init_state(self, features):
        return self.decoder.init_state(self.encoder.project(features))

    def step(self, tokens, state):
        return self.decoder.step(tokens, state)


def build_model(config: Config, vocab_size: int) -> CaptionModel:
    m = config.model
    decoder = importlib.import_module(f"models.decoder_{m.decoder}")
    encoder = EncoderCNN(m.encoder, m.encoder_weights, m.embed_size, decoder.READS_GRID,
                         tail_blocks=config.train.fine_tune_encoder)
    return CaptionModel(encoder, decoder.build(m, encoder.feature_dim, vocab_size))
