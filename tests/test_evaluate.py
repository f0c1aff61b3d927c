"""evaluate.py: real decoding, coco metrics, per-image captions JSON, and bad splits."""
import json

import pytest

import evaluate


def test_metrics_json_and_captions_file(tiny_checkpoints, tiny_data, tmp_path, capsys):
    captions, images = tiny_data
    split = tmp_path / "split.txt"
    split.write_text("shape_0001.png\nshape_0002.png\nnot_captioned.png\n")
    out = tmp_path / "m" / "metrics.json"
    evaluate.main(["--checkpoint", tiny_checkpoints["lstm"], "--captions", captions, "--images", images,
                   "--split-file", str(split), "--beam-size", "3", "--out", str(out), "--num-workers", "0",
                   "--no-repeat-ngram", "2"])
    captured = capsys.readouterr()
    printed = json.loads(captured.out.strip().splitlines()[-1])
    assert printed == json.loads(out.read_text())
    for key in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"):
        assert 0.0 <= printed[key] <= 10.0
    assert printed["n_images"] == 2 and printed["n_skipped"] == 1 and "not_captioned.png" in captured.err
    per_image = json.loads((tmp_path / "m" / "metrics_captions.json").read_text())
    assert [p["image"] for p in per_image] == ["shape_0001.png", "shape_0002.png"]
    assert all(len(p["references"]) == 5 and "CIDEr" in p["scores"] for p in per_image)
    assert printed["no_repeat_ngram"] == 2 and printed["beam_size"] == 3
    for p in per_image:                                              # no pair of words said twice
        words = p["caption"].split()
        assert len(set(zip(words, words[1:]))) == max(len(words) - 1, 0)


def test_empty_split_and_missing_images(tiny_checkpoints, tiny_data, tmp_path):
    captions, images = tiny_data
    split = tmp_path / "split.txt"
    split.write_text("nowhere.png\n")
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate.main(["--checkpoint", tiny_checkpoints["lstm"], "--captions", captions, "--images", images,
                       "--split-file", str(split)])
    split.write_text("")
    with pytest.raises(ValueError, match="lists no images"):
        evaluate.main(["--checkpoint", tiny_checkpoints["lstm"], "--captions", captions, "--images", images,
                       "--split-file", str(split)])


def test_without_flags_it_decodes_as_the_checkpoint_says_and_prints_how(tiny_checkpoints, tiny_data, tmp_path, capsys):
    """The README's tables, inference and the app decode as the checkpoint's decode section says: so does
    evaluate.py when no flag says otherwise (it used to decode greedily)."""
    captions, images = tiny_data
    split = tmp_path / "split.txt"
    split.write_text("shape_0001.png\nshape_0002.png\n")
    evaluate.main(["--checkpoint", tiny_checkpoints["attention"], "--captions", captions, "--images", images,
                   "--split-file", str(split), "--num-workers", "0"])
    captured = capsys.readouterr()
    printed = json.loads(captured.out.strip().splitlines()[-1])
    assert (printed["beam_size"], printed["no_repeat_ngram"], printed["length_penalty"], printed["max_len"]) == (3, 2, 1.0, 12)
    assert "decoding: beam search (beam 3, length penalty 1), no 2-gram said twice, at most 12 words\n" in captured.err
    assert not any(key.startswith("rerank") for key in printed)          # re-ranking is off: its keys stay out


def test_a_path_mistake_is_told_before_the_model_loads(tiny_checkpoints, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "load_model_at", lambda *a: pytest.fail("the model loaded first"))
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate.main(["--checkpoint", tiny_checkpoints["lstm"], "--captions", tiny_data[0],
                       "--images", str(tmp_path / "no_such_folder")])


def test_ctrl_c_and_sigterm_keep_the_captions_made_so_far(tiny_checkpoints, tiny_data, tmp_path, monkeypatch, capsys):
    from models.decoding import Captioner
    from tests.conftest import run_script
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
        out = tmp_path / stop.__name__ / "metrics.json"
        result = run_script(evaluate.main, ["--checkpoint", tiny_checkpoints["lstm"], "--captions", tiny_data[0],
                                            "--images", tiny_data[1], "--batch-size", "4", "--num-workers", "0",
                                            "--out", out], capsys)
        assert result.returncode == code and "Traceback" not in result.stderr
        assert "kept the 4 captions made so far" in result.stderr.strip().splitlines()[-1]
        assert len(json.loads((out.parent / "metrics_captions.json").read_text())) == 4 and not out.exists()
