"""Plot the training curves of a run from its loss_log.txt (written by train.py).

Usage:
    python visualize_loss.py runs/demo                          # -> runs/demo/loss_curve.png
    python visualize_loss.py --log runs/demo/loss_log.txt --out curve.png
    python visualize_loss.py runs/demo --last-elapsed            # prints the last training row's seconds

The upper panel shows the training loss (raw and smoothed), the validation loss and, for
self-critical training, the mean reward of the sampled captions; the lower panel, when the run
decoded validation captions, their BLEU-4 and CIDEr (reports/loss_curve.py). Logs from older runs
without the bleu4, cider or reward columns are accepted.
"""
import argparse
import os

from reports.loss_curve import plot_loss
from training.loss_log import last_elapsed, read_loss_log
from utils import run_main


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Plot a run's training curves (loss, reward, validation "
                                                 "BLEU-4 and CIDEr) from its loss_log.txt.")
    parser.add_argument("run_dir", nargs="?", help="run folder containing loss_log.txt (train.out_dir)")
    parser.add_argument("--log", help="path to a loss_log.txt (instead of RUN_DIR)")
    parser.add_argument("--out", help="output PNG (default: <run dir>/loss_curve.png)")
    parser.add_argument("--last-elapsed", action="store_true",
                        help="print the last training row's elapsed seconds instead of plotting (a run's time so far)")
    args = parser.parse_args(argv)
    if bool(args.run_dir) == bool(args.log):
        parser.error("give either RUN_DIR or --log PATH (exactly one)")
    log_path = args.log or os.path.join(args.run_dir, "loss_log.txt")
    if args.last_elapsed:
        print(f"{last_elapsed(log_path):.1f}")
        return
    run_dir = os.path.dirname(os.path.abspath(log_path))
    out_path = args.out or os.path.join(run_dir, "loss_curve.png")
    plot_loss(read_loss_log(log_path), out_path, os.path.basename(run_dir))
    print(out_path)


if __name__ == "__main__":
    run_main(main)
