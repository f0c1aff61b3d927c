"""A small slice of real Flickr8k, when FLICKR8K_DIR points at it (.ci/run sets it); skipped otherwise."""
import json
import os

import pytest

FLICKR8K = os.environ.get("FLICKR8K_DIR", "")
pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(FLICKR8K, "captions.txt")),
                                reason="set FLICKR8K_DIR to a Flickr8k folder (captions.txt, Images/, split files)")


def first_lines(path, n):
    with open(path) as f:
        return [line.strip() for line, _ in zip(f, range(n))]


def test_train_and_evaluate_on_a_flickr8k_slice(tmp_path, capsys):
    import evaluate
    import train
    train_split, dev_split = tmp_path / "train.txt", tmp_path / "dev.txt"
    train_split.write_text("\n".join(first_lines(os.path.join(FLICKR8K, "Flickr_8k.trainImages.txt"), 48)) + "\n")
    dev_split.write_text("\n".join(first_lines(os.path.join(FLICKR8K, "Flickr_8k.devImages.txt"), 8)) + "\n")
    captions, images = os.path.join(FLICKR8K, "captions.txt"), os.path.join(FLICKR8K, "Images")
    train.main(["--config", "configs/flickr8k.yaml", "--set", f"data.captions={captions}", f"data.images={images}",
                f"data.train_split={train_split}", f"data.val_split={dev_split}", "data.min_word_freq=2",
                "model.encoder=resnet18", "model.encoder_weights=none", "data.image_size=64", "model.hidden_size=64",
                "train.epochs=2", "train.batch_size=16", "train.num_workers=0", "train.val_bleu_images=8",
                f"train.out_dir={tmp_path / 'run'}", f"train.cache_dir={tmp_path / 'cache'}", "train.log_every=5"])
    log = (tmp_path / "run" / "loss_log.txt").read_text().splitlines()
    train_losses = [float(row.split("\t")[3]) for row in log[1:] if "\ttrain\t" in row]
    assert len(train_losses) >= 4 and train_losses[-1] < train_losses[0]
    vocab = json.loads((tmp_path / "run" / "vocab.json").read_text())["itos"]
    assert {"dog", "man", "a"} <= set(vocab)                       # built from the 48 training images' captions
    evaluate.main(["--checkpoint", str(tmp_path / "run" / "checkpoint_best.pth"), "--captions", captions,
                   "--images", images, "--split-file", str(dev_split), "--num-workers", "0"])
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["n_images"] == 8 and 0.0 <= metrics["BLEU-1"] <= 1.0
