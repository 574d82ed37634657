"""Tokenizer and Vocabulary: punctuation, deterministic builds, specials, encode/decode, JSON round-trips."""

from __future__ import annotations

import json
import re
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from captioner.data.fastload import fast_tokenize
from captioner.data.synthetic import SyntheticWorld
from captioner.data.vocab import Vocabulary, tokenize
from captioner.errors import DataError


@pytest.mark.parametrize("text, tokens", [
    ("A man's dog, running: FAST!", ["a", "mans", "dog", ",", "running", ":", "fast"]),
    ("  two   shapes : a small red circle , a large blue star  ",
     ["two", "shapes", ":", "a", "small", "red", "circle", ",", "a", "large", "blue", "star"]),
    ("black-and-white photo.", ["black", "and", "white", "photo"]),
    ("It\u2019s 3.5 m tall", ["its", "3", "5", "m", "tall"]),
    ("", []),
    ("?!.", []),
    ("Caf\u00e9 au lait", ["caf\u00e9", "au", "lait"]),
])
def test_tokenize(text: str, tokens: list[str]) -> None:
    assert tokenize(text) == tokens


def _tokenize_before(text: str) -> list[str]:
    """The tokenizer as it was before it became the plain regex (commit 7128327): the reference for both."""
    if text.isascii():
        table = bytearray(range(256))
        for i in range(128):
            table[i] = ord(chr(i).lower()) if chr(i).isalnum() or chr(i) in ",:" else ord(" ")
        data = text.encode("ascii").translate(bytes(table), b"'`")
        return data.replace(b",", b" , ").replace(b":", b" : ").decode("ascii").split()
    text = unicodedata.normalize("NFKC", text).lower()
    return re.findall(r"[^\W_]+|[,:]", re.sub(r"['\u2019\u2018`]", "", text))


# Captions-like text: ASCII with its punctuation and control characters, then any Unicode at all.
_ASCII_TEXT = st.text(st.characters(max_codepoint=127), max_size=60)
_ANY_TEXT = st.text(st.sampled_from("aZ9 _-,:;.'`\u2019\u2018!?\t\n\u00e9\u00c9\ufb01\u2160\u0130\u00df\uff21\u0660")
                    | st.characters(), max_size=60)


@settings(max_examples=500, deadline=None)
@given(st.one_of(_ASCII_TEXT, _ANY_TEXT))
def test_tokenize_and_the_fast_tokenizer_give_the_tokens_they_gave_before(text: str) -> None:
    """Tokens decide the vocabulary and the cached samples: the plain tokenizer and the readers' fast one
    (captioner/data/fastload.py) must give exactly the tokens the tokenizer gave before."""
    assert tokenize(text) == fast_tokenize(text) == _tokenize_before(text)


def test_build_orders_by_count_then_alphabet_and_respects_limits() -> None:
    captions = ["b a a", "c b a", "d"]  # a:3 b:2 c:1 d:1
    vocab = Vocabulary.build(captions)
    assert vocab.itos == ["<pad>", "<bos>", "<eos>", "<unk>", "a", "b", "c", "d"]
    assert (vocab.pad_id, vocab.bos_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2, 3)
    assert Vocabulary.build(captions, min_count=2).itos[4:] == ["a", "b"]
    assert len(Vocabulary.build(captions, max_size=5)) == 5
    assert Vocabulary.build(list(reversed(captions))).itos == vocab.itos  # order of input does not matter
    with pytest.raises(DataError):
        Vocabulary.build(captions, min_count=0)
    with pytest.raises(DataError):
        Vocabulary.build(captions, max_size=4)


def test_encode_decode() -> None:
    vocab = Vocabulary.build(["a dog runs", "a cat sits"])
    ids = vocab.encode("A dog sits, quietly")
    assert ids == [vocab.stoi["a"], vocab.stoi["dog"], vocab.stoi["sits"], vocab.unk_id, vocab.unk_id]
    assert vocab.decode(vocab.encode("a cat runs")) == "a cat runs"
    # decode stops at <eos> and drops every other special
    seq = [vocab.bos_id, vocab.stoi["a"], vocab.pad_id, vocab.stoi["cat"], vocab.unk_id, vocab.eos_id,
           vocab.stoi["dog"]]
    assert vocab.decode(seq) == "a cat"
    assert vocab.decode([]) == ""


def test_json_round_trip_and_refusals() -> None:
    vocab = Vocabulary.build(["a small red circle above a large blue star"])
    again = Vocabulary.from_dict(json.loads(json.dumps(vocab.to_dict())))
    assert again.itos == vocab.itos and again.stoi == vocab.stoi
    with pytest.raises(DataError):
        Vocabulary.from_dict({"tokens": ["a", "b"]})  # specials missing
    with pytest.raises(DataError):
        Vocabulary.from_dict({"words": []})
    with pytest.raises(DataError):
        Vocabulary(["a", "a"])


def test_synthetic_references_survive_encode_decode() -> None:
    scenes = SyntheticWorld(seed=3).scenes("train", 300)
    captions = [c for s in scenes for c in s.captions]
    vocab = Vocabulary.build(captions)
    assert "," in vocab and ":" in vocab
    for c in captions:
        assert vocab.decode(vocab.encode(c)) == c
        assert " ".join(tokenize(c)) == c
