"""One training step and what drives it: mixed precision, the optimizer update, the learning-rate
schedule and each epoch's order of captions.

    amp, scaler = make_amp(device, enabled)
    loss = training_step(model, optimizer, scaler, graphed, rows, lengths, inputs, image_index, tokens, config, amp)

On one GPU a full batch replays a CUDA graph of the step (training.cuda_graphs); everywhere else it
runs eagerly. Both compute the same loss and update.
"""
import contextlib
import math
from dataclasses import dataclass

import torch

from training.weight_average import WeightAverage

BUCKET_BATCHES = 50   # train.batch_by_length sorts runs of this many batches: longer runs, more even lengths


def make_amp(device, enabled):
    """bf16 autocast on CUDA where supported, else fp16 with a GradScaler; nothing on CPU/MPS."""
    if not (enabled and device.type == "cuda"):
        return torch.autocast("cpu", enabled=False), None
    if torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16), None
    return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")


def batch_loss(model, inputs, tokens, lengths, config, amp, normalizer=None, label_smoothing=None, image_of_row=None):
    """Teacher-forced loss of one batch -> (loss, extra loss); tokens are cut to the batch's longest caption.
    image_of_row: the row of inputs each caption describes (CaptionModel.forward)."""
    if label_smoothing is None:
        label_smoothing = config.train.label_smoothing
    with amp:
        return model(inputs, tokens[:, :int(lengths.max())], lengths, label_smoothing, normalizer, image_of_row)


def optimizer_step(optimizer, scaler, loss, grad_clip):
    """Backward and one update: the loss scaled under fp16 autocast, gradients clipped to grad_clip."""
    optimizer.zero_grad(set_to_none=True)
    if scaler:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def training_step(model, optimizer, scaler, graphed, rows, lengths, inputs, image_index, tokens, config, amp,
                  normalizer=None, image_of_row=None):
    """One update on caption rows [B] (on the device; lengths [B] on the CPU), replayed as a CUDA graph where
    `graphed` (a cuda_graphs.GraphedStep, or None) takes the batch, else eager. -> the batch's loss, on the device.
    inputs is the image features [N_images, ...] indexed by image_index[rows], or the batch's own [B, ...]
    when image_index is None (streamed from the feature cache), or the batch's images' own [b, ...] that
    image_of_row [B] indexes (a fine-tuned tail runs once per image)."""
    if graphed is not None and len(rows) == config.train.batch_size:
        loss = graphed(rows, int(lengths.max()))
        if loss is not None:
            optimizer.step()
            return loss
    batch_inputs = inputs if image_index is None else inputs[image_index[rows]]
    loss, extra = batch_loss(model, batch_inputs, tokens[rows], lengths, config, amp, normalizer,
                             image_of_row=image_of_row)
    optimizer_step(optimizer, scaler, loss + extra, config.train.grad_clip)
    return loss


def captions_of_images(first_caption, caption_count, images):
    """Caption rows of images [b] (each image's captions are consecutive rows, from first_caption[i], count
    caption_count[i]) -> (caption rows [B], image_of_row [B]: the position in images of each one's image)."""
    counts = caption_count[images]
    image_of_row = torch.repeat_interleave(torch.arange(len(images)), counts)
    starts = counts.cumsum(0) - counts
    caption_rows = first_caption[images][image_of_row] + torch.arange(len(image_of_row)) - starts[image_of_row]
    return caption_rows, image_of_row


@dataclass
class Optimization:
    """What an update needs besides its loss: AdamW over the decoder (and the fine-tuned CNN blocks, at their own
    learning rate), its schedule, autocast and the fp16 loss scale, and the weight average (train.ema_decay)."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR | None      # set by schedule(), once the run's length is known
    amp: torch.autocast
    scaler: torch.amp.GradScaler | None
    average: WeightAverage | None
    decoder_params: list
    grad_clip: float

    def schedule(self, t, total_steps: int) -> None:
        """The learning rate's schedule over a run of total_steps steps (train section t)."""
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(t, total_steps))

    def step(self, loss) -> None:
        optimizer_step(self.optimizer, self.scaler, loss, self.grad_clip)

    def stepped(self) -> None:
        """After each update, however it was made: the schedule's step and the average's."""
        self.scheduler.step()
        if self.average:
            self.average.update()

    def averaged(self):
        """A context in which the model holds the averaged weights (or its own, without an average)."""
        return self.average.swapped_in() if self.average else contextlib.nullcontext()

    def state(self) -> dict:
        """What a checkpoint keeps of it, for --resume."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "weight_average": self.average.state_dict() if self.average else None}

    def restore(self, checkpoint: dict) -> None:
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        if self.scaler and checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        if self.average and checkpoint.get("weight_average"):
            self.average.load_state_dict(checkpoint["weight_average"])

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


def make_optimization(model, config, device) -> Optimization:
    t = config.train
    decoder_params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("encoder.backbone")]
    groups = [{"params": decoder_params, "lr": t.lr}]
    if model.encoder.tail_blocks:
        groups.append({"params": model.encoder.tail_parameters(), "lr": t.encoder_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=t.weight_decay, fused=device.type == "cuda")
    amp, scaler = make_amp(device, t.amp)
    return Optimization(optimizer, None, amp, scaler, WeightAverage(model, t.ema_decay) if t.ema_decay else None,
                        decoder_params, t.grad_clip)


def lr_lambda(t, total_steps):
    """The learning rate's factor at each step of a train section: linear warm-up, then cosine decay to 0 or constant."""

    def factor(step):
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.lr_schedule == "cosine":
            progress = (step - t.warmup_steps) / max(1, total_steps - t.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0
    return factor


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
