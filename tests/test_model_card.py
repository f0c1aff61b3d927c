"""The model card's Hub metadata: it parses, its model-index is the shipped file's embedded scores, and rewriting
it (export.py --card) keeps the prose and changes nothing when nothing changed."""
import os

import pytest
import torch

import export
from models.checkpoint import PRETRAINED
from reports.model_card import (
    DIGITS,
    METRICS,
    card_metadata,
    front_matter,
    split_front_matter,
    update_card,
    with_front_matter,
)
from tests.conftest import run_script

CARD = os.path.join(os.path.dirname(PRETRAINED), "README.md")
NAME = os.path.splitext(os.path.basename(PRETRAINED))[0]


@pytest.fixture(scope="module")
def shipped():
    return torch.load(PRETRAINED, weights_only=True)


def card_text() -> str:
    with open(CARD, encoding="utf-8") as f:
        return f.read()


def test_the_cards_metadata_holds_the_shipped_files_scores(shipped):
    metadata, body = split_front_matter(card_text())
    assert metadata["pipeline_tag"] == "image-to-text" and metadata["library_name"] == "pytorch"
    assert metadata["language"] == ["en"] and {"image-captioning", "flickr8k"} <= set(metadata["tags"])
    assert metadata["metrics"] == ["bleu", "meteor", "rouge", "cider"]
    (entry,) = metadata["model-index"]
    (result,) = entry["results"]
    assert entry["name"] == NAME and result["dataset"]["split"] == "dev"
    assert {m["name"]: m["value"] for m in result["metrics"]} == {
        name: round(shipped["scores"][name], DIGITS) for name, _ in METRICS}
    assert body.lstrip().startswith("# Model card")


def test_the_card_is_what_the_generator_writes_for_the_shipped_file(shipped):
    """The committed block is the rendering of the shipped file: re-exporting with --card changes nothing."""
    assert with_front_matter(card_text(), front_matter(card_metadata(shipped, NAME))) == card_text()


def test_rewriting_keeps_the_prose_and_round_trips(shipped, tmp_path):
    card = tmp_path / "README.md"
    card.write_text("# A card\n\nSome prose.\n", encoding="utf-8")
    update_card(str(card), shipped, NAME)
    once = card.read_text(encoding="utf-8")
    metadata, body = split_front_matter(once)
    assert metadata == card_metadata(shipped, NAME) and body == "\n# A card\n\nSome prose.\n"
    changed = {**shipped, "scores": {**shipped["scores"], "CIDEr": 0.6}}
    update_card(str(card), changed, NAME)
    metadata, body = split_front_matter(card.read_text(encoding="utf-8"))
    assert body == "\n# A card\n\nSome prose.\n"
    assert metadata["model-index"][0]["results"][0]["metrics"][-1] == {"type": "cider", "name": "CIDEr", "value": 0.6}
    update_card(str(card), shipped, NAME)
    assert card.read_text(encoding="utf-8") == once


def test_a_file_without_scores_gets_no_model_index(shipped):
    assert "model-index" not in card_metadata({**shipped, "scores": {}}, NAME)


def test_export_rewrites_the_card_of_the_file_it_writes(tiny_checkpoints, tmp_path, capsys):
    card = tmp_path / "README.md"
    card.write_text("---\nold: 1\n---\n\n# A card\n", encoding="utf-8")
    out = tmp_path / "tiny.pth"
    export.main([tiny_checkpoints["lstm"], str(out), "--card", str(card), "--device", "cpu"])
    metadata, body = split_front_matter(card.read_text(encoding="utf-8"))
    assert body == "\n# A card\n" and "old" not in metadata
    assert metadata == card_metadata(torch.load(out, weights_only=True), "tiny")
    assert {"resnet18", "show-and-tell"} <= set(metadata["tags"])
    missing = run_script(export.main, [tiny_checkpoints["lstm"], tmp_path / "other.pth", "--card", tmp_path / "no.md"],
                         capsys)
    assert missing.returncode == 2 and "--card" in missing.stderr and not (tmp_path / "other.pth").exists()
