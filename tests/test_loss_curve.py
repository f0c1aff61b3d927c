"""reports/loss_curve.py: smoothing, and the PNG of a run's curves."""
import math

import pytest

from reports.loss_curve import plot_loss, smooth
from tests.test_visualize_loss import assert_sane_png, write_log
from training.loss_log import read_loss_log


def test_smooth_is_debiased_bounded_and_skips_nan():
    assert smooth([2.0, 2.0, 2.0], span=5) == pytest.approx([2.0, 2.0, 2.0])
    values = [4.0, 1.0, 3.0, 0.5, 2.0]
    smoothed = smooth(values, span=3)
    assert smoothed[0] == values[0]  # no pull towards zero at the start
    assert all(min(values) <= s <= max(values) for s in smoothed)
    with_gap = smooth([1.0, math.nan, 1.0], span=3)
    assert with_gap == pytest.approx([1.0, 1.0, 1.0])


@pytest.mark.parametrize("with_bleu", [True, False])
def test_plot_loss_writes_png(tmp_path, with_bleu):
    rows = read_loss_log(write_log(tmp_path / "run", with_bleu=with_bleu))
    out = plot_loss(rows, str(tmp_path / "curve.png"), "run")
    assert_sane_png(out)


def test_plot_loss_draws_every_validation_score(tmp_path, monkeypatch):
    """The lower panel loops over evaluation.metrics.SCORE_NAMES: a third score gets an axis of its own."""
    from reports import loss_curve
    monkeypatch.setattr(loss_curve, "SCORE_NAMES", {"bleu4": "BLEU-4", "cider": "CIDEr", "rouge": "ROUGE-L"})
    drawn = []
    real = loss_curve._plot_scores
    monkeypatch.setattr(loss_curve, "_plot_scores", lambda axis, scored: real(axis, scored) or drawn.append(
        [line.get_label() for ax in axis.figure.axes for line in ax.get_lines()]))
    rows = [{"step": s, "epoch": 1, "split": split, "loss": 1.0 / s, "lr": 1e-3, "elapsed": s, "reward": math.nan,
             "bleu4": 0.1 * s if split == "val" else math.nan, "cider": math.nan,
             "rouge": 0.2 * s if split == "val" else math.nan} for s in (1, 2, 3) for split in ("train", "val")]
    assert_sane_png(plot_loss(rows, str(tmp_path / "curve.png"), "run"))
    assert [label for label in drawn[0] if label.startswith("val ") and label != "val loss (teacher-forced)"] == [
        "val BLEU-4", "val ROUGE-L"]                        # CIDEr has no value in any row: no axis, no line
