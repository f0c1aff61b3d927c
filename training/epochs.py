"""An epoch's steps as train.py runs them: which rows each step takes, and the update it makes.

Both kinds of step share one small interface:

    steps.per_epoch                   # steps in an epoch
    steps.start_epoch(epoch)          # this epoch's seeded order of rows (and its mirrored images)
    loss, reward = steps.run(b)       # step b's update -> its loss (on the device), its samples' mean reward (nan)

CrossEntropySteps train on captions: batches of captions, or, when the CNN's tail trains, batches of
images with all their captions, so that the tail runs once per image. SelfCriticalSteps sample captions
for a batch of images and reward them with CIDEr-D (training.scst). Each global batch of
train.batch_size rows is shared out among the ranks; a last batch with under 2 rows per rank is left
out, and reshuffled into the next epoch: BatchNorm cannot train on one row.
"""
import math

import torch

from data.features.store import FeatureFeed, fits_on_device
from data.mirror import Mirroring
from training.cuda_graphs import graphed_step
from training.scst import SelfCritical
from training.step import captions_of_images, epoch_order, training_step
from utils import UserError


class Steps:
    """An epoch over n_rows rows in a seeded order, global batches of train.batch_size, each rank its share."""

    def __init__(self, n_rows: int, config, optimization, rank: int, world: int):
        self.n_rows, self.batch_size, self.seed = n_rows, config.train.batch_size, config.train.seed
        self.config, self.optimization, self.rank, self.world = config, optimization, rank, world
        self.per_epoch = n_rows // self.batch_size + (n_rows % self.batch_size >= 2 * world)
        if not self.per_epoch:
            raise UserError(f"{n_rows} training rows are too few for {world} process(es) at train.batch_size="
                            f"{self.batch_size}: each needs at least 2 per batch; add images or lower the process count")
        self.order = None

    def start_epoch(self, epoch: int) -> None:
        self.order = torch.randperm(self.n_rows, generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))

    def rows(self, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the global batch's rows, this rank's share of them, its share of the next batch, to prefetch)."""
        share = slice(self.rank, None, self.world)
        rows, next_rows = self.order[b * self.batch_size:(b + 1) * self.batch_size], \
            self.order[(b + 1) * self.batch_size:(b + 2) * self.batch_size]
        return rows, rows[share], next_rows[share]

    def close(self) -> None:
        self.feed.close()


class CrossEntropySteps(Steps):
    def __init__(self, model, step_model, train_set: dict, vocab, config, optimization, device, rank: int, world: int):
        t = config.train
        self.by_image = model.encoder.tail_blocks > 0
        self.n_images = len(train_set["names"])
        super().__init__(self.n_images if self.by_image else len(train_set["tokens"]), config, optimization, rank, world)
        self.step_model, self.device, self.train_set = step_model, device, train_set
        self.on_device = fits_on_device(train_set["inputs"].nbytes, device, t.cache_on_device)
        self.feed = FeatureFeed(train_set["inputs"], device, self.on_device)
        self.tokens, self.lengths = train_set["tokens"].to(device), train_set["lengths"]
        self.image_index, self.host_index = train_set["image_index"].to(device), train_set["image_index"]
        self.image_row = torch.arange(self.n_images)        # each image's row of the inputs (mirrored ones: N + i)
        self.first_caption = torch.searchsorted(self.host_index, self.image_row)   # an image's captions: consecutive
        self.caption_count = torch.bincount(self.host_index, minlength=self.n_images)
        self.mirror = Mirroring(vocab, train_set["tokens"], self.host_index, self.n_images, t.seed) if t.hflip else None
        self.graphed = None if self.by_image else graphed_step(
            model, optimization.decoder_params, self.feed.inputs, self.image_index if self.on_device else None,
            self.tokens, self.lengths, config, world, optimization.scaler)

    def start_epoch(self, epoch: int) -> None:
        t = self.config.train
        if self.by_image:
            super().start_epoch(epoch)
        else:
            self.order = epoch_order(self.lengths, self.batch_size, self.seed * 1000 + epoch, t.batch_by_length)
        self.order_on_device = self.order.to(self.device)
        if self.mirror:        # this epoch's mirrored images; tokens and image_index change in place (CUDA graphs)
            tokens, self.host_index, self.image_row = self.mirror.epoch(epoch)
            self.tokens.copy_(tokens)
            self.image_index.copy_(self.host_index)

    def run(self, b: int) -> tuple[torch.Tensor, float]:
        rows, mine, next_mine = self.rows(b)
        o = self.optimization
        if self.by_image:       # all captions of each image: the fine-tuned blocks run once per image
            caption_rows, image_of_row = captions_of_images(self.first_caption, self.caption_count, mine)
            every = captions_of_images(self.first_caption, self.caption_count, rows)[0]
            # Each rank divides its loss sum by the global token count (times world, as DDP averages).
            normalizer = (self.lengths[every] - 1).sum().item() / self.world
            inputs = self.feed.batch(self.image_row[mine], self.image_row[next_mine])
            return training_step(self.step_model, o.optimizer, o.scaler, None, caption_rows, self.lengths[caption_rows],
                                 inputs, None, self.tokens, self.config, o.amp, normalizer,
                                 image_of_row.to(self.device)), math.nan
        normalizer = (self.lengths[rows] - 1).sum().item() / self.world
        on_device = self.order_on_device[b * self.batch_size:(b + 1) * self.batch_size][self.rank::self.world]
        inputs = self.feed.inputs if self.on_device else self.feed.batch(self.host_index[mine], self.host_index[next_mine])
        return training_step(self.step_model, o.optimizer, o.scaler, self.graphed, on_device, self.lengths[mine],
                             inputs, self.image_index if self.on_device else None, self.tokens, self.config, o.amp,
                             normalizer), math.nan

    def describe(self) -> str:
        return (f"{' (CUDA graphs)' if self.graphed else ''}{'' if self.on_device else ' (features streamed)'}"
                f" | {self.n_images} train images, {len(self.tokens)} captions")


class SelfCriticalSteps(Steps):
    def __init__(self, model, step_model, train_set: dict, vocab, config, optimization, device, rank: int, world: int):
        super().__init__(len(train_set["names"]), config, optimization, rank, world)
        self.model, self.step_model, self.names, self.device = model, step_model, train_set["names"], device
        self.on_device = fits_on_device(train_set["inputs"].nbytes, device, config.train.cache_on_device)
        self.feed = FeatureFeed(train_set["inputs"], device, self.on_device)
        self.scst = SelfCritical(train_set["references"], vocab, config)
        self.n_captions = len(train_set["tokens"])

    def run(self, b: int) -> tuple[torch.Tensor, float]:
        rows, mine, next_mine = self.rows(b)
        o = self.optimization
        loss, reward = self.scst.loss(self.model, self.step_model, self.feed.batch(mine, next_mine),
                                      [self.names[i] for i in mine.tolist()], len(rows) * self.scst.k / self.world,
                                      o.amp)
        o.step(loss)
        return loss, reward

    def describe(self) -> str:
        return (f"{'' if self.on_device else ' (features streamed)'} | {len(self.names)} train images, "
                f"{self.n_captions} captions")
