"""The optimizer bundle a run updates its weights with: AdamW over the decoder (and the fine-tuned CNN blocks, at
their own learning rate), its learning-rate schedule, mixed precision and the fp16 loss scale, and the weight
average (train.ema_decay).

    optimization = make_optimization(model, config, device)
    optimization.schedule(config.train, total_steps)
    ... training.steps makes each update with it ...
    optimization.stepped()                  # after each update: the schedule's step and the average's
"""
import contextlib
import math
from dataclasses import dataclass

import torch

from config import Config, TrainConfig
from training.weight_average import WeightAverage


def make_amp(device, enabled: bool):
    """bf16 autocast on CUDA where supported, else fp16 with a GradScaler; nothing on CPU/MPS."""
    if not (enabled and device.type == "cuda"):
        return torch.autocast("cpu", enabled=False), None
    if torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16), None
    return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")


@dataclass
class Optimization:
    """What an update needs besides its loss (training.steps.optimizer_step makes it)."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR | None      # set by schedule(), once the run's length is known
    amp: torch.autocast
    scaler: torch.amp.GradScaler | None
    average: WeightAverage | None
    decoder_params: list
    grad_clip: float

    def schedule(self, t: TrainConfig, total_steps: int) -> None:
        """The learning rate's schedule over a run of total_steps steps (train section t)."""
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(t, total_steps))

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


def make_optimization(model, config: Config, device) -> Optimization:
    """The run's optimizer bundle; its schedule is set once the run's length is known (Optimization.schedule)."""
    t = config.train
    decoder_params = [p for n, p in model.named_parameters()
                      if p.requires_grad and not n.startswith("encoder.backbone")]
    groups = [{"params": decoder_params, "lr": t.lr}]
    if model.encoder.tail_blocks:
        groups.append({"params": model.encoder.tail_parameters(), "lr": t.encoder_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=t.weight_decay, fused=device.type == "cuda")
    amp, scaler = make_amp(device, t.amp)
    return Optimization(optimizer, None, amp, scaler, WeightAverage(model, t.ema_decay) if t.ema_decay else None,
                        decoder_params, t.grad_clip)


def lr_lambda(t: TrainConfig, total_steps: int):
    """The learning rate's factor at each step of a train section: linear warm-up, then cosine decay to 0 or
    constant."""

    def factor(step):
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.lr_schedule == "cosine":
            progress = (step - t.warmup_steps) / max(1, total_steps - t.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0
    return factor
