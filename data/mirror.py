"""Mirrored images as more training data (train.hflip): each epoch, every train image is seen mirrored
with probability one half, and its captions then say "right" for "left" and "left" for "right".

The train split's inputs then hold 2N rows, image i at row i and mirrored at N + i
(data.prepare.prepare_splits).
"""
import torch

SWAPPED_WORDS = (("left", "right"),)


class Mirroring:
    def __init__(self, vocab, tokens: torch.Tensor, image_index: torch.Tensor, n_images: int, seed: int):
        """tokens [R, L] and image_index [R] of the train captions, unmirrored, on the CPU."""
        self.tokens, self.image_index, self.n_images, self.seed = tokens.clone(), image_index.clone(), n_images, seed
        self.swap = torch.arange(len(vocab))
        for a, b in SWAPPED_WORDS:
            if a in vocab.stoi and b in vocab.stoi:
                self.swap[vocab.stoi[a]], self.swap[vocab.stoi[b]] = vocab.stoi[b], vocab.stoi[a]

    def epoch(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This epoch's draw -> (tokens [R, L] with the mirrored images' captions swapped, image_index [R] of
        input rows, each image's input row [N])."""
        mirrored = torch.rand(self.n_images, generator=torch.Generator().manual_seed(self.seed + epoch)) < 0.5
        row_mirrored = mirrored[self.image_index]
        tokens = torch.where(row_mirrored[:, None], self.swap[self.tokens], self.tokens)
        return tokens, self.image_index + self.n_images * row_mirrored, torch.arange(self.n_images) + self.n_images * mirrored
