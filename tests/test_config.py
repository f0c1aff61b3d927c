import glob

import pytest

from config import DEFAULTS, load_config


def test_defaults_and_overrides():
    config = load_config(None, ["train.lr=1e-3", "train.epochs=3", "model.decoder=attention"])
    assert config["train"]["lr"] == 0.001 and config["train"]["epochs"] == 3
    assert config["model"]["decoder"] == "attention"
    assert config["model"]["hidden_size"] == DEFAULTS["model"]["hidden_size"] == 512
    assert DEFAULTS["model"]["embed_size"] == 256 and DEFAULTS["model"]["encoder"] == "resnet50"


def test_yaml_file_then_set(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\n  batch_size: 16\n")
    config = load_config(str(path), ["train.epochs=2"])
    assert config["train"]["epochs"] == 2 and config["train"]["batch_size"] == 16


@pytest.mark.parametrize("pairs, message", [
    (["train.lrr=1"], "unknown key train.lrr; did you mean train.lr\\?"),
    (["train.epochs=ten"], "train.epochs must be a int"),
    (["epochs"], "expected KEY=VALUE"),
])
def test_bad_overrides_are_rejected(pairs, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, pairs)


def test_repo_configs_load():
    paths = ["config.yaml"] + sorted(glob.glob("configs/*.yaml"))
    recipes = {f"configs/flickr8k_lite2_{name}.yaml" for name in
               ("lstm", "attention", "transformer", "lstm_scst", "attention_scst", "transformer_scst")}
    assert recipes | {"configs/flickr30k.yaml", "configs/coco.yaml"} <= set(paths)
    for path in paths:
        assert load_config(path)["model"]["encoder"]


@pytest.mark.parametrize("pair, expected", [
    ("train.batch_size=0", r"train.batch_size=0 is out of range; it must be at least 1"),
    ("train.epochs=0", r"train.epochs=0 is out of range; it must be at least 1"),
    ("train.lr=0", r"train.lr=0.0 is out of range; it must be more than 0.0"),
    ("model.dropout=1", r"model.dropout=1.0 is out of range; it must be at least 0.0 and less than 1.0"),
    ("train.scst_samples=1", r"train.scst_samples=1 is out of range; it must be at least 2"),
    ("decode.beam_size=-2", r"decode.beam_size=-2 is out of range; it must be at least 1"),
    ("decode.no_repeat_ngram=-1", r"decode.no_repeat_ngram=-1 is out of range; it must be at least 0"),
    ("train.select_metric=bleu", r"train.select_metric='bleu' is not one of bleu4, cider, loss"),
    ("train.cache_on_device=maybe", r"train.cache_on_device='maybe' is not one of auto, true, false"),
    ("train.lr=nan", r"train.lr=nan is not a finite number"),
])
def test_values_out_of_range_name_the_range(pair, expected):
    with pytest.raises(ValueError, match=expected):
        load_config(None, [pair])


def test_yaml_booleans_for_a_word_key_are_words():
    assert load_config(None, ["train.cache_on_device=true"])["train"]["cache_on_device"] == "true"


def test_an_unknown_key_far_from_every_key_points_to_the_full_list_in_help(capsys):
    with pytest.raises(ValueError, match=r"^--set: unknown key train\.wibble; python train\.py --help lists every key$"):
        load_config(None, ["train.wibble=1"])
    import train
    with pytest.raises(SystemExit):
        train.main(["--help"])
    assert "  train.epochs = 10\n" in capsys.readouterr().out


def test_fine_tune_encoder_counts_blocks_and_true_still_means_the_last_one():
    assert load_config(None, ["train.fine_tune_encoder=6"])["train"]["fine_tune_encoder"] == 6
    assert load_config(None, ["train.fine_tune_encoder=true"])["train"]["fine_tune_encoder"] == 1
    assert load_config(None, ["train.fine_tune_encoder=false"])["train"]["fine_tune_encoder"] == 0
