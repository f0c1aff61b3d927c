"""Karpathy's split JSON, the field's standard form of Flickr8k, Flickr30k and COCO.

    {"images": [{"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg", "split": "test",
                 "sentences": [{"raw": "A man riding a bike.", ...}, ...], ...}, ...], "dataset": "coco"}

An image's name is `filepath/filename` (COCO) or `filename` (Flickr), relative to data.images.
Splits are train, val, test and restval; a config names one or several joined by `+`.
"""
import functools
import json
import os

from utils import UserError

# The splits a run trains and validates on, and evaluate.py scores, where none is named
DEFAULT_SPLITS = {"train": "train+restval", "val": "val", "test": "test"}


def is_karpathy(path: str) -> bool:
    return path.lower().endswith(".json")


def read(path: str) -> tuple[list, dict[str, list[str]]]:
    """(rows, splits): rows (where, image name, caption) in file order, for data.text.captions.collect; splits:
    split name -> image names in file order. UserError names the entry that is wrong."""
    try:
        stamp = os.stat(path)
    except OSError as e:
        raise UserError(f"{path}: cannot read the captions file ({e.strerror}); check data.captions") from None
    return _read(path, stamp.st_mtime_ns, stamp.st_size)


@functools.lru_cache(maxsize=2)   # COCO's file takes seconds to parse, and train.py and evaluate.py ask twice
def _read(path: str, mtime_ns: int, size: int):
    try:
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8; re-save the file as UTF-8") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                        f"use Karpathy's dataset_*.json as published") from None
    images = document.get("images") if isinstance(document, dict) else None
    if not isinstance(images, list):
        raise UserError(f"{path}: no 'images' list at the top; a Karpathy split file looks like "
                        f'{{"images": [{{"filename": ..., "split": ..., "sentences": [{{"raw": ...}}]}}]}}')
    rows, splits = [], {}
    for i, entry in enumerate(images):
        where = f"images[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str) or not entry["filename"]:
            raise UserError(f"{path}: {where} has no 'filename'; every image needs one")
        name = "/".join(p for p in (entry.get("filepath") or "", entry["filename"]) if p)
        sentences = entry.get("sentences")
        if not isinstance(sentences, list) or not sentences:
            raise UserError(f"{path}: {where} ({name}) has no 'sentences'; every image needs its captions")
        for j, sentence in enumerate(sentences):
            raw = sentence.get("raw") if isinstance(sentence, dict) else None
            if not isinstance(raw, str):
                raise UserError(f"{path}: {where}.sentences[{j}] ({name}) has no 'raw' caption text")
            rows.append((f"{where}.sentences[{j}]", name, raw))
        splits.setdefault(str(entry.get("split", "")), []).append(name)
    if not rows:
        raise UserError(f"{path}: the 'images' list is empty")
    return rows, splits


def split_names(splits: dict[str, list[str]], spec: str, path: str) -> list[str]:
    """Image names of `spec`, split names joined by '+' ("train+restval"), in file order and without repeats.
    restval, which only COCO's file has, is left out where a file has none, so the default fits all three."""
    names = []
    for part in (p.strip() for p in spec.split("+")):
        if part == "restval" and part not in splits:
            continue
        if part not in splits:
            known = ", ".join(sorted(s for s in splits if s)) or "none"
            raise UserError(f"{path}: no split named {part!r}; its splits are {known}")
        names += splits[part]
    return list(dict.fromkeys(names))
