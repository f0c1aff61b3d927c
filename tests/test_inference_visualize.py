"""inference_visualize.py as a user runs it: files, folders, a split, and bad files."""
import csv
import os
import shutil
import subprocess
import sys

from PIL import Image

import inference_visualize
from tests.conftest import ROOT


def test_folder_with_a_non_image_and_a_corrupt_jpeg(tiny_checkpoints, tiny_data, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        shutil.copy(os.path.join(tiny_data[1], f"shape_{i:04d}.png"), photos)
    (photos / "notes.txt").write_text("not an image")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "out"
    inference_visualize.main(["--checkpoint", tiny_checkpoints["lstm"], "--images", str(photos),
                              "--out", str(out), "--beam-size", "2"])
    captured = capsys.readouterr()
    lines = [line.split("\t") for line in captured.out.strip().splitlines()]
    assert [name for name, _ in lines] == ["shape_0000.png", "shape_0001.png", "shape_0002.png"]
    assert "broken.jpg" in captured.err and "skipped 1 of 4" in captured.err
    with open(out / "captions.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image", "caption"] and [r[1] for r in rows[1:]] == [caption for _, caption in lines]
    jpg = Image.open(out / "shape_0000.jpg")
    assert jpg.size[0] == 512 and jpg.size[1] > 512                # the picture plus a caption band
    html = (out / "captions_result.html").read_text()
    assert html.count("shape_000") >= 3 and "http://" not in html and "https://" not in html


def test_split_shows_references_and_attention_maps(tiny_checkpoints, tmp_path, capsys):
    out = tmp_path / "out"
    inference_visualize.main(["--checkpoint", tiny_checkpoints["attention"], "--split", "val", "--out", str(out),
                              "--max-images", "2", "--beam-size", "1"])
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
    html = (out / "captions_result.html").read_text()
    assert "background" in html                                     # a reference caption of the demo data
    assert html.count("data:image") > 2                             # thumbnails plus attention heatmaps


def test_cli_errors_are_one_line(tiny_checkpoints, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for args in (["--checkpoint", tiny_checkpoints["lstm"], "--images", str(empty)],
                 ["--checkpoint", str(tmp_path / "missing.pth"), "--images", str(empty)]):
        result = subprocess.run([sys.executable, "inference_visualize.py", *args, "--out", str(tmp_path / "o")],
                                cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("error: ")
