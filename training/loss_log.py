"""loss_log.txt, a run's table of losses and scores: its columns, its one writer and its one reader.

A header line, then one tab-separated row per logged training step and per validation:

    step  epoch  split  loss  lr  elapsed  bleu4  cider  reward

split is train or val; bleu4 and cider are a validation's scores, reward the mean CIDEr-D of the
self-critical samples; nan where a row has none. train.py writes it; visualize_loss.py (which also prints
the last training row's elapsed seconds: --last-elapsed, for benchmarks/gpu_check.sh) and bench.py --scale
read it.
"""
import csv
import math
import os
from dataclasses import dataclass

from evaluation.metrics import SCORE_NAMES
from utils import UserError

COLUMNS = ("step", "epoch", "split", "loss", "lr", "elapsed", *SCORE_NAMES, "reward")
REQUIRED = ("step", "epoch", "split", "loss")        # older logs lack the rest
FORMATS = {"loss": ".5f", "lr": ".3e", "elapsed": ".1f", **{name: ".5f" for name in SCORE_NAMES}, "reward": ".5f"}
SPLITS = ("train", "val")


@dataclass
class LogRow:
    """One row of loss_log.txt: a logged run of training steps, or a validation."""
    step: int
    epoch: int
    split: str                      # one of SPLITS
    loss: float
    lr: float
    elapsed: float                  # seconds trained
    scores: dict | None = None      # a validation's {"BLEU-4": .., "CIDEr": ..} (coco-caption names)
    reward: float = math.nan        # the mean reward of self-critical samples


class LossLog:
    """Rows appended to a run's loss_log.txt, each written through at once; the header is written once, by the
    run that creates the file."""

    def __init__(self, path: str):
        new = not os.path.exists(path) or os.path.getsize(path) == 0
        self.file = open(path, "a", encoding="utf-8", newline="")
        self.writer = csv.DictWriter(self.file, COLUMNS, delimiter="\t", lineterminator="\n")
        if new:
            self.writer.writeheader()
            self.file.flush()

    def write(self, row: LogRow) -> None:
        values = {"loss": row.loss, "lr": row.lr, "elapsed": row.elapsed, "reward": row.reward,
                  **{name: (row.scores or {}).get(coco, math.nan) for name, coco in SCORE_NAMES.items()}}
        self.writer.writerow({"step": row.step, "epoch": row.epoch, "split": row.split,
                              **{key: format(value, FORMATS[key]) for key, value in values.items()}})
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_loss_log(path: str) -> list[dict]:
    """The rows of a loss_log.txt: step and epoch as int, split as str, the other columns as float (nan where a
    row, or an older log, has none). UserError (one line) for a missing or empty file, a wrong header or a
    malformed row."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such loss log; pass a run folder containing loss_log.txt "
                        f"(written by train.py) or --log PATH")
    header = "\t".join(COLUMNS)
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        if not reader.fieldnames or not "".join(reader.fieldnames).strip():
            raise UserError(f"{path}: file is empty; expected the header line '{header}' "
                            f"(tab-separated) followed by rows; train for at least one log step first")
        missing = [c for c in REQUIRED if c not in reader.fieldnames]
        if missing:
            raise UserError(f"{path}: wrong header {chr(9).join(reader.fieldnames)!r} (missing {', '.join(missing)}); "
                            f"expected the tab-separated header '{header}' written by train.py")
        rows = [_parsed(values, path, reader.line_num) for values in reader]
    if not rows:
        raise UserError(f"{path}: log has a header but no rows; train for at least one log step "
                        f"(train.log_every) before plotting")
    return rows


def _parsed(values: dict, path: str, line_number: int) -> dict:
    try:
        row = {"step": int(values["step"]), "epoch": int(values["epoch"]), "split": values["split"],
               "loss": float(values["loss"]), **{name: float(values[name]) if values.get(name) else math.nan
                                                 for name in COLUMNS[len(REQUIRED):]}}
    except (KeyError, TypeError, ValueError):
        line = "\t".join(v for v in values.values() if isinstance(v, str))
        raise UserError(f"{path}: line {line_number} is malformed ({line!r}); "
                        f"delete or fix that line (a run killed mid-write can leave one)") from None
    if row["split"] not in SPLITS:
        raise UserError(f"{path}: line {line_number} has split {row['split']!r}; "
                        f"expected 'train' or 'val', fix or delete that line")
    return row


def last_elapsed(path: str, split: str = "train") -> float:
    """The elapsed seconds of the last row of `split`: a run's time, as bench.py --scale and the GPU checks read it."""
    rows = [row for row in read_loss_log(path) if row["split"] == split]
    if not rows:
        raise UserError(f"{path}: no {split} rows yet; the run has not logged a {split} step")
    return rows[-1]["elapsed"]

