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


def test_the_encoder_table_gives_the_encoder_choices_input_sizes_and_normalisation(monkeypatch):
    from config import ENCODERS, FIELDS, Encoder
    from data.images import reading
    from models import backbones
    from models.backbones import build_backbone
    assert FIELDS["model.encoder"].metadata["choices"] == tuple(ENCODERS)
    assert {name: reading.input_size(name, 0) for name in ENCODERS} == {
        "resnet18": 224, "resnet34": 224, "resnet50": 224, "resnet101": 224, "resnet152": 224, "efficientnet_lite2": 260}
    assert reading.normalisation("efficientnet_lite2") == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert reading.normalisation("resnet50") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    # a new row is all that image reading and the backbone builder need
    built = []
    monkeypatch.setitem(backbones.FAMILIES, "toy", lambda name, imagenet: built.append((name, imagenet)) or "net")
    monkeypatch.setitem(ENCODERS, "toy", Encoder("toy", feature_dim=8, native_size=96, mean=(0.1, 0.2, 0.3),
                                                  std=(1, 2, 3)))
    assert reading.input_size("toy", 0) == 96 and reading.input_size("toy", 40) == 40
    assert reading.transform_id("toy", 0) == ("rgb|exif-oriented|resize96-bilinear-squash|uint8|mean(0.1, 0.2, 0.3)|"
                                              "std(1, 2, 3)")
    assert build_backbone("toy", "imagenet") == "net" and built == [("toy", True)]
    with pytest.raises(ValueError, match="model.encoder='resnet9' is not one of resnet18, .*efficientnet_lite2, toy"):
        reading.input_size("resnet9", 0)


def test_the_old_name_val_bleu_images_still_reads_from_yaml_set_and_old_checkpoints(tmp_path):
    from config import merge
    path = tmp_path / "old.yaml"
    path.write_text("train:\n  val_bleu_images: 7\n")
    assert load_config(str(path)).train.val_decoded_images == 7
    assert load_config(None, ["train.val_bleu_images=3"]).train.val_decoded_images == 3
    old_checkpoint_config = DEFAULTS.to_dict()
    old_checkpoint_config["train"]["val_bleu_images"] = old_checkpoint_config["train"].pop("val_decoded_images") + 1
    config = merge(DEFAULTS, old_checkpoint_config, "old.pth")
    assert config.train.val_decoded_images == DEFAULTS.train.val_decoded_images + 1
    assert "val_bleu_images" not in config.to_dict()["train"]          # what a new checkpoint stores: the new name
    with pytest.raises(ValueError, match=r"--set: train\.val_decoded_images=-1 is out of range"):
        load_config(None, ["train.val_bleu_images=-1"])


def test_the_fixed_and_path_flags_give_exactly_the_lists_they_replaced():
    from config import FIXED_ON_RESUME, KEYS, PATH_KEYS
    from models import exporting
    before_fixed = [k for k in KEYS if k.startswith(("model.", "data."))] + ["train.scst", "train.fine_tune_encoder",
                                                                             "train.ema_decay"]
    before_paths = ["data.captions", "data.images", "data.train_split", "data.val_split", "train.out_dir",
                    "train.cache_dir", "train.init_from"]
    assert sorted(FIXED_ON_RESUME) == sorted(before_fixed) and len(set(FIXED_ON_RESUME)) == len(FIXED_ON_RESUME)
    assert PATH_KEYS == before_paths
    assert exporting.PATH_KEYS == PATH_KEYS


def test_select_metric_offers_every_validation_score_and_the_loss():
    from config import FIELDS
    from evaluation.metrics import SCORE_NAMES
    assert FIELDS["train.select_metric"].metadata["choices"] == (*SCORE_NAMES, "loss")
