"""The Hugging Face Hub metadata of a model card: the YAML block at the top of pretrained/README.md.

    python export.py ... pretrained/flickr8k_attention_lite2.pth --card pretrained/README.md

export.py --card rewrites that block from the file it writes (its config and the dev scores it embeds), so the
card's model-index never disagrees with the file; the prose below the block is kept as it is.

    metadata = card_metadata(checkpoint, "flickr8k_attention_lite2")   # a dict, as the Hub reads it
    text = with_front_matter(card_text, front_matter(metadata))         # the card with its block replaced
"""
import os

import yaml

from utils import UserError, atomic_write_text

METRICS = [("BLEU-1", "bleu"), ("BLEU-2", "bleu"), ("BLEU-3", "bleu"), ("BLEU-4", "bleu"), ("METEOR", "meteor"),
           ("ROUGE-L", "rouge"), ("CIDEr", "cider")]         # (our name, the Hub's metric id)
DIGITS = 3                                                    # as the card's tables write the scores
DATASET_NAMES = {"flickr8k": "Flickr8k", "flickr30k": "Flickr30k", "coco": "COCO"}
DECODER_TAGS = {"lstm": "show-and-tell", "attention": "show-attend-and-tell", "transformer": "transformer",
                "updown": "top-down-attention"}
FENCE = "---"


def card_metadata(checkpoint: dict, name: str) -> dict:
    """The Hub metadata of an exported checkpoint: language, licence, tags, dataset, metrics and, when it embeds dev
    scores, a model-index holding them (rounded to DIGITS)."""
    config, scores = checkpoint["config"], checkpoint.get("scores") or {}
    dataset = os.path.basename(os.path.dirname(config["data"]["captions"])) or "captions"
    metadata = {
        "language": ["en"],
        # No licence of the repository's own covers the weights; the card's "Training data and its terms" applies.
        "license": "other",
        "library_name": "pytorch",
        "pipeline_tag": "image-to-text",
        "tags": ["image-captioning", "image-to-text", dataset, config["model"]["encoder"].replace("_", "-"),
                 DECODER_TAGS.get(config["model"]["decoder"], config["model"]["decoder"])],
        "datasets": [dataset],
        "metrics": list(dict.fromkeys(hub for _, hub in METRICS)),
    }
    measured = [(ours, hub) for ours, hub in METRICS if scores.get(ours) is not None]
    if measured:
        split = split_name(config["data"]["val_split"])
        metadata["model-index"] = [{"name": name, "results": [{
            "task": {"type": "image-to-text", "name": "Image Captioning"},
            "dataset": {"type": dataset, "name": DATASET_NAMES.get(dataset, dataset), "split": split},
            "metrics": [{"type": hub, "name": ours, "value": round(float(scores[ours]), DIGITS)}
                        for ours, hub in measured]}]}]
    return metadata


def split_name(split_file: str) -> str:
    """The split the scores were measured on, as its file names it (Flickr_8k.devImages.txt: dev)."""
    name = os.path.basename(split_file or "").lower()
    return next((s for s in ("dev", "test", "val") if s in name), "validation")


def front_matter(metadata: dict) -> str:
    return f"{FENCE}\n{yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True)}{FENCE}\n"


def split_front_matter(text: str) -> tuple[dict | None, str]:
    """(the card's metadata, or None when it has no block; the card below the block)."""
    lines = text.splitlines(keepends=True)
    if not lines or lines[0].strip() != FENCE:
        return None, text
    end = next((i for i in range(1, len(lines)) if lines[i].strip() == FENCE), None)
    if end is None:
        return None, text
    return yaml.safe_load("".join(lines[1:end])) or {}, "".join(lines[end + 1:])


def with_front_matter(text: str, block: str) -> str:
    """The card with its metadata block replaced by block (or block put first, when it had none)."""
    _, body = split_front_matter(text)
    return block + ("\n" if body and not body.startswith("\n") else "") + body


def update_card(path: str, checkpoint: dict, name: str) -> None:
    """Rewrite the metadata block of the card at path from an exported checkpoint; the prose stays."""
    with open(path, encoding="utf-8") as f:         # check_card has told a missing file before anything was written
        text = f.read()
    atomic_write_text(path, with_front_matter(text, front_matter(card_metadata(checkpoint, name))))


def check_card(path: str) -> None:
    if not os.path.isfile(path):
        raise UserError(f"--card {path}: no such file; give the model card beside the file (pretrained/README.md)")
