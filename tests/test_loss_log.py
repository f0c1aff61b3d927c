"""training/loss_log.py: the one writer and reader of loss_log.txt."""
import math

import pytest

from tests.test_visualize_loss import write_log
from training.loss_log import COLUMNS, LogRow, LossLog, last_elapsed, read_loss_log


def test_read_loss_log_with_and_without_bleu(tmp_path):
    rows = read_loss_log(write_log(tmp_path / "new"))
    val = [r for r in rows if r["split"] == "val"]
    assert [r["bleu4"] for r in val] == [0.05, 0.1]
    assert all(math.isnan(r["bleu4"]) for r in rows if r["split"] == "train")
    assert [r["step"] for r in rows if r["split"] == "train"].count(40) == 2  # resumed repeat kept raw

    old_rows = read_loss_log(write_log(tmp_path / "old", with_bleu=False))
    assert len(old_rows) == len(rows)
    assert all(math.isnan(r["bleu4"]) for r in old_rows)
    assert old_rows[0]["loss"] == rows[0]["loss"] and old_rows[0]["elapsed"] == 0.5


def test_malformed_row_names_the_line(tmp_path):
    path = write_log(tmp_path / "run")
    with open(path, "a", encoding="utf-8") as f:
        f.write("50\t3\ttra")  # run killed mid-write
    with pytest.raises(ValueError, match=r"line \d+ is malformed"):
        read_loss_log(path)


def test_the_writer_writes_the_header_once_and_rows_the_reader_reads_back(tmp_path):
    path = str(tmp_path / "loss_log.txt")
    log = LossLog(path)
    log.write(LogRow(10, 1, "train", 2.5, 1e-3, 12.34, reward=0.25))
    log.close()
    log = LossLog(path)                                   # a resumed run appends, without a second header
    log.write(LogRow(10, 1, "val", 2.25, 1e-3, 20.0, scores={"BLEU-4": 0.2, "CIDEr": 0.5}))
    log.close()
    lines = open(path, encoding="utf-8").read().splitlines()
    assert lines == ["step\tepoch\tsplit\tloss\tlr\telapsed\tbleu4\tcider\treward",
                     "10\t1\ttrain\t2.50000\t1.000e-03\t12.3\tnan\tnan\t0.25000",
                     "10\t1\tval\t2.25000\t1.000e-03\t20.0\t0.20000\t0.50000\tnan"]
    rows = read_loss_log(path)
    assert [r["split"] for r in rows] == ["train", "val"] and rows[1]["cider"] == 0.5 and math.isnan(rows[0]["bleu4"])
    assert last_elapsed(path) == 12.3 and tuple(COLUMNS) == tuple(lines[0].split("\t"))


def test_a_log_without_train_rows_has_no_elapsed_time_yet(tmp_path):
    from utils import UserError
    path = str(tmp_path / "loss_log.txt")
    log = LossLog(path)
    log.write(LogRow(0, 0, "val", 2.5, 1e-3, 5.0))
    log.close()
    with pytest.raises(UserError, match="no train rows yet"):
        last_elapsed(path)
