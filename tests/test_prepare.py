import os
import shutil

import pytest
import torch

from config import DEFAULTS, merge
from data.features.cache import Loading, extract_features
from data.prepare import encode_captions, prepare_splits
from data.text.captions import read_captions
from data.text.vocab import Vocabulary
from models.encoder import EncoderCNN

CPU = torch.device("cpu")


def test_encode_captions_pads_truncates_and_indexes_images():
    captions = {"a.jpg": ["a dog runs", "dog"], "b.jpg": ["a red dog runs on the grass fast"]}
    vocab = Vocabulary.build([c for cs in captions.values() for c in cs])
    tokens, lengths, image_index = encode_captions(["b.jpg", "a.jpg"], captions, vocab, max_words=4)
    expected = [vocab.encode("a red dog runs")[:5] + [vocab.end_id], vocab.encode("a dog runs"), vocab.encode("dog")]
    assert lengths.tolist() == [len(e) for e in expected] == [6, 5, 3]
    assert tokens.tolist() == [e + [vocab.pad_id] * (6 - len(e)) for e in expected]
    assert image_index.tolist() == [0, 1, 1]


@pytest.fixture
def split_config(tiny_data, tmp_path):
    """The tiny dataset in a folder of its own, with shape_0001.png corrupt; train: images 0-5, val: 1, 6 and 3."""
    captions, images = tiny_data
    folder = tmp_path / "images"
    shutil.copytree(images, folder)
    (folder / "shape_0001.png").write_bytes(b"not a png")
    names = [f"shape_{i:04d}.png" for i in range(7)]
    for split, listed in (("train", names[:6]), ("val", [names[1], names[6], names[3]])):
        (tmp_path / f"{split}.txt").write_text("\n".join(listed) + "\n")
    return merge(DEFAULTS, {"data": {"captions": captions, "images": str(folder), "image_size": 32,
                                     "train_split": str(tmp_path / "train.txt"), "val_split": str(tmp_path / "val.txt")},
                            "train": {"cache_dir": str(tmp_path / "cache"), "num_workers": 0}}, "test")


def test_prepare_splits_reads_both_splits_in_one_pass_and_skips_the_unreadable(split_config, monkeypatch):
    torch.manual_seed(0)
    encoder = EncoderCNN("resnet18", "none", 16, spatial=True)
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[1])
        return extract_features(*args, **kwargs)
    monkeypatch.setattr("data.prepare.extract_features", counted)
    vocab = Vocabulary.build([c for cs in read_captions(split_config["data"]["captions"]).values() for c in cs])
    splits = prepare_splits(split_config, vocab, encoder, CPU)
    assert len(calls) == 1 and len(calls[0]) == 7                     # images 0-6, image 3 once
    train, val = splits["train"], splits["val"]
    assert train["names"] == ["shape_0000.png"] + [f"shape_{i:04d}.png" for i in range(2, 6)]
    assert val["names"] == ["shape_0006.png", "shape_0003.png"]
    folder = split_config["data"]["images"]
    alone, _ = extract_features(encoder, [os.path.join(folder, n) for n in train["names"] + val["names"]], 32, None,
                                CPU, Loading(workers=0))
    assert torch.equal(train["inputs"][:], alone[:5]) and torch.equal(val["inputs"][:], alone[5:])
    assert train["image_index"].max().item() == 4 and len(train["tokens"]) == 5 * 5    # 5 captions per image


def test_prepare_splits_says_when_no_train_image_can_be_read(split_config, tmp_path):
    (tmp_path / "train.txt").write_text("shape_0001.png\n")
    vocab = Vocabulary.build(["a red square"])
    with pytest.raises(ValueError, match="none of the 1 train images"):
        prepare_splits(split_config, vocab, EncoderCNN("resnet18", "none", 16, spatial=True), CPU)
