"""data/text/captions.py: captions files parsed as CSV, splits by image, missing images, wordless captions."""
import pytest

from config import DEFAULTS, merge
from data.text.captions import load_splits, read_captions, read_dataset, split_images


def write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return str(path)


def test_reads_csv_and_token_formats(tmp_path):
    csv_path = write(tmp_path / "c.csv", 'image,caption\na.jpg,"A dog, running."\na.jpg,A dog\nb.jpg,A cat\n')
    token_path = write(tmp_path / "t.txt", "a.jpg#0\tA dog, running.\na.jpg#1\tA dog\nb.jpg#0\tA cat\n")
    expected = {"a.jpg": ["A dog, running.", "A dog"], "b.jpg": ["A cat"]}
    assert read_captions(csv_path) == expected
    assert read_captions(token_path) == expected


def test_empty_caption_is_skipped_with_warning(tmp_path, capsys):
    path = write(tmp_path / "c.csv", "image,caption\na.jpg,   \na.jpg,a dog\nb.jpg,\n")
    assert read_captions(path) == {"a.jpg": ["a dog"]}
    err = capsys.readouterr().err
    assert "line 2" in err and "skipped 2 rows" in err


def test_wrong_header_names_file_and_fix(tmp_path):
    path = write(tmp_path / "c.csv", "filename,text\na.jpg,a dog\n")
    with pytest.raises(ValueError, match=r"c\.csv: line 1 .* header must be `image,caption`"):
        read_captions(path)


def test_non_utf8_names_line(tmp_path):
    path = write(tmp_path / "c.csv", "image,caption\na.jpg,a dog\nb.jpg,caf\xe9 scene\n", encoding="latin-1")
    with pytest.raises(ValueError, match=r"line 3 is not UTF-8.*re-save"):
        read_captions(path)


def test_split_is_by_image_deterministic_and_disjoint():
    names = [f"{i}.jpg" for i in range(100)]
    train, val = split_images(names, 0.2, seed=3)
    assert len(val) == 20 and not set(train) & set(val) and set(train) | set(val) == set(names)
    assert split_images(list(reversed(names)), 0.2, seed=3) == (train, val)
    assert split_images(names, 0.2, seed=4) != (train, val)


def test_load_splits_skips_missing_images_and_uses_split_files(tiny_data, tmp_path, capsys):
    captions, images = tiny_data
    train_file = write(tmp_path / "train.txt", "shape_0000.png\nshape_0001.png\nnot_there.png\n")
    val_file = write(tmp_path / "val.txt", "shape_0002.png\n")
    data = merge(DEFAULTS, {"data": {"captions": captions, "images": images, "train_split": train_file,
                                     "val_split": val_file}}, "test")["data"]
    all_captions, train, val = load_splits(data)
    assert train == ["shape_0000.png", "shape_0001.png"] and val == ["shape_0002.png"]
    assert "not_there.png" in capsys.readouterr().err
    # every caption row of an image stays with that image
    assert len(all_captions["shape_0000.png"]) == 5


def test_a_quoted_caption_keeps_its_commas_and_line_breaks(tmp_path):
    path = write(tmp_path / "c.csv", 'image,caption\na.jpg,"zorbly\nquizzle, on a mat"\nb.jpg,a cat\n')
    assert read_captions(path) == {"a.jpg": ["zorbly quizzle, on a mat"], "b.jpg": ["a cat"]}


def test_captions_without_words_are_dropped_and_counted(tmp_path, capsys):
    path = write(tmp_path / "c.csv", "image,caption\na.jpg,...\na.jpg,a dog\nb.jpg,!?\nb.jpg,a cat\n")
    assert read_captions(path) == {"a.jpg": ["a dog"], "b.jpg": ["a cat"]}
    err = capsys.readouterr().err
    assert "line 2: caption '...' has no words" in err and "skipped 2 captions with no words" in err


def test_a_broken_quote_names_its_line(tmp_path):
    path = write(tmp_path / "c.csv", 'image,caption\na.jpg,a dog\nb.jpg,"a cat\n')
    with pytest.raises(ValueError, match=r"c\.csv: line 3 is not valid CSV"):
        read_captions(path)


def test_read_dataset_reads_each_format_with_its_splits(tmp_path):
    import json
    expected = {"a.jpg": ["A dog, running.", "A dog"], "b.jpg": ["A cat"]}
    csv_path = write(tmp_path / "c.csv", 'image,caption\na.jpg,"A dog, running."\na.jpg,A dog\nb.jpg,A cat\n')
    token_path = write(tmp_path / "t.txt", "a.jpg#0\tA dog, running.\na.jpg#1\tA dog\nb.jpg#0\tA cat\n")
    json_path = write(tmp_path / "k.json", json.dumps({"images": [
        {"filename": "a.jpg", "split": "train", "sentences": [{"raw": "A dog, running."}, {"raw": "A dog"}]},
        {"filename": "b.jpg", "split": "test", "sentences": [{"raw": "A cat"}]}]}))
    split_file = write(tmp_path / "split.txt", "b.jpg\n")
    for path in (csv_path, token_path):          # no splits of their own: a split file, or None for the caller
        assert read_dataset(path, {"train": split_file, "val": ""}) == (expected, {"train": ["b.jpg"], "val": None})
    # a Karpathy JSON's splits by name, and where none is named its defaults (train: train+restval; test: test)
    assert read_dataset(json_path, {"train": "", "val": "test", "test": ""}) == (
        expected, {"train": ["a.jpg"], "val": ["b.jpg"], "test": ["b.jpg"]})
    assert read_dataset(json_path, {}) == (expected, {}) and read_captions(json_path) == expected
    with pytest.raises(ValueError, match=r"k\.json: no split named 'dev'; its splits are test, train"):
        read_dataset(json_path, {"test": "dev"})
    with pytest.raises(ValueError, match=r"^test: no such split file; .*c\.csv names no splits \(only a Karpathy JSON"):
        read_dataset(csv_path, {"test": "test"})


def test_one_split_file_without_the_other_is_refused(tiny_data, tmp_path):
    captions, images = tiny_data
    train_file = write(tmp_path / "train.txt", "shape_0000.png\n")
    data = merge(DEFAULTS, {"data": {"captions": captions, "images": images, "train_split": train_file}}, "test")
    with pytest.raises(ValueError, match="set both data.train_split and data.val_split, or neither"):
        load_splits(data.data)
