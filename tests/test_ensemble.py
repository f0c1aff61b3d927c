"""models/ensemble.py: several models decoded as one, sharing the CNN's trunk; exported as one file."""
import pytest
import torch
import torch.nn.functional as F

import export
import train
from config import load_config
from models.caption_model import build_model
from models.checkpoint import load_checkpoint, load_model
from models.decoding import DecodeSettings, beam_search, generate
from models.ensemble import CaptionEnsemble
from tests.conftest import tiny_settings
from utils import UserError


def model_with_tail(tail: int, seed: int):
    config = load_config(None, ["model.encoder=resnet18", "model.encoder_weights=none", "model.decoder=attention",
                                "model.embed_size=16", "model.hidden_size=16", "model.attention_size=8",
                                f"train.fine_tune_encoder={tail}"])
    torch.manual_seed(0)                    # one CNN for all: an ensemble shares its trunk
    model = build_model(config, vocab_size=20)
    torch.manual_seed(seed)
    for p in [*model.decoder.parameters(), *model.encoder.tail_parameters()]:
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()


def test_an_ensemble_of_one_model_twice_decodes_as_that_model():
    model = model_with_tail(0, seed=1)
    twin = model_with_tail(0, seed=1)
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        alone = beam_search(model, model.encoder.extract(images), DecodeSettings(3, 8))
        ensemble = CaptionEnsemble([model, twin]).eval()
        together = beam_search(ensemble, ensemble.encoder.extract(images), DecodeSettings(3, 8))
    assert [r["tokens"] for r in alone] == [r["tokens"] for r in together]
    assert [r["score"] for r in alone] == pytest.approx([r["score"] for r in together], abs=1e-4)


def test_each_step_averages_the_models_log_probabilities_over_their_own_tails():
    models = [model_with_tail(0, seed=1), model_with_tail(2, seed=2), model_with_tail(3, seed=3)]
    ensemble = CaptionEnsemble(models).eval()
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    tokens = torch.tensor([1, 1])
    with torch.no_grad():
        stored = ensemble.encoder.extract(images)
        assert stored.dim() == 4                        # cut before the deepest tail's 3 blocks
        logits, _, alpha = ensemble.step(tokens, ensemble.init_state(stored))
        alone = [F.log_softmax(m.step(tokens, m.init_state(m.encoder.extract(images)))[0], -1) for m in models]
    assert torch.allclose(logits, torch.stack(alone).mean(0), atol=1e-5) and alpha.shape == (2, 4)
    with pytest.raises(ValueError, match="an ensemble only decodes"):
        ensemble(stored, torch.tensor([[1, 2]]), torch.tensor([2]))


def test_an_exported_ensemble_is_one_file_that_decodes_as_its_models_do(tiny_data, tmp_path, capsys):
    paths = []
    for name, lr in (("a", "3e-3"), ("b", "1e-3")):      # the same seed: the same random CNN, as a package gives one
        train.main(["--set", *tiny_settings(tiny_data, tmp_path / name), "model.decoder=attention", "train.epochs=1",
                    f"train.lr={lr}"])
        paths.append(str(tmp_path / name / "run" / "checkpoint_best.pth"))
    out = tmp_path / "ensemble.pth"
    export.main([paths[0], str(out), "--ensemble", paths[1], "--verify-images", tiny_data[1], "--device", "cpu",
                 "--min-agreement", "0.6"])
    assert "captions equal the training checkpoint's" in capsys.readouterr().err
    model, vocab, _ = load_model(torch.load(out, weights_only=True), str(out))
    assert isinstance(model, CaptionEnsemble) and len(model.members) == 2
    full = [load_model(load_checkpoint(p))[0] for p in paths]
    for exported, trained in zip(model.members, full):
        for key, value in trained.state_dict().items():
            if value.is_floating_point():
                assert torch.allclose(exported.state_dict()[key], value.half().float()), key
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        results = generate(model, model.encoder.extract(images), vocab, DecodeSettings(3, 8))
        assert all(r["caption"] is not None for r in results)
    # A run cannot start from an ensemble: it is told which file to start from instead.
    with pytest.raises(UserError, match="is an ensemble of 2 models"):
        train.main(["--set", *tiny_settings(tiny_data, tmp_path / "c"), "model.decoder=attention",
                    f"train.init_from={out}"])


def test_models_reading_images_of_different_sizes_make_no_ensemble():
    with pytest.raises(UserError, match="images of one size"):
        CaptionEnsemble([model_with_tail(0, 1), model_with_tail(0, 2)], [224, 260])
