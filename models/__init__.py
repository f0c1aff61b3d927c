"""CaptionModel = EncoderCNN + one decoder, built from a config."""
import torch.nn as nn
import torch.nn.functional as F

from models.encoder import EncoderCNN

DECODERS = ["lstm", "attention", "transformer"]


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


def check_teacher_forcing(features, tokens, lengths, decoder: str):
    """One readable line when a decoder's forward() gets mismatched inputs; returns lengths on the CPU, or
    left on a CUDA device, whose values are not checked: reading them would wait for the GPU (and a CUDA
    graph's capture forbids it)."""
    if tokens.size(0) != features.size(0) or lengths.numel() != tokens.size(0):
        raise ValueError(f"{decoder}: batch sizes differ (features {features.size(0)}, tokens "
                         f"{tokens.size(0)}, lengths {lengths.numel()}); pass one row per image")
    if lengths.is_cuda:
        return lengths
    lengths = lengths.cpu()
    if lengths.min() < 1 or lengths.max() > tokens.size(1):
        raise ValueError(f"{decoder}: lengths must lie in [1, {tokens.size(1)}] (tokens.size(1)), "
                         f"got {lengths.tolist()}; pass the count of valid input tokens per row")
    return lengths


def build_model(config: dict, vocab_size: int) -> CaptionModel:
    m = config["model"]
    if m["decoder"] not in DECODERS:
        raise ValueError(f"model.decoder={m['decoder']!r} is not one of {', '.join(DECODERS)}")
    spatial = m["decoder"] != "lstm"
    encoder = EncoderCNN(m["encoder"], m["encoder_weights"], m["embed_size"], spatial,
                         tail_blocks=config["train"]["fine_tune_encoder"])
    if m["decoder"] == "lstm":
        from models.decoder_lstm import DecoderRNN
        decoder = DecoderRNN(m["embed_size"], vocab_size, m["hidden_size"], m["dropout"])
    elif m["decoder"] == "attention":
        from models.decoder_attention import AttentionDecoder
        decoder = AttentionDecoder(encoder.feature_dim, vocab_size, m["embed_size"], m["hidden_size"],
                                   m["attention_size"], m["dropout"], m["alpha_c"])
    else:
        from models.decoder_transformer import TransformerDecoder
        decoder = TransformerDecoder(encoder.feature_dim, vocab_size, m["embed_size"], m["num_layers"],
                                     m["num_heads"], m["dropout"])
    return CaptionModel(encoder, decoder)
