"""Tokenizer and vocabulary.

The tokenizer is a regular expression, so it needs no downloaded data files.
Ids 0..3 are fixed: <pad> <start> <end> <unk>.
"""
import json
import re
from collections import Counter

from utils import UserError, atomic_write_text

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = [PAD, START, END, UNK]
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(text: str) -> list[str]:
    """Lower-case words and numbers; punctuation is dropped ("A man's dog." -> ["a", "man's", "dog"])."""
    return _WORD.findall(text.lower())


class Vocabulary:
    pad_id, start_id, end_id, unk_id = 0, 1, 2, 3

    def __init__(self, itos: list[str]):
        if itos[:4] != SPECIALS:
            raise UserError(f"a vocabulary must start with {SPECIALS}, got {itos[:4]}")
        self.itos = list(itos)
        self.stoi = {word: i for i, word in enumerate(self.itos)}

    @classmethod
    def build(cls, captions, min_freq: int = 1) -> "Vocabulary":
        """Words seen at least min_freq times, most frequent first (ties alphabetical, so it is deterministic)."""
        counts = Counter(word for caption in captions for word in tokenize(caption))
        words = sorted((w for w, n in counts.items() if n >= min_freq), key=lambda w: (-counts[w], w))
        return cls(SPECIALS + words)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        """<start> w1 .. wn <end> as ids; unknown words become <unk>."""
        ids = [self.stoi.get(word, self.unk_id) for word in tokenize(text)]
        return [self.start_id] + ids + [self.end_id]

    def decode(self, ids) -> str:
        """Ids to text, stopping at <end> and dropping <pad>/<start>."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i not in (self.pad_id, self.start_id):
                words.append(self.itos[i])
        return " ".join(words)

    def save(self, path: str) -> None:
        atomic_write_text(path, json.dumps({"itos": self.itos}, ensure_ascii=False, indent=0))

    @classmethod
    def load(cls, path: str) -> "Vocabulary":
        try:
            with open(path, encoding="utf-8") as f:
                return cls(json.load(f)["itos"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path}: not a vocabulary JSON ({e}); use the vocab.json that train.py wrote") from None
