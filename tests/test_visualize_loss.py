"""visualize_loss.py as a user runs it: a run folder or a log, and its one-line errors; the loss logs the tests share."""
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


def test_a_users_mistake_goes_through_run_main_like_every_script(tmp_path):
    """main raises the one-line UserError that utils.run_main prints (exit 2); it does not print and return."""
    from utils import UserError
    with pytest.raises(UserError, match="no such loss log"):
        visualize_loss.main(["--log", str(tmp_path / "missing" / "loss_log.txt")])
