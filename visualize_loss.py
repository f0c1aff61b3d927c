"""Plot the training curves of a run from its loss_log.txt (written by train.py).

Usage:
    python visualize_loss.py runs/demo                          # -> runs/demo/loss_curve.png
    python visualize_loss.py --log runs/demo/loss_log.txt --out curve.png

The upper panel shows the training loss per logged step (thin, light), an exponential
moving average of it (bias-corrected EMA, span = number of train rows / 10, clamped to
1..100; under 20 rows only the raw curve is drawn), the validation loss at each validation
and, for self-critical training, the mean reward of the sampled captions on a second
y-axis. The lower panel, drawn when validation scores were computed, shows
validation BLEU-4 and CIDEr (decoded as the run's decode: section says). Logs from older runs without the bleu4, cider or reward
columns are accepted; a step logged twice after a resume is plotted once, with the later
(resumed) value.
"""
import argparse
import math
import os

from utils import UserError, atomic_write, run_main

REQUIRED_COLUMNS = ("step", "epoch", "split", "loss")
EXPECTED_HEADER = "step\tepoch\tsplit\tloss\tlr\telapsed\tbleu4\tcider\treward"
OPTIONAL_COLUMNS = ("lr", "elapsed", "bleu4", "cider", "reward")


def read_loss_log(path: str) -> list[dict]:
    """Parse loss_log.txt into dicts with step/epoch (int), split (str), and loss and OPTIONAL_COLUMNS (float,
    nan if absent).

    Raises FileNotFoundError for a missing file and ValueError (one line) for an empty
    log, a wrong header or a malformed row.
    """
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such loss log; pass a run folder containing loss_log.txt "
                                f"(written by train.py) or --log PATH")
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if not lines or not lines[0].strip():
        raise UserError(f"{path}: file is empty; expected the header line '{EXPECTED_HEADER}' "
                         f"(tab-separated) followed by rows; train for at least one log step first")
    columns = lines[0].strip().split("\t")
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise UserError(f"{path}: wrong header {lines[0].strip()!r} (missing {', '.join(missing)}); "
                         f"expected the tab-separated header '{EXPECTED_HEADER}' written by train.py")
    rows = []
    for line_number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        values = dict(zip(columns, line.rstrip("\n").split("\t")))
        try:
            row = {"step": int(values["step"]), "epoch": int(values["epoch"]), "split": values["split"],
                   "loss": float(values["loss"])}
            for name in OPTIONAL_COLUMNS:
                row[name] = float(values[name]) if values.get(name, "") != "" else math.nan
        except (KeyError, ValueError):
            raise UserError(f"{path}: line {line_number} is malformed ({line.strip()!r}); "
                             f"delete or fix that line (a run killed mid-write can leave one)") from None
        if row["split"] not in ("train", "val"):
            raise UserError(f"{path}: line {line_number} has split {row['split']!r}; "
                             f"expected 'train' or 'val', fix or delete that line")
        rows.append(row)
    if not rows:
        raise UserError(f"{path}: log has a header but no rows; train for at least one log step "
                         f"(train.log_every) before plotting")
    return rows


def smooth(values: list[float], span: int) -> list[float]:
    """Bias-corrected exponential moving average (span as in pandas ewm); non-finite values are skipped."""
    beta = 1.0 - 2.0 / (span + 1)
    average, weight, smoothed = 0.0, 0.0, []
    for value in values:
        if math.isfinite(value):
            average = beta * average + (1 - beta) * value
            weight = beta * weight + (1 - beta)
        # dividing by the accumulated weight removes the pull towards 0 at the start
        smoothed.append(average / weight if weight > 0 else math.nan)
    return smoothed


def _latest_per_step(rows: list[dict], split: str) -> list[dict]:
    # After a resume a step can be logged twice; the later row belongs to the run that continued.
    by_step = {}
    for row in rows:
        if row["split"] == split:
            by_step[row["step"]] = row
    return [by_step[step] for step in sorted(by_step)]


def plot_loss(rows: list[dict], out_path: str, title: str) -> str:
    """Draw the curves (see the module's docstring) to out_path as PNG; returns out_path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = _latest_per_step(rows, "train")
    val = _latest_per_step(rows, "val")
    scored = [r for r in val if math.isfinite(r["bleu4"]) or math.isfinite(r["cider"])]
    fig, axes = plt.subplots(2 if scored else 1, 1, figsize=(9, 7.5 if scored else 5), dpi=100, sharex=True,
                             squeeze=False, gridspec_kw={"height_ratios": [3, 2] if scored else [1]})
    loss_axis = axes[0][0]
    if train:
        steps = [r["step"] for r in train]
        losses = [r["loss"] if math.isfinite(r["loss"]) else math.nan for r in train]
        span = min(100, max(1, len(train) // 10))
        if span == 1:  # too few rows to smooth: the raw curve is the main line
            loss_axis.plot(steps, losses, color="tab:blue", linewidth=1.5, label="train loss")
        else:
            loss_axis.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="train loss (raw)")
            loss_axis.plot(steps, smooth(losses, span), color="tab:blue", linewidth=2,
                           label=f"train loss (EMA, span {span})")
    if val:
        loss_axis.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", color="tab:orange",
                       markersize=6, label="val loss (teacher-forced)")
    loss_axis.set_ylabel("loss")
    loss_axis.grid(True, alpha=0.3)
    handles, labels = loss_axis.get_legend_handles_labels()
    rewarded = [r for r in train if math.isfinite(r["reward"])]
    if rewarded:
        reward_axis = loss_axis.twinx()
        reward_axis.plot([r["step"] for r in rewarded], [r["reward"] for r in rewarded], color="tab:purple",
                         linewidth=1.5, label="mean reward (CIDEr-D of samples)")
        reward_axis.set_ylabel("mean reward", color="tab:purple")
        reward_axis.tick_params(axis="y", colors="tab:purple")
        extra_handles, extra_labels = reward_axis.get_legend_handles_labels()
        handles, labels = handles + extra_handles, labels + extra_labels
    loss_axis.legend(handles, labels, loc="upper right", fontsize="small", framealpha=0.8)
    loss_axis.set_title(f"run: {title}")
    if scored:
        score_axis = axes[1][0]
        handles = []
        bleu = [r for r in scored if math.isfinite(r["bleu4"])]
        if bleu:
            handles += score_axis.plot([r["step"] for r in bleu], [r["bleu4"] for r in bleu], "s--", color="tab:green",
                                       markersize=6, label="val BLEU-4")
        score_axis.set_ylabel("BLEU-4", color="tab:green")
        score_axis.grid(True, alpha=0.3)
        cider = [r for r in scored if math.isfinite(r["cider"])]
        if cider:
            cider_axis = score_axis.twinx()
            handles += cider_axis.plot([r["step"] for r in cider], [r["cider"] for r in cider], "^-", color="tab:red",
                                       markersize=6, label="val CIDEr")
            cider_axis.set_ylabel("CIDEr", color="tab:red")
        score_axis.legend(handles, [h.get_label() for h in handles], loc="lower right", fontsize="small",
                          framealpha=0.8)
    axes[-1][0].set_xlabel("step")
    fig.tight_layout()
    atomic_write(out_path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
    return out_path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Plot a run's training curves (loss, reward, validation "
                                                 "BLEU-4 and CIDEr) from its loss_log.txt.")
    parser.add_argument("run_dir", nargs="?", help="run folder containing loss_log.txt (train.out_dir)")
    parser.add_argument("--log", help="path to a loss_log.txt (instead of RUN_DIR)")
    parser.add_argument("--out", help="output PNG (default: <run dir>/loss_curve.png)")
    args = parser.parse_args(argv)
    if bool(args.run_dir) == bool(args.log):
        parser.error("give either RUN_DIR or --log PATH (exactly one)")
    log_path = args.log or os.path.join(args.run_dir, "loss_log.txt")
    run_dir = os.path.dirname(os.path.abspath(log_path))
    out_path = args.out or os.path.join(run_dir, "loss_curve.png")
    plot_loss(read_loss_log(log_path), out_path, os.path.basename(run_dir))
    print(out_path)


if __name__ == "__main__":
    run_main(main)
