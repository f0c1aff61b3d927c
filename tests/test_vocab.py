import pytest

from data.text.vocab import SPECIALS, Vocabulary, tokenize


def test_tokenize_needs_no_data_files_and_drops_punctuation():
    assert tokenize("A man's dog, running!  Fast.") == ["a", "man's", "dog", "running", "fast"]
    assert tokenize("Two 2-year-old kids") == ["two", "2", "year", "old", "kids"]
    assert tokenize("   ") == []


def test_build_threshold_and_specials():
    vocab = Vocabulary.build(["a dog runs", "a dog sits", "a cat"], min_freq=2)
    assert vocab.itos[:4] == SPECIALS
    assert vocab.itos[4:] == ["a", "dog"]          # most frequent first; "runs", "sits", "cat" are below 2
    assert vocab.encode("A cat") == [vocab.start_id, vocab.stoi["a"], vocab.unk_id, vocab.end_id]


def test_decode_stops_at_end_and_skips_pad_start():
    vocab = Vocabulary.build(["a dog runs"])
    ids = vocab.encode("a dog runs") + [vocab.pad_id, vocab.stoi["dog"]]
    assert vocab.decode(ids) == "a dog runs"


def test_save_load_roundtrip(tmp_path):
    vocab = Vocabulary.build(["a dog runs", "the cat sleeps"])
    vocab.save(str(tmp_path / "vocab.json"))
    assert Vocabulary.load(str(tmp_path / "vocab.json")).itos == vocab.itos


def test_load_rejects_garbage(tmp_path):
    (tmp_path / "v.json").write_text("not json")
    with pytest.raises(ValueError, match="not a vocabulary"):
        Vocabulary.load(str(tmp_path / "v.json"))
    with pytest.raises(ValueError, match="must start with"):
        Vocabulary(["a", "b", "c", "d"])
