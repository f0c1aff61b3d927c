"""One training step and what drives it: mixed precision, the optimizer update, the learning-rate
schedule and each epoch's order of captions.

    amp, scaler = make_amp(device, enabled)
    loss = training_step(model, optimizer, scaler, graphed, rows, lengths, inputs, image_index, tokens, config, amp)

On one GPU a full batch replays a CUDA graph of the step (training.cuda_graphs); everywhere else it
runs eagerly. Both compute the same loss and update.
"""
import math

import torch

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
        label_smoothing = config["train"]["label_smoothing"]
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
    if graphed is not None and len(rows) == config["train"]["batch_size"]:
        loss = graphed(rows, int(lengths.max()))
        if loss is not None:
            optimizer.step()
            return loss
    batch_inputs = inputs if image_index is None else inputs[image_index[rows]]
    loss, extra = batch_loss(model, batch_inputs, tokens[rows], lengths, config, amp, normalizer,
                             image_of_row=image_of_row)
    optimizer_step(optimizer, scaler, loss + extra, config["train"]["grad_clip"])
    return loss


def captions_of_images(first_caption, caption_count, images):
    """Caption rows of images [b] (each image's captions are consecutive rows, from first_caption[i], count
    caption_count[i]) -> (caption rows [B], image_of_row [B]: the position in images of each one's image)."""
    counts = caption_count[images]
    image_of_row = torch.repeat_interleave(torch.arange(len(images)), counts)
    starts = counts.cumsum(0) - counts
    caption_rows = first_caption[images][image_of_row] + torch.arange(len(image_of_row)) - starts[image_of_row]
    return caption_rows, image_of_row


def make_optimizer(model, config, total_steps: int, device):
    """(trained parameters apart from the CNN's, AdamW over them and the fine-tuned CNN blocks, its schedule)."""
    t = config["train"]
    decoder_params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("encoder.backbone")]
    groups = [{"params": decoder_params, "lr": t["lr"]}]
    if model.encoder.tail_blocks:
        groups.append({"params": model.encoder.tail_parameters(), "lr": t["encoder_lr"]})
    optimizer = torch.optim.AdamW(groups, weight_decay=t["weight_decay"], fused=device.type == "cuda")
    return decoder_params, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, total_steps))


def lr_lambda(config, total_steps):
    """The learning rate's factor at each step: linear warm-up, then cosine decay to 0 or constant."""
    t = config["train"]

    def factor(step):
        if step < t["warmup_steps"]:
            return (step + 1) / t["warmup_steps"]
        if t["lr_schedule"] == "cosine":
            progress = (step - t["warmup_steps"]) / max(1, total_steps - t["warmup_steps"])
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
