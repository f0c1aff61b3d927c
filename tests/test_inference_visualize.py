"""inference_visualize.py as a user runs it: files, folders, a split, and bad files."""
import csv
import io
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

import inference_visualize
from tests.conftest import ROOT, run_script
from utils import shown_name


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
    assert "broken.jpg" in captured.err and "skipped 1 file of 4: 1 truncated (copy them again)" in captured.err
    assert "skipped 1 file without an image's extension (notes.txt)" in captured.err
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
        "error: none of the 1 file given could be captioned: 1 not an image (give JPEG, PNG, WebP, BMP or GIF files)")
    assert not (out / "captions_result.html").exists()


def test_the_decoding_used_is_printed_in_one_line(tiny_checkpoints, tiny_data, tmp_path, capsys):
    result = run_script(inference_visualize.main, ["--checkpoint", tiny_checkpoints["attention"], "--images",
                                                   os.path.join(tiny_data[1], "shape_0000.png"), "--out", tmp_path],
                        capsys)
    assert result.returncode == 0
    assert "decoding: beam search (beam 3, length penalty 1), no 2-gram said twice, at most 12 words" in result.stderr


def test_an_out_folder_holding_the_inputs_is_refused_and_nothing_is_written(tiny_checkpoints, tiny_data, tmp_path,
                                                                            capsys, monkeypatch):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        shutil.copy(os.path.join(tiny_data[1], f"shape_{i:04d}.png"), photos / f"p{i}.jpg")
    (tmp_path / "link").symlink_to(photos)
    before = {p.name: p.read_bytes() for p in photos.iterdir()}
    monkeypatch.setattr(inference_visualize, "load_model_at", lambda *a: pytest.fail("the model loaded first"))
    for out in (photos, f"{photos}/", f"{photos}/../photos", tmp_path / "link"):
        result = cli(capsys, "--checkpoint", tiny_checkpoints["lstm"], "--images", photos, "--out", out)
        assert result.returncode == 2 and "Traceback" not in result.stderr, out
        assert "did not write" in result.stderr.strip().splitlines()[-1], result.stderr
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == before


def test_an_input_inside_our_own_out_folder_is_never_written_over(tiny_checkpoints, tiny_data, tmp_path, capsys):
    out = tmp_path / "out"
    image = os.path.join(tiny_data[1], "shape_0000.png")
    assert cli(capsys, "--checkpoint", tiny_checkpoints["lstm"], "--images", image, "--out", out).returncode == 0
    again = cli(capsys, "--checkpoint", tiny_checkpoints["lstm"], "--images", image, "--out", out)
    assert again.returncode == 0                                  # our own files are replaced by the same run
    made = (out / "shape_0000.jpg").read_bytes()
    result = cli(capsys, "--checkpoint", tiny_checkpoints["lstm"], "--images", out / "shape_0000.jpg", "--out", out)
    assert result.returncode == 2 and "would replace an input image" in result.stderr
    assert (out / "shape_0000.jpg").read_bytes() == made
    (out / "user.jpg").write_bytes(b"theirs")                     # a file we did not write, named as an output
    shutil.copy(image, tmp_path / "user.png")
    result = cli(capsys, "--checkpoint", tiny_checkpoints["lstm"], "--images", tmp_path / "user.png", "--out", out)
    assert result.returncode == 2 and "holds user.jpg, which inference_visualize.py did not write" in result.stderr
    assert (out / "user.jpg").read_bytes() == b"theirs"


def test_a_path_mistake_is_told_before_the_model_loads(tiny_checkpoints, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(inference_visualize, "load_model_at", lambda *a: pytest.fail("the model loaded first"))
    (tmp_path / "notes.txt").write_text("text")
    for given, expected in ((tmp_path / "nope", "no such file or folder"),
                            (tmp_path / "notes.txt", "1 not an image")):
        result = cli(capsys, "--checkpoint", tiny_checkpoints["lstm"], "--images", given, "--out", tmp_path / "o")
        assert result.returncode == 2 and expected in result.stderr.strip().splitlines()[-1]


def test_a_strip_one_pixel_wide_is_skipped_and_the_rest_captioned(tiny_checkpoints, tiny_data, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("L", (1, 10_000)).save(photos / "strip.png")        # a few hundred bytes each
    Image.new("L", (100_000, 1)).save(photos / "wide.png")
    shutil.copy(os.path.join(tiny_data[1], "shape_0000.png"), photos)
    result = cli(capsys, "--checkpoint", tiny_checkpoints["lstm"], "--images", photos, "--out", tmp_path / "o")
    assert result.returncode == 0
    assert [line.split("\t")[0] for line in result.stdout.strip().splitlines()] == ["shape_0000.png"]
    assert "skipped 2 files of 3: 1 too narrow (crop them), 1 too large (make them smaller)" in result.stderr
    assert not any(name.startswith(".tmp-") for name in os.listdir(tmp_path / "o"))


def test_ctrl_c_and_sigterm_keep_the_captions_made_so_far(tiny_checkpoints, tiny_data, tmp_path, capsys, monkeypatch):
    from models.decoding import Captioner
    from utils import Terminated
    real_captions = Captioner.captions
    for stop, code in ((KeyboardInterrupt, 130), (Terminated, 143)):
        calls = {"n": 0}

        def stopped_at_batch_2(self, grids, _stop=stop, _calls=calls):
            _calls["n"] += 1
            if _calls["n"] == 2:
                raise _stop()
            return real_captions(self, grids)

        monkeypatch.setattr(Captioner, "captions", stopped_at_batch_2)
        out = tmp_path / stop.__name__
        result = cli(capsys, "--checkpoint", tiny_checkpoints["lstm"], "--images", tiny_data[1], "--out", out,
                     "--batch-size", "4")
        assert result.returncode == code and "Traceback" not in result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith(("interrupted: kept the 4 captions", "terminated: kept the 4 captions")), last
        with open(out / "captions.csv", newline="") as f:
            assert len(list(csv.reader(f))) == 5
        assert (out / "captions_result.html").read_text().count("shape_000") >= 4


def test_odd_file_names_are_printed_escaped_and_csv_cells_never_run(tiny_checkpoints, tiny_data, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("tab\there.png", "=HYPERLINK(1).png", "esc\x1b[31m.png"):
        shutil.copy(os.path.join(tiny_data[1], "shape_0000.png"), photos / name)
    result = cli(capsys, "--checkpoint", tiny_checkpoints["lstm"], "--images", photos, "--out", tmp_path / "o")
    names = [line.split("\t")[0] for line in result.stdout.strip().splitlines()]
    assert names == ["=HYPERLINK(1).png", "esc\\x1b[31m.png", "tab\\there.png"]
    assert all(len(line.split("\t")) == 2 for line in result.stdout.strip().splitlines())
    with open(tmp_path / "o" / "captions.csv", newline="") as f:
        assert [row[0] for row in list(csv.reader(f))[1:]] == ["'=HYPERLINK(1).png", "esc\\x1b[31m.png", "tab\\there.png"]


def test_every_cell_a_spreadsheet_would_run_is_quoted_and_line_breaks_in_names_are_escaped():
    """Names reach the CSV as inference prints them (shown_name: line breaks escaped), then formula starts are quoted."""
    names = [shown_name(start + "x.png") for start in ("=", "+", "-", "@", "\t", "\n", "\r")]
    assert names[4:] == ["\\tx.png", "\\nx.png", "\\rx.png"]
    text = inference_visualize.csv_text([[name, "a dog"] for name in names] + [["plain.png", "-1 dogs"]])
    rows = list(csv.reader(io.StringIO(text, newline="")))[1:]
    assert rows == ([["'" + name, "a dog"] for name in names[:4]] + [[name, "a dog"] for name in names[4:]]
                    + [["plain.png", "'-1 dogs"]])


def test_consensus_re_ranking_from_the_command_line_into_the_gallery(tiny_checkpoints, tiny_data, tmp_path, capsys):
    """A training checkpoint re-ranks with its dataset's training captions; the gallery shows the chosen captions."""
    images = [os.path.join(tiny_data[1], f"shape_000{i}.png") for i in range(2)]
    result = run_script(inference_visualize.main, ["--checkpoint", tiny_checkpoints["attention"], "--images", *images,
                                                   "--out", tmp_path, "--beam-size", "1", "--rerank-samples", "5",
                                                   "--rerank-bleu", "0.5"], capsys)
    assert result.returncode == 0, result.stderr
    assert ("decoding: greedy decoding, no 2-gram said twice, at most 12 words, consensus re-ranking of the greedy "
            "caption + 5 samples at temperature 0.7 (CIDEr-D + 0.5 x BLEU-4)") in result.stderr
    assert len(result.stdout.strip().splitlines()) == 2 and (tmp_path / inference_visualize.GALLERY).is_file()
