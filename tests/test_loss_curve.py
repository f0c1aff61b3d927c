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
