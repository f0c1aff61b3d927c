"""Self-critical sequence training (Rennie et al. 2017), in its "new" form (Luo 2020).

For each image, K captions are sampled from the model (train.scst_samples). Each sample's reward is
its CIDEr-D against the image's training references, with document frequencies fixed over all of them
(evaluation.cider); its baseline is the mean reward of the image's other K-1 samples. The loss is
minus the advantage times the sample's summed log-probability, <end> included. Sampling and the
log-probabilities both run with dropout off: the policy that is scored is the one that is improved.

    scst = SelfCritical(train_references, vocab, config)
    loss, mean_reward = scst.loss(model, features, names, normalizer)
"""
import numpy as np
import torch

from config import Config
from evaluation.cider import CiderD
from models.decoding import DecodeSettings, SpecialIds, sample_captions


def leave_one_out_baseline(rewards: np.ndarray, samples_per_image: int) -> np.ndarray:
    """Each sample's baseline: the mean reward of the other K-1 samples of its image (rows image-major)."""
    grouped = rewards.reshape(-1, samples_per_image)
    others = (grouped.sum(1, keepdims=True) - grouped) / (samples_per_image - 1)
    return others.reshape(-1)


class SelfCritical:
    def __init__(self, references: dict[str, list[str]], vocab, config: Config):
        self.reward = CiderD(references)      # n-gram document frequencies: computed once, here
        self.vocab, self.k = vocab, config.train.scst_samples
        self.max_len = config.decode.max_len

    def loss(self, model, step_model, features, names: list[str], normalizer: float, amp):
        """features of images `names` (what the feature cache holds: grids [B,P,C], or the maps that enter a
        fine-tuned tail) -> (loss to minimise, mean reward of the samples).

        model samples (no gradient); step_model (model, or its DDP wrapper) computes the log-probabilities,
        so that data-parallel ranks average their gradients. The loss is summed over this rank's samples and
        divided by normalizer (the global batch's sample count over the number of ranks)."""
        model.eval()
        with amp, torch.no_grad():
            tokens, lengths = sample_captions(model, model.encoder.tail(features), self.k,
                                              DecodeSettings(max_len=self.max_len), SpecialIds.of(self.vocab))
        captions = [self.vocab.decode(row[1:]) for row in tokens.tolist()]
        rewards = self.reward.score(captions, [name for name in names for _ in range(self.k)])
        advantage = torch.as_tensor(rewards - leave_one_out_baseline(rewards, self.k), dtype=torch.float32,
                                    device=features.device)
        image_of_row = torch.arange(len(features), device=features.device).repeat_interleave(self.k)
        with amp:
            log_probs = step_model(features, tokens, lengths, image_of_row=image_of_row, log_probs=True)
        model.train()
        return -(advantage * log_probs).sum() / normalizer, float(rewards.mean())
