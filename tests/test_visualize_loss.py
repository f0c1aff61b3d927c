"""Tests for visualize_loss.py: log parsing, smoothing, PNG output and the CLI's error handling."""
import math
import os
import subprocess
import sys

import pytest
from PIL import Image

import visualize_loss
from tests.conftest import run_script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "visualize_loss.py")
HEADER = "step\tepoch\tsplit\tloss\tlr\telapsed\tbleu4\n"
OLD_HEADER = "step\tepoch\tsplit\tloss\tlr\telapsed\n"


def write_log(run_dir, with_bleu=True, resumed=True):
    """Two epochs of 20 steps, train row every 5 steps, then a resume that re-logs step 40."""
    os.makedirs(run_dir, exist_ok=True)
    lines = [HEADER if with_bleu else OLD_HEADER]
    tail = "\tnan" if with_bleu else ""
    for step in range(5, 41, 5):
        epoch = 1 + (step - 1) // 20
        lines.append(f"{step}\t{epoch}\ttrain\t{3.0 / step ** 0.5:.5f}\t1.0e-03\t{step * 0.1:.1f}{tail}\n")
        if step % 20 == 0:
            bleu = f"\t{0.05 * epoch:.5f}" if with_bleu else ""
            lines.append(f"{step}\t{epoch}\tval\t{2.5 / epoch:.5f}\t1.0e-03\t{step * 0.1:.1f}{bleu}\n")
    if resumed:
        lines.append(f"40\t2\ttrain\t0.51000\t1.0e-03\t4.5{tail}\n")
        lines.append(f"45\t3\ttrain\t0.50000\t1.0e-03\t5.0{tail}\n")
    path = os.path.join(run_dir, "loss_log.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)
    return path


def run_cli(capsys, *args):
    """visualize_loss.main(args) in this process (no new interpreter importing torch): .returncode, .stdout, .stderr."""
    return run_script(visualize_loss.main, args, capsys)


def assert_sane_png(path):
    assert os.path.getsize(path) > 1000
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert 300 <= image.width <= 3000 and 200 <= image.height <= 3000


def test_read_loss_log_with_and_without_bleu(tmp_path):
    rows = visualize_loss.read_loss_log(write_log(tmp_path / "new"))
    val = [r for r in rows if r["split"] == "val"]
    assert [r["bleu4"] for r in val] == [0.05, 0.1]
    assert all(math.isnan(r["bleu4"]) for r in rows if r["split"] == "train")
    assert [r["step"] for r in rows if r["split"] == "train"].count(40) == 2  # resumed repeat kept raw

    old_rows = visualize_loss.read_loss_log(write_log(tmp_path / "old", with_bleu=False))
    assert len(old_rows) == len(rows)
    assert all(math.isnan(r["bleu4"]) for r in old_rows)
    assert old_rows[0]["loss"] == rows[0]["loss"] and old_rows[0]["elapsed"] == 0.5


def test_smooth_is_debiased_bounded_and_skips_nan():
    assert visualize_loss.smooth([2.0, 2.0, 2.0], span=5) == pytest.approx([2.0, 2.0, 2.0])
    values = [4.0, 1.0, 3.0, 0.5, 2.0]
    smoothed = visualize_loss.smooth(values, span=3)
    assert smoothed[0] == values[0]  # no pull towards zero at the start
    assert all(min(values) <= s <= max(values) for s in smoothed)
    with_gap = visualize_loss.smooth([1.0, math.nan, 1.0], span=3)
    assert with_gap == pytest.approx([1.0, 1.0, 1.0])


@pytest.mark.parametrize("with_bleu", [True, False])
def test_plot_loss_writes_png(tmp_path, with_bleu):
    rows = visualize_loss.read_loss_log(write_log(tmp_path / "run", with_bleu=with_bleu))
    out = visualize_loss.plot_loss(rows, str(tmp_path / "curve.png"), "run")
    assert_sane_png(out)


def test_cli_with_run_dir_and_with_log(tmp_path, capsys):
    run_dir = tmp_path / "my_run"
    log_path = write_log(run_dir)
    result = subprocess.run([sys.executable, SCRIPT, str(run_dir)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    default_out = run_dir / "loss_curve.png"
    assert result.stdout.strip() == str(default_out)
    assert_sane_png(default_out)

    custom_out = tmp_path / "elsewhere.png"
    result = run_cli(capsys, "--log", log_path, "--out", str(custom_out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(custom_out)
    assert_sane_png(custom_out)


@pytest.mark.parametrize("content, expected", [
    (None, "no such loss log"),
    (HEADER, "no rows"),
    ("", "empty"),
    ("time\tvalue\n1\t2\n", "wrong header"),
])
def test_cli_errors_exit_2_with_one_line(tmp_path, content, expected, capsys):
    log_path = tmp_path / "run" / "loss_log.txt"
    if content is not None:
        log_path.parent.mkdir()
        log_path.write_text(content, encoding="utf-8")
    result = run_cli(capsys, "--log", str(log_path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(log_path) in lines[0] and expected in lines[0]
    assert not (tmp_path / "run" / "loss_curve.png").exists()


def test_malformed_row_names_the_line(tmp_path):
    path = write_log(tmp_path / "run")
    with open(path, "a", encoding="utf-8") as f:
        f.write("50\t3\ttra")  # run killed mid-write
    with pytest.raises(ValueError, match=r"line \d+ is malformed"):
        visualize_loss.read_loss_log(path)


def test_a_users_mistake_goes_through_run_main_like_every_script(tmp_path):
    """main raises the one-line UserError that utils.run_main prints (exit 2); it does not print and return."""
    from utils import UserError
    with pytest.raises(UserError, match="no such loss log"):
        visualize_loss.main(["--log", str(tmp_path / "missing" / "loss_log.txt")])
