"""bench.py on a tiny setting, and its CUDA refusal."""
import json
import math
import os

import pytest
import torch

import bench
from tests.conftest import run_script

CPU = torch.device("cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def one_thread():
    """Two busy cores run ResNet-50 several times faster on one thread than on two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_quick_run_prints_the_figures_as_json_last(tmp_path, capsys, one_thread):
    out = tmp_path / "bench.json"
    bench.main(["--quick", "--device", "cpu", "--data", "generated", "--images", "3", "--epochs", "1",
                "--image-size", "32", "--out", str(out)])
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result == json.loads(out.read_text())
    assert result["device"] == "cpu" and result["images"] == 3 and result["captions"] == 15
    names = {"extraction_images_per_s", "train_captions_per_s", "epoch_30k_captions_s", "end_to_end_per_epoch_s",
             "infer_greedy_bs1_images_per_s", "infer_beam3_bs1_images_per_s", "infer_greedy_bs3_images_per_s",
             "infer_beam3_bs3_images_per_s", "peak_memory_bytes"}
    assert set(result["figures"]) == names
    for figure in result["figures"].values():
        assert all(math.isfinite(figure[k]) and figure[k] > 0 for k in ("ours", "naive", "ratio"))
    assert result["figures"]["end_to_end_per_epoch_s"]["naive_epochs"] == 1
    assert "epoch_30k_captions_s.naive" in result["extrapolated"]
    assert "extraction_images_per_s" in captured.err          # the table


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_a_one_line_error(capsys):
    run = run_script(bench.main, ["--device", "cuda"], capsys)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.startswith("error: ") and "cuda" in run.stderr and run.stderr.count("\n") == 1


def test_the_scale_benchmarks_smallest_size(capsys):
    """bench.py --scale --quick on sizes of 400 and 1,600 images (--quick runs the first): synthetic cached
    features, one LSTM epoch (no timing asserted)."""
    bench.main(["--scale", "--quick", "--sizes", "400", "1600", "--device", "cpu"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["benchmark"] == "scale" and [r["images"] for r in result["results"]] == [400]
    row = result["results"][0]
    assert row["captions"] == 2_000 and row["streamed"] and row["epoch_s"] > 0 and row["open_cache_s"] > 0
    assert row["peak_rss_bytes"] is None or row["peak_anon_bytes"] <= row["peak_rss_bytes"]
