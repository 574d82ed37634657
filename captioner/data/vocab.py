"""The tokenizer and the Vocabulary: the one place where text becomes token ids and back.

Tokenizing follows Karpathy's caption preprocessing (lower-case, punctuation removed, split on
whitespace) with one exception: "," and ":" stay as tokens of their own. The synthetic world's
captions use them as list separators ("three shapes : a ... , a ... and a ..."), and keeping them
makes every reference survive `decode(encode(caption)) == caption` exactly.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from itertools import chain
from operator import attrgetter
from pathlib import Path
from typing import Any

from captioner.errors import DataError

# Apostrophes join ("man's" -> "mans", as Karpathy's preprocessing does); any other punctuation splits words.
_APOSTROPHES = re.compile(r"['\u2019\u2018`]")
_TOKEN = re.compile(r"[^\W_]+|[,:]")  # runs of letters/digits (any script), or a kept separator


def tokenize(text: str) -> list[str]:
    """Lower-cased words (letters and digits) plus "," and ":" as tokens; all other punctuation dropped."""
    text = unicodedata.normalize("NFKC", text).lower()
    return _TOKEN.findall(_APOSTROPHES.sub("", text))


class CaptionText(str):
    """A caption's text that carries its tokens, so building the vocabulary and encoding do not tokenise it again.

    It is the text itself wherever a string is expected (references, reports, JSON); make one with
    `CaptionText.of`. A string derived from it (sliced, joined) is a plain str again, tokenised when used.
    """

    __slots__ = ("normal",)
    normal: str  # its tokens joined by single spaces: one string, not a list of them, to keep a data set small

    @classmethod
    def of(cls, text: str, normal: str | None = None) -> CaptionText:
        """The text with its tokens: `normal` when the caller knows them already (" ".join(tokenize(text)))."""
        caption = cls(text)
        caption.normal = " ".join(tokenize(text)) if normal is None else normal
        return caption

    @property
    def words(self) -> list[str]:
        """tokenize(self)."""
        return self.normal.split()


def tokens_of(text: str) -> list[str]:
    """tokenize(text), read from a CaptionText instead of computed again."""
    return text.normal.split() if type(text) is CaptionText else tokenize(text)


def token_count(text: str) -> int:
    """len(tokenize(text)), counted without splitting a CaptionText's tokens apart."""
    if type(text) is CaptionText:
        return text.normal.count(" ") + 1 if text.normal else 0
    return len(tokenize(text))


# Counting a data set's words costs ~1 s at COCO's size (6M words), so the counts of a large list of Captions
# are remembered on disk, named by a hash of the list's tokens: the same captions give the same counts, and
# any change to them (a caption, its tokens, one image skipped) names another file. See count_tokens.
COUNTS_MIN_CAPTIONS = 50_000  # fewer are counted in a fraction of a second: no cache file for them
COUNTS_VERSION = 1  # bump when what is stored changes


def count_tokens(captions: Iterable[str], *, cache: bool | Path = True) -> Counter[str]:
    """How often each token occurs in the captions (tokenize's tokens).

    A list of at least COUNTS_MIN_CAPTIONS Captions (their tokens known already) has its counts remembered:
    `cache` True keeps them in the user's cache directory (beside the scan cache), a Path in that folder,
    False nowhere. Like every cache here it is only a hint: a file that cannot be read or parsed is counted
    again and replaced.
    """
    captions = captions if isinstance(captions, (list, tuple)) else list(captions)
    if cache is False or len(captions) < COUNTS_MIN_CAPTIONS or set(map(type, captions)) != {CaptionText}:
        return Counter(chain.from_iterable(map(tokens_of, captions)))
    # Every caption's tokens, one caption a line: its hash names the counts. Splitting it on whitespace gives
    # the tokens of every caption in turn (a CaptionText's tokens are its `normal` split on whitespace).
    text = "\n".join(map(attrgetter("normal"), captions))
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    # Here, not at the top: the scan module brings Pillow and torch (through images), which tokenising needs not.
    from captioner.data.scan import default_cache_dir, replace_json

    folder = default_cache_dir().parent / "vocab" if cache is True else Path(cache)
    file = folder / f"{digest}.json"
    counts = _read_counts(file, len(captions))
    if counts is None:
        counts = Counter(text.split())
        replace_json(file, {"version": COUNTS_VERSION, "captions": len(captions), "counts": counts})
    return counts


def _read_counts(file: Path, captions: int) -> Counter[str] | None:
    """The remembered counts of `captions` captions, or None when the file is absent, unreadable or malformed."""
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("version") != COUNTS_VERSION or data.get("captions") != captions:
        return None
    counts = data.get("counts")
    if not isinstance(counts, dict) or not all(type(n) is int and n > 0 for n in counts.values()):
        return None
    return Counter(counts)


class Vocabulary:
    """Token <-> id mapping with named specials; <pad> is always id 0 so embeddings can zero it."""

    PAD = "<pad>"
    BOS = "<bos>"
    EOS = "<eos>"
    UNK = "<unk>"
    SPECIALS = (PAD, BOS, EOS, UNK)

    def __init__(self, words: Sequence[str]) -> None:
        words = list(words)
        clash = [w for w in words if w in self.SPECIALS]
        if clash:
            raise DataError(f"vocabulary words may not be special tokens: {clash}")
        if len(set(words)) != len(words):
            raise DataError("vocabulary words must be distinct")
        self.itos: list[str] = [*self.SPECIALS, *words]
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        self._specials = {self.stoi[s] for s in self.SPECIALS}

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 1, max_size: int | None = None, *,
              cache: bool | Path = True) -> Vocabulary:
        """Words seen at least `min_count` times, most frequent first (ties alphabetical, so builds repeat).

        `max_size` caps the total size including the four specials; rarer words fall to <unk>. The counts of
        a large list of Captions are remembered between starts (`cache`: see count_tokens).
        """
        if min_count < 1:
            raise DataError(f"min_count must be >= 1, got {min_count}")
        if max_size is not None and max_size <= len(cls.SPECIALS):
            raise DataError(f"max_size must exceed the {len(cls.SPECIALS)} special tokens, got {max_size}")
        counts = count_tokens(captions, cache=cache)
        words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        if max_size is not None:
            words = words[: max_size - len(cls.SPECIALS)]
        return cls(words)

    @property
    def pad_id(self) -> int:
        """Id of <pad> (always 0)."""
        return self.stoi[self.PAD]

    @property
    def bos_id(self) -> int:
        """Id of <bos>, the first decoder input."""
        return self.stoi[self.BOS]

    @property
    def eos_id(self) -> int:
        """Id of <eos>, the token that ends a caption."""
        return self.stoi[self.EOS]

    @property
    def unk_id(self) -> int:
        """Id of <unk>, which stands for every word outside the vocabulary."""
        return self.stoi[self.UNK]

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, word: object) -> bool:
        return word in self.stoi

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without specials; unknown words become <unk>."""
        get, unk = self.stoi.get, self.stoi[self.UNK]
        return [get(tok, unk) for tok in tokens_of(text)]

    def decode(self, ids: Iterable[int]) -> str:
        """Words joined by spaces, stopping at <eos> and dropping the other specials."""
        words = []
        eos = self.eos_id
        for i in ids:
            i = int(i)
            if i == eos:
                break
            if i in self._specials or not 0 <= i < len(self.itos):
                continue
            words.append(self.itos[i])
        return " ".join(words)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: the full token list in id order (specials first)."""
        return {"tokens": list(self.itos)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Vocabulary:
        """Rebuild from `to_dict` output, refusing a list whose specials are not where ids expect them."""
        tokens = data.get("tokens") if isinstance(data, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise DataError("vocabulary: expected {\"tokens\": [str, ...]}")
        if tuple(tokens[: len(cls.SPECIALS)]) != cls.SPECIALS:
            raise DataError(f"vocabulary: the first tokens must be {list(cls.SPECIALS)}, got {tokens[:4]}")
        return cls(tokens[len(cls.SPECIALS):])

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} tokens)"


class EncodedCaptions:
    """Groups of captions (one group per image) as token ids, at most `max_len` each, encoded when asked for.

    Encoding a data set's hundreds of thousands of captions up front would hold up the start of training
    for seconds; an item needs a handful, in microseconds. The group asked for last is kept, as an item
    reads its group more than once.
    """

    def __init__(self, groups: Sequence[Sequence[str]], vocab: Vocabulary, max_len: int) -> None:
        self.groups, self.vocab, self.max_len = groups, vocab, max_len
        self._last: tuple[int | None, list[list[int]]] = (None, [])

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> list[list[int]]:
        """Group `index`'s captions as token ids."""
        if self._last[0] != index:
            self._last = (index, [self.vocab.encode(c)[: self.max_len] for c in self.groups[index]])
        return self._last[1]
