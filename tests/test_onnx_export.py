"""export.py --onnx: each decoder's graphs caption as the PyTorch model does, through models/decoding.py unchanged,
and inference_visualize.py and evaluate.py take the folder as --checkpoint."""
import json
import os
import sys

import pytest
import torch

import bench
import evaluate
import export
import inference_visualize
from benchmarks import onnx_runtime
from data.features.cache import extract_features
from data.images.reading import image_loader, input_size
from models.checkpoint import load_checkpoint, load_model, load_model_at
from models.decoding import DecodeSettings, SpecialIds, beam_search, greedy_decode, sample_captions
from models.ensemble import CaptionEnsemble
from models.onnx_export import write_graphs
from models.onnx_model import OnnxCaptionModel, require
from tests.conftest import run_script, tiny_settings

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoints, tiny_data, tmp_path_factory):
    """{case: checkpoint}: conftest's lstm and attention, and here a Transformer, an up-down decoder, and an
    attention model whose CNN's last block was fine-tuned, exported as the shipped model is (an inference file)."""
    import train
    found = dict(tiny_checkpoints)
    for case, extra in (("transformer", ["model.decoder=transformer", "model.num_layers=2"]),
                        ("updown", ["model.decoder=updown"]),
                        ("tail", ["model.decoder=attention", "train.fine_tune_encoder=1"])):
        folder = tmp_path_factory.mktemp(case)
        train.main(["--set", *tiny_settings(tiny_data, folder), *extra, "train.epochs=1"])
        found[case] = str(folder / "run" / "checkpoint_best.pth")
    shipped = str(tmp_path_factory.mktemp("shipped") / "tail.pth")
    export.main([found["tail"], shipped, "--device", "cpu"])
    found["tail"] = shipped
    return found


@pytest.fixture(scope="module")
def folders(checkpoints, tiny_data, tmp_path_factory):
    """{case: ONNX folder}, each exported with its captions verified on the 24 tiny images (at least 99% equal)."""
    made = {}
    for case, checkpoint in checkpoints.items():
        made[case] = str(tmp_path_factory.mktemp("onnx") / case)
        export.main([checkpoint, made[case], "--onnx", "--verify-images", tiny_data[1]])
    return made


def images_of(folder: str, config, n: int = 6) -> torch.Tensor:
    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder))[:n]
    return next(iter(image_loader(paths, input_size(config.model.encoder, config.data.image_size), n, 0)))[0]


@pytest.mark.parametrize("case", ["lstm", "attention", "transformer", "updown", "tail"])
def test_decoding_runs_unchanged_on_the_graphs_and_finds_the_same_words(case, checkpoints, folders, tiny_data):
    model, vocab, config = load_model(load_checkpoint(checkpoints[case]), checkpoints[case])
    onnx, onnx_vocab, onnx_config, stand_in = load_model_at(folders[case])
    assert isinstance(onnx, OnnxCaptionModel) and onnx_vocab.itos == vocab.itos and stand_in["kind"] == "inference"
    assert onnx_config.model == config.model and onnx_config.decode == config.decode
    images = images_of(tiny_data[1], config)
    with torch.no_grad():
        grid = model.encoder.extract(images)
        onnx_grid = onnx.encoder.extract(images)
        assert torch.allclose(onnx_grid, grid, atol=1e-4)
        for a, b in zip(onnx.init_state(grid), model.init_state(grid)):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-4)
        ids, max_len = SpecialIds.of(vocab), config.decode.max_len
        for run in (lambda m: greedy_decode(m, grid, DecodeSettings(max_len=max_len, no_repeat_ngram=2), ids),
                    lambda m: beam_search(m, grid, DecodeSettings(3, max_len, no_repeat_ngram=2), ids)):
            ours, theirs = run(model), run(onnx)
            assert [r["tokens"] for r in theirs] == [r["tokens"] for r in ours]
            if ours[0]["attention"] is not None:
                assert torch.allclose(theirs[0]["attention"], ours[0]["attention"], atol=1e-4)
        generator = torch.Generator().manual_seed(0)
        tokens, lengths = sample_captions(onnx, grid, 2, DecodeSettings(max_len=max_len), ids, generator=generator)
        assert tokens.size(0) == 2 * len(images) and (lengths >= 1).all()


def test_the_folder_holds_the_graphs_and_portable_json(folders, tiny_data):
    folder = folders["attention"]
    assert sorted(os.listdir(folder)) == ["config.json", "encoder.onnx", "graphs.json", "init_state.onnx",
                                          "step.onnx", "vocab.json"]
    config = open(os.path.join(folder, "config.json")).read()
    assert os.path.dirname(tiny_data[1]) not in config and json.loads(config)["decode"]["max_len"] == 12
    manifest = json.load(open(os.path.join(folder, "graphs.json")))
    assert manifest["step_changes"] == [True, True, False, False] and manifest["alpha"]   # h, c; grid, projection


def test_inference_and_evaluate_take_the_folder(checkpoints, folders, tiny_data, tmp_path, capsys):
    args = ["--images", tiny_data[1], "--max-images", "6", "--device", "cpu"]
    ours = run_script(inference_visualize.main, ["--checkpoint", checkpoints["transformer"], *args, "--out",
                                                 tmp_path / "pt"], capsys)
    theirs = run_script(inference_visualize.main, ["--checkpoint", folders["transformer"], *args, "--out",
                                                   tmp_path / "onnx"], capsys)
    assert ours.returncode == theirs.returncode == 0 and theirs.stdout == ours.stdout
    assert (tmp_path / "onnx" / "captions_result.html").is_file()
    scores = run_script(evaluate.main, ["--checkpoint", folders["lstm"], "--captions", tiny_data[0], "--images",
                                        tiny_data[1], "--device", "cpu", "--num-workers", "0", "--no-cache"], capsys)
    assert scores.returncode == 0 and json.loads(scores.stdout.strip().splitlines()[-1])["n_images"] == 24


def test_the_feature_cache_keys_the_graph_by_its_own_hash(folders, tiny_data, tmp_path):
    onnx, _, config, _ = load_model_at(folders["tail"])
    paths = sorted(os.path.join(tiny_data[1], f) for f in os.listdir(tiny_data[1]))[:4]
    first, _ = extract_features(onnx.encoder, paths, config.data.image_size, str(tmp_path), torch.device("cpu"))
    again, _ = extract_features(onnx.encoder, paths, config.data.image_size, str(tmp_path), torch.device("cpu"))
    expected = onnx.encoder.extract(images_of(tiny_data[1], config, 4))
    assert len(os.listdir(tmp_path)) == 1 and torch.equal(first[:4], again[:4])
    assert torch.allclose(onnx.encoder.tail(again[:4]).float(), expected, atol=1e-2)


def test_an_ensemble_is_refused_in_one_line(checkpoints, tmp_path):
    members = [load_model(load_checkpoint(checkpoints[c]), checkpoints[c]) for c in ("attention", "updown")]
    ensemble = CaptionEnsemble([m for m, _, _ in members])
    with pytest.raises(ValueError, match="an ensemble: --onnx exports one model"):
        write_graphs(ensemble, members[0][1], members[0][2], str(tmp_path), "ensemble.pth")


def test_a_folder_that_is_not_ours_is_never_written_over(checkpoints, tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    result = run_script(export.main, [checkpoints["lstm"], tmp_path / "mine", "--onnx"], capsys)
    assert result.returncode == 2 and "is not a folder export.py --onnx wrote" in result.stderr
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]
    (tmp_path / "link").symlink_to(tmp_path / "mine")
    result = run_script(export.main, [checkpoints["lstm"], tmp_path / "link", "--onnx"], capsys)
    assert result.returncode == 2 and "a link" in result.stderr and os.listdir(tmp_path / "mine") == ["notes.txt"]


def test_a_failed_verification_leaves_nothing(checkpoints, tiny_data, tmp_path, capsys):
    out = tmp_path / "onnx"
    result = run_script(export.main, [checkpoints["lstm"], out, "--onnx", "--verify-images", tiny_data[1],
                                      "--min-agreement", "1.01"], capsys)
    assert result.returncode == 2 and "(0 differ)" in result.stderr and "was not written" in result.stderr
    assert not out.exists() and os.listdir(tmp_path) == []


def test_without_onnxruntime_the_error_says_what_to_install(folders, tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)         # as if not installed: import raises ImportError
    with pytest.raises(ValueError, match="pip install -r requirements-onnx.txt"):
        require("onnxruntime")
    result = run_script(inference_visualize.main, ["--checkpoint", folders["lstm"], "--images", tiny_data[1],
                                                   "--out", tmp_path / "o"], capsys)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "requirements-onnx.txt" in result.stderr


def test_the_speed_comparison_measures_both_sides(checkpoints, folders, capsys):
    """bench.py --pretrained --onnx's figures on a tiny model and 3 generated photos (no timing asserted)."""
    result = onnx_runtime.run(folders["tail"], checkpoints["tail"], None, 3)
    onnx_runtime.print_table(result)
    names = {f"{part}_bs{bs}_images_per_s" for part in ("cnn", "decoder", "photo_to_caption") for bs in (1, 16)}
    assert set(result["figures"]) == names | {"load_s", "cold_start_s"} and result["photos"] == 3
    for figure in result["figures"].values():
        assert all(figure[k] > 0 for k in ("pytorch", "onnx", "ratio"))
    assert "cold_start_s" in capsys.readouterr().err
    with pytest.raises(ValueError, match="was exported from another file"):
        onnx_runtime.run(folders["tail"], checkpoints["lstm"], None, 3)
    refused = run_script(bench.main, ["--onnx", folders["tail"]], capsys)
    assert refused.returncode == 2 and "add --pretrained" in refused.stderr
