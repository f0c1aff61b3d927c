"""inference_visualize.py as a user runs it: files, folders, a split, and bad files."""
import csv
import os
import shutil
import subprocess
import sys

from PIL import Image

import inference_visualize
from tests.conftest import ROOT, run_script


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


def test_cli_errors_are_one_line(tiny_checkpoints, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli(capsys, "--checkpoint", tiny_checkpoints["lstm"], "--images", empty, "--out", tmp_path / "o")
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error: ")
    # once as a user's shell runs it: a new process, whose stderr shows no traceback
    result = subprocess.run([sys.executable, "inference_visualize.py", "--checkpoint", str(tmp_path / "missing.pth"),
                             "--images", str(empty), "--out", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")


def cli(capsys, *args):
    return run_script(inference_visualize.main, args, capsys)


def test_bad_numbers_and_an_out_that_is_a_file_are_one_line(tiny_checkpoints, tiny_data, tmp_path, capsys):
    image = os.path.join(tiny_data[1], "shape_0000.png")
    (tmp_path / "taken").write_text("a file")
    for flags, expected in ((["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
                            (["--max-len", "-5"], "argument --max-len: must be at least 1, got -5"),
                            (["--max-images", "-1"], "argument --max-images: must be at least 1, got -1"),
                            (["--max-images", "0"], "argument --max-images: must be at least 1, got 0"),
                            (["--beam-size", "x"], "argument --beam-size: 'x' is not a whole number"),
                            (["--out", str(tmp_path / "taken")], "is a file; give a folder")):
        result = cli(capsys, "--checkpoint", tiny_checkpoints["lstm"], "--images", image, *flags)
        assert result.returncode == 2 and "Traceback" not in result.stderr, flags
        assert expected in result.stderr.strip().splitlines()[-1], (flags, result.stderr)


def test_a_file_name_that_is_not_utf8_is_skipped_and_the_rest_captioned(tiny_checkpoints, tiny_data, tmp_path, capsys):
    folder = os.fsencode(str(tmp_path / "photos"))
    os.mkdir(folder)
    for name in (b"one.png", b"caf\xe9.png", b"two.png"):
        shutil.copy(os.path.join(tiny_data[1], "shape_0000.png"), os.path.join(folder, name))
    result = cli(capsys, "--checkpoint", tiny_checkpoints["lstm"], "--images", os.fsdecode(folder), "--out", str(tmp_path / "o"))
    assert result.returncode == 0, result.stderr
    assert [line.split("\t")[0] for line in result.stdout.strip().splitlines()] == ["one.png", "two.png"]
    assert "skipped 1 file whose name is not valid UTF-8" in result.stderr


def test_outputs_on_a_full_disk_are_one_line(tiny_checkpoints, tiny_data, small_disk):
    disk, fill = small_disk
    fill(2048)
    result = subprocess.run([sys.executable, "inference_visualize.py", "--checkpoint", tiny_checkpoints["lstm"], "--images",
                             tiny_data[1], "--out", str(disk / "out")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {disk / 'out'}") and "No space left on device" in last


def test_no_image_among_the_inputs_is_an_error_not_an_empty_gallery(tiny_checkpoints, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    out = tmp_path / "out"
    result = run_script(inference_visualize.main, ["--checkpoint", tiny_checkpoints["lstm"], "--images", notes,
                                                   "--out", out], capsys)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: no image found among the 1 file given ({notes}): none could be read as an image; give JPEG, PNG, "
        f"WebP, BMP or GIF files or folders of them")
    assert not (out / "captions_result.html").exists()


def test_the_decoding_used_is_printed_in_one_line(tiny_checkpoints, tiny_data, tmp_path, capsys):
    result = run_script(inference_visualize.main, ["--checkpoint", tiny_checkpoints["attention"], "--images",
                                                   os.path.join(tiny_data[1], "shape_0000.png"), "--out", tmp_path],
                        capsys)
    assert result.returncode == 0
    assert "decoding: beam search (beam 3, length penalty 1), no 2-gram said twice, at most 12 words" in result.stderr
