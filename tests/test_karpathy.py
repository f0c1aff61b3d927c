"""data/text/karpathy.py: Karpathy's split JSON for Flickr8k, Flickr30k and COCO, its splits, and what is wrong in one."""
import json
import os
import shutil

import pytest

from config import DEFAULTS, merge
from data.text import karpathy
from data.text.captions import load_splits, read_captions


def write(path, document):
    path.write_text(json.dumps(document) if not isinstance(document, str) else document)
    return str(path)


def entry(filename, split, captions, filepath=None):
    image = {"filename": filename, "split": split, "sentences": [{"raw": c, "tokens": c.split()} for c in captions]}
    if filepath is not None:
        image["filepath"] = filepath
    return image


@pytest.mark.parametrize("layout", ["flickr8k", "flickr30k", "coco"])
def test_reads_each_dataset_layout(tmp_path, layout):
    folders = {"coco": ("train2014", "val2014")}.get(layout, (None, None))
    images = [entry("a.jpg", "train", ["A dog runs.", "A dog"], folders[0]),
              entry("b.jpg", "restval", ["A cat"], folders[1]),
              entry("c.jpg", "val", ["Two men"], folders[1]),
              entry("d.jpg", "test", ["A red bus"], folders[1])]
    path = write(tmp_path / f"dataset_{layout}.json", {"images": images, "dataset": layout})
    name = (lambda f, n: f"{f}/{n}") if layout == "coco" else (lambda f, n: n)
    assert read_captions(path) == {name(folders[0], "a.jpg"): ["A dog runs.", "A dog"],
                                   name(folders[1], "b.jpg"): ["A cat"], name(folders[1], "c.jpg"): ["Two men"],
                                   name(folders[1], "d.jpg"): ["A red bus"]}
    root = tmp_path / "root"
    for image in images:
        folder = root / (image.get("filepath") or "")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / image["filename"]).write_bytes(b"")
    data = merge(DEFAULTS, {"data": {"captions": path, "images": str(root)}}, "test")["data"]
    _, train, val = load_splits(data)                     # defaults: train+restval and val
    assert train == [name(folders[0], "a.jpg"), name(folders[1], "b.jpg")] and val == [name(folders[1], "c.jpg")]


def test_split_arithmetic_and_unknown_split_names():
    splits = {"train": ["a", "b"], "restval": ["c", "a"], "val": ["d"], "test": ["e"]}
    assert karpathy.split_names(splits, "train+restval", "x.json") == ["a", "b", "c"]
    assert karpathy.split_names(splits, "val + test", "x.json") == ["d", "e"]
    with pytest.raises(ValueError, match=r"x\.json: no split named 'dev'; its splits are restval, test, train, val"):
        karpathy.split_names(splits, "train+dev", "x.json")


@pytest.mark.parametrize("document, expected", [
    ('{"images": [', r"not valid JSON \(line 1, column 13"),
    ({"dataset": "coco"}, r"no 'images' list at the top"),
    ({"images": [{"filename": "a.jpg", "split": "train"}]}, r"images\[0\] \(a\.jpg\) has no 'sentences'"),
    ({"images": [entry("a.jpg", "train", ["x"]), {"split": "val", "sentences": []}]}, r"images\[1\] has no 'filename'"),
    ({"images": [{"filename": "a.jpg", "sentences": [{"tokens": []}]}]}, r"images\[0\]\.sentences\[0\] \(a\.jpg\) has no 'raw'"),
])
def test_a_broken_file_names_the_entry(tmp_path, document, expected):
    with pytest.raises(ValueError, match=expected):
        read_captions(write(tmp_path / "dataset.json", document))


FLICKR8K = os.environ.get("FLICKR8K_DIR", "")


@pytest.mark.skipif(not os.path.isfile(os.path.join(FLICKR8K, "captions.txt")),
                    reason="set FLICKR8K_DIR to a Flickr8k folder (captions.txt, Images/, split files)")
def test_flickr8k_as_json_gives_the_vocabulary_splits_and_results_of_the_csv(tmp_path, capsys):
    """A slice of Flickr8k converted to Karpathy's form trains and scores exactly as the CSV with split files."""
    import evaluate
    import train
    from data.text.vocab import Vocabulary
    lines = lambda name, n: open(os.path.join(FLICKR8K, name)).read().split()[:n]   # noqa: E731
    train_names, dev_names = lines("Flickr_8k.trainImages.txt", 24), lines("Flickr_8k.devImages.txt", 6)
    captions = read_captions(os.path.join(FLICKR8K, "captions.txt"))
    images = tmp_path / "Images"
    images.mkdir()
    for n in train_names + dev_names:
        shutil.copy(os.path.join(FLICKR8K, "Images", n), images / n)
    (tmp_path / "train.txt").write_text("\n".join(train_names) + "\n")
    (tmp_path / "dev.txt").write_text("\n".join(dev_names) + "\n")
    (tmp_path / "captions.csv").write_text("image,caption\n" + "".join(
        f'{n},"{c}"\n' for n in train_names + dev_names for c in captions[n]))
    json_path = write(tmp_path / "dataset_flickr8k.json", {"images": [
        entry(n, split, captions[n]) for names, split in ((train_names, "train"), (dev_names, "val"), ([], "test"))
        for n in names], "dataset": "flickr8k"})
    small = ["model.encoder=resnet18", "model.encoder_weights=none", "data.image_size=32", "model.hidden_size=32",
             "model.embed_size=16", "data.min_word_freq=1", "train.epochs=1", "train.batch_size=16",
             "train.num_workers=0", "train.val_bleu_images=6", f"train.cache_dir={tmp_path / 'cache'}"]
    runs = {"csv": [f"data.captions={tmp_path / 'captions.csv'}", f"data.train_split={tmp_path / 'train.txt'}",
                    f"data.val_split={tmp_path / 'dev.txt'}"],
            "json": [f"data.captions={json_path}", "data.train_split=train", "data.val_split=val"]}
    for kind, sets in runs.items():
        train.main(["--set", *small, *sets, f"data.images={images}", f"train.out_dir={tmp_path / kind}"])
    assert Vocabulary.load(str(tmp_path / "csv" / "vocab.json")).itos == Vocabulary.load(str(tmp_path / "json" / "vocab.json")).itos
    logs = [(tmp_path / kind / "loss_log.txt").read_text().splitlines() for kind in runs]
    without_time = [[row.split("\t")[:5] + row.split("\t")[6:] for row in log] for log in logs]   # elapsed differs
    assert without_time[0] == without_time[1]
    capsys.readouterr()
    for kind in runs:
        evaluate.main(["--checkpoint", str(tmp_path / kind / "checkpoint_best.pth"), "--num-workers", "0",
                       "--images", str(images), *(["--captions", str(tmp_path / "captions.csv"), "--split-file",
                                                    str(tmp_path / "dev.txt")] if kind == "csv" else
                                                   ["--captions", json_path, "--split", "val"])])
    csv_scores, json_scores = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()[-2:]]
    assert csv_scores == json_scores and csv_scores["n_images"] == 6


def test_evaluate_scores_a_split_of_any_format(tmp_path):
    """evaluate.py's images to score come through the same reader as training's: a Karpathy JSON's split by name
    (default test), or, for the other formats, a split file (default every captioned image)."""
    from argparse import Namespace

    import evaluate
    images = [entry("a.jpg", "train", ["A dog"]), entry("b.jpg", "val", ["A cat"]), entry("c.jpg", "test", ["A bus"])]
    json_path = write(tmp_path / "dataset_flickr8k.json", {"images": images})
    csv_path = write(tmp_path / "captions.csv", "image,caption\na.jpg,A dog\nb.jpg,A cat\nc.jpg,A bus\n")
    split_file = write(tmp_path / "split.txt", "b.jpg\n")

    def names(captions, split=None, split_file=None):
        args = Namespace(captions=captions, images=str(tmp_path), split=split, split_file=split_file)
        return evaluate.images_to_score(args, None)[1]
    assert names(json_path) == ["c.jpg"] and names(json_path, split="train+val") == ["a.jpg", "b.jpg"]
    assert names(csv_path) == ["a.jpg", "b.jpg", "c.jpg"] and names(csv_path, split_file=split_file) == ["b.jpg"]
    with pytest.raises(ValueError, match="captions.csv names no splits"):
        names(csv_path, split="test")
