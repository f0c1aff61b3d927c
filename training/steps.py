"""A training step, every kind of it: which rows it takes, its loss and its update.

train.py runs an epoch's steps through one small interface:

    steps = CrossEntropySteps(setup, train_set, vocab)   # or SelfCriticalSteps (train.scst)
    steps.per_epoch                   # steps in an epoch
    steps.start_epoch(epoch)          # this epoch's seeded order of rows (and its mirrored images)
    loss, reward = steps.run(b)       # step b's update -> its loss (on the device), its samples' mean reward (nan)

CrossEntropySteps train on captions: batches of captions, or, when the CNN's tail trains, batches of
images with all their captions, so that the tail runs once per image. Either way a step is
cross_entropy_step: the teacher-forced loss of a Batch (batch_loss, under autocast), then
optimizer_step (backward, the fp16 loss scale, gradient clipping, the update). On one GPU a full
batch of captions replays a CUDA graph of the same step instead (training.cuda_graphs).
SelfCriticalSteps sample captions for a batch of images and reward them with CIDEr-D
(training.scst), then make the same optimizer_step.

Each global batch of train.batch_size rows is shared out among the ranks; a last batch with under 2 rows
per rank is left out, and reshuffled into the next epoch: BatchNorm cannot train on one row.
"""
import math
from dataclasses import dataclass

import torch

from config import Config
from data.features.store import FeatureFeed, fits_on_device
from data.mirror import Mirroring
from training.cuda_graphs import graphed_step
from training.optimization import Optimization
from training.scst import SelfCritical
from utils import UserError

BUCKET_BATCHES = 50   # train.batch_by_length sorts runs of this many batches: longer runs, more even lengths


@dataclass
class TrainingSetup:
    """What every step of a run trains with."""
    model: torch.nn.Module          # the model itself: its weights, what is saved and validated
    step_model: torch.nn.Module     # what a step calls: the model, or its DDP wrapper (and torch.compile's)
    config: Config
    optimization: Optimization
    device: torch.device
    rank: int = 0
    world: int = 1


@dataclass
class Batch:
    """A step's captions and the image features they describe."""
    rows: torch.Tensor | slice      # which captions of tokens: indices [B], or a slice
    lengths: torch.Tensor           # [B] tokens per caption, <start> and <end> included (on the CPU)
    tokens: torch.Tensor            # the caption table [N_captions, L] that rows index
    inputs: torch.Tensor            # what the feature cache holds: every image's [N_images, ...], or the batch's own
    image_index: torch.Tensor | None = None    # [N_captions]: each caption's image, a row of inputs (all images')
    image_of_row: torch.Tensor | None = None   # [B]: each caption's image among the batch's own (a fine-tuned tail)
    normalizer: float | None = None            # what the loss sum is divided by (default: the batch's target tokens)

    def captions(self) -> torch.Tensor:
        """[B, T]: the batch's captions, cut to its longest."""
        return self.tokens[self.rows, :int(self.lengths.max())]

    def features(self) -> torch.Tensor:
        """The inputs the model reads: one per caption, or one per image where image_of_row says which."""
        return self.inputs if self.image_index is None else self.inputs[self.image_index[self.rows]]


def batch_loss(model, batch: Batch, amp, label_smoothing: float):
    """Teacher-forced loss of one batch under autocast `amp` -> (loss, extra loss) (CaptionModel.forward)."""
    with amp:
        return model(batch.features(), batch.captions(), batch.lengths, label_smoothing, batch.normalizer,
                     batch.image_of_row)


def optimizer_step(optimization: Optimization, loss) -> None:
    """Backward and one update: the loss scaled under fp16 autocast, gradients clipped to train.grad_clip."""
    optimizer, scaler = optimization.optimizer, optimization.scaler
    optimizer.zero_grad(set_to_none=True)
    if scaler:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], optimization.grad_clip)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def cross_entropy_step(setup: TrainingSetup, batch: Batch, graphed=None) -> torch.Tensor:
    """One update on a batch of captions -> its loss, on the device. A full batch replays `graphed` (a
    cuda_graphs.GraphedStep, or None) where it can: the graph holds all but the optimizer's update. Anything
    else steps eagerly; both compute the same loss and update."""
    o = setup.optimization
    if graphed is not None and len(batch.rows) == setup.config.train.batch_size:
        loss = graphed(batch.rows, int(batch.lengths.max()))
        if loss is not None:
            o.optimizer.step()
            return loss
    loss, extra = batch_loss(setup.step_model, batch, o.amp, setup.config.train.label_smoothing)
    optimizer_step(o, loss + extra)
    return loss


class Steps:
    """An epoch over n_rows rows in a seeded order, global batches of train.batch_size, each rank its share."""

    def __init__(self, setup: TrainingSetup, n_rows: int):
        t = setup.config.train
        self.setup, self.n_rows, self.batch_size, self.seed = setup, n_rows, t.batch_size, t.seed
        self.rank, self.world = setup.rank, setup.world
        self.per_epoch = n_rows // self.batch_size + (n_rows % self.batch_size >= 2 * self.world)
        if not self.per_epoch:
            raise UserError(f"{n_rows} training rows are too few for {self.world} process(es) at "
                            f"train.batch_size={self.batch_size}: each needs at least 2 per batch; add images or lower "
                            f"the process count")
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
    def __init__(self, setup: TrainingSetup, train_set: dict, vocab):
        t, device = setup.config.train, setup.device
        self.by_image = setup.model.encoder.tail_blocks > 0
        self.n_images = len(train_set["names"])
        super().__init__(setup, self.n_images if self.by_image else len(train_set["tokens"]))
        self.on_device = fits_on_device(train_set["inputs"].nbytes, device, t.cache_on_device)
        self.feed = FeatureFeed(train_set["inputs"], device, self.on_device)
        self.tokens, self.lengths = train_set["tokens"].to(device), train_set["lengths"]
        self.image_index, self.host_index = train_set["image_index"].to(device), train_set["image_index"]
        self.image_row = torch.arange(self.n_images)        # each image's row of the inputs (mirrored ones: N + i)
        self.first_caption = torch.searchsorted(self.host_index, self.image_row)   # an image's captions: consecutive
        self.caption_count = torch.bincount(self.host_index, minlength=self.n_images)
        self.mirror = Mirroring(vocab, train_set["tokens"], self.host_index, self.n_images, t.seed) if t.hflip else None
        self.graphed = None if self.by_image else graphed_step(
            setup, self.feed.inputs, self.image_index if self.on_device else None, self.tokens, self.lengths)

    def start_epoch(self, epoch: int) -> None:
        if self.by_image:
            super().start_epoch(epoch)
        else:
            self.order = epoch_order(self.lengths, self.batch_size, self.seed * 1000 + epoch,
                                     self.setup.config.train.batch_by_length)
        self.order_on_device = self.order.to(self.setup.device)
        if self.mirror:        # this epoch's mirrored images; tokens and image_index change in place (CUDA graphs)
            tokens, self.host_index, self.image_row = self.mirror.epoch(epoch)
            self.tokens.copy_(tokens)
            self.image_index.copy_(self.host_index)

    def run(self, b: int) -> tuple[torch.Tensor, float]:
        return (self._by_image(b) if self.by_image else self._by_caption(b)), math.nan

    def _by_caption(self, b: int) -> torch.Tensor:
        rows, mine, next_mine = self.rows(b)
        # Each rank divides its loss sum by the global token count (times world, as DDP averages).
        normalizer = (self.lengths[rows] - 1).sum().item() / self.world
        on_device = self.order_on_device[b * self.batch_size:(b + 1) * self.batch_size][self.rank::self.world]
        if self.on_device:
            batch = Batch(on_device, self.lengths[mine], self.tokens, self.feed.inputs, self.image_index,
                          normalizer=normalizer)
        else:
            inputs = self.feed.batch(self.host_index[mine], self.host_index[next_mine])
            batch = Batch(on_device, self.lengths[mine], self.tokens, inputs, normalizer=normalizer)
        return cross_entropy_step(self.setup, batch, self.graphed)

    def _by_image(self, b: int) -> torch.Tensor:
        """All captions of each image: the fine-tuned blocks run once per image."""
        rows, mine, next_mine = self.rows(b)
        caption_rows, image_of_row = captions_of_images(self.first_caption, self.caption_count, mine)
        every = captions_of_images(self.first_caption, self.caption_count, rows)[0]
        normalizer = (self.lengths[every] - 1).sum().item() / self.world
        inputs = self.feed.batch(self.image_row[mine], self.image_row[next_mine])
        batch = Batch(caption_rows, self.lengths[caption_rows], self.tokens, inputs,
                      image_of_row=image_of_row.to(self.setup.device), normalizer=normalizer)
        return cross_entropy_step(self.setup, batch)

    def describe(self) -> str:
        return (f"{' (CUDA graphs)' if self.graphed else ''}{'' if self.on_device else ' (features streamed)'}"
                f" | {self.n_images} train images, {len(self.tokens)} captions")


class SelfCriticalSteps(Steps):
    def __init__(self, setup: TrainingSetup, train_set: dict, vocab):
        super().__init__(setup, len(train_set["names"]))
        self.names = train_set["names"]
        self.on_device = fits_on_device(train_set["inputs"].nbytes, setup.device, setup.config.train.cache_on_device)
        self.feed = FeatureFeed(train_set["inputs"], setup.device, self.on_device)
        self.scst = SelfCritical(train_set["references"], vocab, setup.config)
        self.n_captions = len(train_set["tokens"])

    def run(self, b: int) -> tuple[torch.Tensor, float]:
        rows, mine, next_mine = self.rows(b)
        s = self.setup
        loss, reward = self.scst.loss(s.model, s.step_model, self.feed.batch(mine, next_mine),
                                      [self.names[i] for i in mine.tolist()], len(rows) * self.scst.k / self.world,
                                      s.optimization.amp)
        optimizer_step(s.optimization, loss)
        return loss, reward

    def describe(self) -> str:
        return (f"{'' if self.on_device else ' (features streamed)'} | {len(self.names)} train images, "
                f"{self.n_captions} captions")


def captions_of_images(first_caption, caption_count, images):
    """Caption rows of images [b] (each image's captions are consecutive rows, from first_caption[i], count
    caption_count[i]) -> (caption rows [B], image_of_row [B]: the position in images of each one's image)."""
    counts = caption_count[images]
    image_of_row = torch.repeat_interleave(torch.arange(len(images)), counts)
    starts = counts.cumsum(0) - counts
    caption_rows = first_caption[images][image_of_row] + torch.arange(len(image_of_row)) - starts[image_of_row]
    return caption_rows, image_of_row


def epoch_order(lengths, batch_size: int, seed: int, by_length: bool) -> torch.Tensor:
    """The captions' order for one epoch: a seeded shuffle; batches are order[b*batch_size:(b+1)*batch_size].

    by_length: batches of captions of about the same length, in random order. A batch's time steps
    run one after another up to its longest caption, so on a GPU a step costs about that length.
    The shuffled captions are sorted by length within runs of BUCKET_BATCHES batches; the full
    batches are then shuffled, and the short one stays last.
    """
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=generator)
    if not by_length:
        return order
    chunks = order.split(batch_size * BUCKET_BATCHES)
    order = torch.cat([chunk[lengths[chunk].argsort(stable=True)] for chunk in chunks])
    full = len(order) // batch_size
    batches = order[:full * batch_size].view(full, batch_size)[torch.randperm(full, generator=generator)]
    return torch.cat([batches.flatten(), order[full * batch_size:]])
