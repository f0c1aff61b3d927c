"""The plots of a run's loss_log.txt (visualize_loss.py draws them).

The upper panel shows the training loss per logged step (thin, light), an exponential
moving average of it (bias-corrected EMA, span = number of train rows / 10, clamped to
1..100; under 20 rows only the raw curve is drawn), the validation loss at each validation
and, for self-critical training, the mean reward of the sampled captions on a second
y-axis. The lower panel, drawn when validation scores were computed, shows each validation
score of evaluation.metrics.SCORE_NAMES (BLEU-4 and CIDEr; decoded as the run's decode:
section says), each on a y-axis of its own. A step logged twice after a resume is plotted
once, with the later (resumed) value.
"""
import math

from evaluation.metrics import SCORE_NAMES
from utils import atomic_write

# (line style, colour) of each score, in SCORE_NAMES' order; the upper panel has blue, orange and purple
SCORE_STYLES = [("s--", "tab:green"), ("^-", "tab:red"), ("D:", "tab:brown"), ("v-.", "tab:olive"), ("P--", "tab:cyan")]
SPINE_STEP = 0.12      # how far right each y-axis after the second is moved, in axes widths, so their ticks never overlap


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
    scored = [r for r in val if any(math.isfinite(r[name]) for name in SCORE_NAMES)]
    fig, axes = plt.subplots(2 if scored else 1, 1, figsize=(9, 7.5 if scored else 5), dpi=100, sharex=True,
                             squeeze=False, gridspec_kw={"height_ratios": [3, 2] if scored else [1]})
    _plot_losses(axes[0][0], train, val, title)
    if scored:
        _plot_scores(axes[1][0], scored)
    axes[-1][0].set_xlabel("step")
    fig.tight_layout()
    atomic_write(out_path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
    return out_path


def _plot_losses(loss_axis, train: list[dict], val: list[dict], title: str) -> None:
    """The upper panel: training loss (raw and smoothed), validation loss, and the self-critical reward."""
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


def _plot_scores(score_axis, scored: list[dict]) -> None:
    """The lower panel: each validation score on a y-axis of its own (their scales differ: CIDEr runs past 1), the
    first on the left, the others on the right, each further one moved out."""
    handles, right_axes = [], 0
    score_axis.grid(True, alpha=0.3)
    for i, (name, coco) in enumerate(SCORE_NAMES.items()):
        rows = [r for r in scored if math.isfinite(r[name])]
        if i and not rows:
            continue                # the left axis is always drawn; a right one only for a score some row has
        style, colour = SCORE_STYLES[i % len(SCORE_STYLES)]
        axis = score_axis
        if i:
            axis, right_axes = score_axis.twinx(), right_axes + 1
            if right_axes > 1:
                axis.spines["right"].set_position(("axes", 1 + SPINE_STEP * (right_axes - 1)))
        axis.set_ylabel(coco, color=colour)
        if rows:
            handles += axis.plot([r["step"] for r in rows], [r[name] for r in rows], style, color=colour,
                                 markersize=6, label=f"val {coco}")
    score_axis.legend(handles, [h.get_label() for h in handles], loc="lower right", fontsize="small",
                      framealpha=0.8)
