"""The README's speed table, from the bench.py --out files it cites: a table shows its files' numbers.

    python bench.py --speed-table       # prints the table (README.md's labels)
"""
import json
import os

from utils import REPO_ROOT

CPU_REPORT = "docs/bench_cpu_quick.json"      # python bench.py --quick --device cpu --out ...
GPU_REPORT = "docs/bench_h200_8396218.json"   # python bench.py --out ... (one H200)
ONNX_REPORT = "docs/bench_onnx_cpu.json"      # python bench.py --pretrained --onnx DIR --out ... (2-core CPU)
ROWS = [("feature extraction, JPEG decode included (images/s)", "extraction_images_per_s"),
        ("decoder training (captions/s)", "train_captions_per_s"),
        ("one LSTM epoch of 30,000 captions (s)", "epoch_30k_captions_s"),
        ("end to end, JPEGs to checkpoint, per epoch (s)", "end_to_end_per_epoch_s"),
        ("captioning JPEG files, greedy (images/s)", "infer_greedy"),
        ("peak GPU memory", "peak_memory_bytes"),
        ("the shipped model, JPEG files to captions, beam 3, batch 16 (images/s): ONNX Runtime / PyTorch",
         "onnx_photo_to_caption")]


def number(x: float) -> str:
    """Three or four significant digits, thousands separated: 0.154, 1.05, 11.0, 484, 9,261."""
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}" if x >= 1 else f"{x:.3f}"


def cells(report: dict, key: str, gpu: bool) -> list[str]:
    """(ours, naive) of one row for one report."""
    figures = report["figures"]
    if key == "onnx_photo_to_caption":     # the ONNX report's two sides are both ours; it measured a CPU only
        if gpu:
            return ["", ""]
        figure = figures["photo_to_caption_bs16_images_per_s"]
        return [f"{number(figure['onnx'])} / {number(figure['pytorch'])}", ""]
    if key == "peak_memory_bytes":
        return [f"{figures[key][side] / 1e9:.2f} GB" for side in ("ours", "naive")] if gpu else ["", ""]
    if key == "infer_greedy":      # at the largest batch the report measured
        batch = max(size for size, _ in report["inference_batches"])
        figure = figures[f"infer_greedy_bs{batch}_images_per_s"]
        return [f"{number(figure['ours'])} (batch {batch})", number(figure["naive"])]
    return [number(figures[key]["ours"]), number(figures[key]["naive"])]


def read_report(path: str) -> dict:
    """One of the benchmark JSON files the table shows, by its path in the repository."""
    with open(os.path.join(REPO_ROOT, path), encoding="utf-8") as f:
        return json.load(f)


def table_rows() -> list[list[str]]:
    """[label, CPU ours, CPU naive, GPU ours, GPU naive] per row."""
    cpu, gpu, onnx = (read_report(path) for path in (CPU_REPORT, GPU_REPORT, ONNX_REPORT))
    return [[label, *cells(onnx if key == "onnx_photo_to_caption" else cpu, key, False), *cells(gpu, key, True)]
            for label, key in ROWS]


def markdown_table() -> str:
    """The table as README.md shows it: a header and one row per figure."""
    lines = ["| figure | 2-core CPU: ours | naive | one H200: ours | naive |", "|---|---|---|---|---|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in table_rows()])
