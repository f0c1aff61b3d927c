"""An exponential moving average of the trained weights (train.ema_decay), which validation scores and
checkpoints hold.

    average = WeightAverage(model, decay)
    average.update()                      # after each optimizer step
    with average.swapped_in():            # the model holds the averaged weights inside, its own outside
        validate(...); save(...)

A checkpoint's "model" is the average; its "weight_average" entry holds the weights training goes on
from, so a resumed run continues both. To score those instead of the average, export.py writes them as a
checkpoint of their own:

    python export.py RUN/checkpoint_best.pth RUN/checkpoint_best_unaveraged.pth --unaveraged
"""
from contextlib import contextmanager

import torch

from utils import UserError

WARMUP = 10    # the decay starts low, so that early averages are not held back by the starting weights


class WeightAverage:
    def __init__(self, model, decay: float):
        self.decay = decay
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.average = [p.detach().clone() for p in self.params]
        self.updates = 0
        self.depth = 0          # swapped_in() nesting: validation saves checkpoints inside its own

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (WARMUP + self.updates))
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1 - decay)

    @contextmanager
    def swapped_in(self):
        if self.depth == 0:
            self._swap()
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if self.depth == 0:
                self._swap()

    @torch.no_grad()
    def _swap(self) -> None:
        for param, average in zip(self.params, self.average):
            own = param.detach().clone()
            param.copy_(average)
            average.copy_(own)

    def state_dict(self) -> dict:
        """What a resumed run needs: the update count and the weights training goes on from."""
        trained = self.average if self.depth else self.params
        return {"updates": self.updates, "trained": [t.detach().cpu().clone() for t in trained]}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """After the model was loaded with a checkpoint's averaged weights: the average is those, and training
        goes on from the weights the checkpoint holds apart."""
        self.updates = state["updates"]
        for param, average, trained in zip(self.params, self.average, state["trained"]):
            average.copy_(param)
            param.copy_(trained)


def unaveraged(checkpoint: dict) -> dict:
    """A copy of a training checkpoint whose model holds the weights training went on from, not their average."""
    from models.checkpoint import load_model  # the model's trained parameters, in the order they are kept
    if not checkpoint.get("weight_average"):
        raise UserError("this checkpoint holds no weight average (its run had train.ema_decay 0): its model "
                        "already is the weights training went on from")
    model = load_model(checkpoint)[0]
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    trained = dict(zip(names, checkpoint["weight_average"]["trained"]))
    return {**checkpoint, "model": {k: trained.get(k, v) for k, v in checkpoint["model"].items()}, "weight_average": None}

