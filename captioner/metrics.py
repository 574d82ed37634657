"""Caption metrics: BLEU, METEOR, ROUGE-L and CIDEr-D through pycocoevalcap, a fast CIDEr-D for SCST
rewards, caption diversity (mode collapse), and the pointing game for attention grounding.

The corpus metrics are pycocoevalcap's own scorers, so numbers compare with published ones. With Java the
text goes through the same Stanford PTBTokenizer jar the COCO toolkit uses, and METEOR is added; without
Java a pure-Python tokenizer that reproduces PTBTokenizer's output on ordinary captions takes its place and
METEOR is left out. Which tokenizer ran, and why anything was skipped, is returned, never printed.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import shutil
import subprocess
import tempfile
import threading
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pycocoevalcap.tokenizer import ptbtokenizer

# ----------------------------------------------------------------------------- tokenizers

# PTBTokenizer's tokens that the COCO toolkit drops after tokenizing: pycocoevalcap's own list. Its "-LRB-"
# etc. never match, since the tokenizer runs with -lowerCase and brackets come out as "-lrb-"; we reproduce
# that rather than fix it, so both tokenizers give the same text.
PTB_PUNCTUATION = frozenset(ptbtokenizer.PUNCTUATIONS)
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_CLITIC = re.compile(r"^(.*[a-z0-9])(n't|'s|'re|'ll|'d|'ve|'m)$")
_ABBREVIATION = re.compile(r"^(?:[a-z]\.){2,}$")  # u.s. p.m. keep their dots, as in PTB
# Characters PTB splits off the edges of a word. Inside a word (e-mail, 3.5, 10,000, o'clock) they stay.
_EDGE = set(".,;:!?'`$%&*+=<>|~^")
_MULTI = ("...", "--")
_PLAIN = re.compile(r"[a-z0-9 ]*")
_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "wanna": ("wan", "na"), "gotta": ("got", "ta")}
_CLITICS = frozenset(["n't", "'s", "'re", "'ll", "'d", "'ve", "'m"])


def ptb_tokenize(text: str) -> str:
    """Lowercase and tokenize one caption as Stanford PTBTokenizer + pycocoevalcap would, without Java.

    Matches the Java tokenizer on ordinary captions (tested): clitics split ("dog's" -> "dog 's",
    "can't" -> "ca n't"), brackets become -lrb- etc., edge punctuation is split off and then dropped with
    pycocoevalcap's punctuation list; hyphenated words, numbers and abbreviations stay whole. Rarer
    constructs (quotes inside words, symbols between letters, non-ASCII punctuation) may differ.
    """
    text = text.lower()
    if _PLAIN.fullmatch(text):  # already plain words (decoded captions, SCST samples): nothing to split
        return " ".join(text.split())
    tokens: list[str] = []
    for chunk in text.replace('"', " ").split():
        tokens.extend(_split_chunk(chunk))
    return " ".join(t for t in tokens if t not in PTB_PUNCTUATION)


def _split_chunk(chunk: str) -> list[str]:
    if chunk in _CLITICS:  # already split off ("dog 's"): keep, so tokenizing twice changes nothing
        return [chunk]
    # Brackets are always their own token.
    if any(c in _BRACKETS for c in chunk):
        out: list[str] = []
        for part in re.split(r"([()\[\]{}])", chunk):
            if part in _BRACKETS:
                out.append(_BRACKETS[part])
            elif part:
                out.extend(_split_chunk(part))
        return out
    head: list[str] = []
    tail: list[str] = []
    while chunk:
        multi = next((m for m in _MULTI if chunk.startswith(m)), None)
        if multi:
            head.append(multi)
            chunk = chunk[len(multi):]
        elif chunk[0] in _EDGE:
            head.append(chunk[0])
            chunk = chunk[1:]
        else:
            break
    while chunk and not _ABBREVIATION.match(chunk):
        multi = next((m for m in _MULTI if chunk.endswith(m)), None)
        if multi:
            tail.insert(0, multi)
            chunk = chunk[: -len(multi)]
        elif chunk[-1] in _EDGE:
            tail.insert(0, chunk[-1])
            chunk = chunk[:-1]
        else:
            break
    middle: list[str] = []
    if chunk in _SPLIT_WORDS:
        middle = list(_SPLIT_WORDS[chunk])
    elif chunk:
        m = _CLITIC.match(chunk)
        middle = [m.group(1), m.group(2)] if m else [chunk]
    return head + middle + tail


@functools.lru_cache(maxsize=1)
def java_available() -> bool:
    """True when a `java` that starts is on PATH (checked once per process)."""
    java = shutil.which("java")
    if java is None:
        return False
    try:
        return subprocess.run([java, "-version"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def java_ptb_tokenize(sentences: Sequence[str], *, timeout: float = 600.0) -> list[str]:
    """Tokenize with pycocoevalcap's Stanford PTBTokenizer jar exactly as its PTBTokenizer class does.

    We drive the jar ourselves rather than call the class because the class writes its temporary file into
    the installed package (read-only in some installs; left behind if killed) and lets Java's progress line
    through to our stderr. Here the file lives in a private temporary folder and stderr is captured.
    """
    jar = Path(ptbtokenizer.__file__).parent / ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR
    # One sentence per line: fold every kind of whitespace (newlines, U+2028, ...) into single spaces.
    lines = [" ".join(s.split()) for s in sentences]
    with tempfile.TemporaryDirectory(prefix="captioner-ptb-") as tmp:
        src = Path(tmp) / "sentences.txt"
        src.write_text("\n".join(lines), encoding="utf-8")
        cmd = ["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase",
               str(src)]
        done = subprocess.run(cmd, cwd=tmp, capture_output=True, timeout=timeout)
    if done.returncode != 0:
        stderr = done.stderr.decode(errors="replace").strip()[-300:]
        raise RuntimeError(f"PTBTokenizer exited with {done.returncode}: {stderr}")
    out = done.stdout.decode("utf-8").split("\n")
    if any(out[len(lines):]):
        raise RuntimeError(f"PTBTokenizer returned {len(out)} lines for {len(lines)} sentences")
    # The jar may drop trailing empty lines; those sentences were empty anyway.
    out += [""] * (len(lines) - len(out))
    return [" ".join(w for w in line.rstrip().split(" ") if w and w not in PTB_PUNCTUATION)
            for line in out[:len(lines)]]


# ----------------------------------------------------------------------------- corpus metrics


@dataclass
class Scores:
    """Corpus metric values plus how they were computed."""

    values: dict[str, float]  # "BLEU-1".."BLEU-4", "METEOR" (Java only), "ROUGE-L", "CIDEr-D"
    tokenizer: str  # "ptb-java" (Stanford jar) or "ptb-python" (ptb_tokenize)
    notes: list[str] = field(default_factory=list)  # why something was skipped or fell back
    per_image: dict[str, list[float]] = field(default_factory=dict)  # metric -> scores in the order of `ids`
    ids: list[str] = field(default_factory=list)

    def __getitem__(self, key: str) -> float:
        return self.values[key]


def score_captions(references: dict[str, list[str]], predictions: dict[str, str], *,
                   java: bool | None = None, meteor_timeout: float = 600.0) -> Scores:
    """BLEU-1..4, METEOR (with Java), ROUGE-L and CIDEr-D of `predictions` against `references`.

    Both dicts are keyed by image id and must hold the same ids. `java=None` uses Java when it is found.
    CIDEr-D's document frequencies come from these references, as in the COCO toolkit, so it needs more
    than one image to mean anything (with one image it is 0 by construction).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    _check_inputs(references, predictions)
    ids = list(predictions)
    notes: list[str] = []
    use_java = java_available() if java is None else java
    if use_java and java is not None and not java_available():
        notes.append("Java was asked for but no working `java` is on PATH: used the Python PTB tokenizer")
        use_java = False

    tokenizer = "ptb-python"
    if use_java:
        try:
            flat = [predictions[i] for i in ids] + [r for i in ids for r in references[i]]
            tokens = java_ptb_tokenize(flat)
            tokenizer = "ptb-java"
        except (OSError, subprocess.SubprocessError, RuntimeError, UnicodeDecodeError) as err:
            notes.append(f"Java PTBTokenizer failed ({_short(err)}): used the Python PTB tokenizer")
            use_java = False
    if tokenizer == "ptb-java":
        res = {i: [tokens[k]] for k, i in enumerate(ids)}
        gts: dict[str, list[str]] = {}
        k = len(ids)
        for i in ids:
            gts[i] = tokens[k:k + len(references[i])]
            k += len(references[i])
    else:
        res = {i: [ptb_tokenize(predictions[i])] for i in ids}
        gts = {i: [ptb_tokenize(r) for r in references[i]] for i in ids}

    values: dict[str, float] = {}
    per_image: dict[str, list[float]] = {}
    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        values[f"BLEU-{n + 1}"] = float(bleu[n])
        per_image[f"BLEU-{n + 1}"] = [float(x) for x in bleu_each[n]]
    if use_java:
        try:
            meteor, meteor_each = _meteor(gts, res, timeout=meteor_timeout)
            values["METEOR"] = meteor
            per_image["METEOR"] = meteor_each
        except Exception as err:  # METEOR is optional: whatever goes wrong with it becomes a note
            notes.append(f"METEOR failed ({_short(err)}): left out")
    else:
        notes.append("METEOR left out: it needs Java")
    rouge, rouge_each = Rouge().compute_score(gts, res)
    values["ROUGE-L"] = float(rouge)
    per_image["ROUGE-L"] = [float(x) for x in rouge_each]
    cider, cider_each = Cider().compute_score(gts, res)
    values["CIDEr-D"] = float(cider)
    per_image["CIDEr-D"] = [float(x) for x in cider_each]
    if len(ids) == 1:
        notes.append("CIDEr-D is 0 for a single image: its document frequencies come from the references")
    return Scores(values, tokenizer, notes, per_image, ids)


def _check_inputs(references: dict[str, list[str]], predictions: dict[str, str]) -> None:
    if not predictions:
        raise ValueError("no predictions to score")
    missing = [k for k in predictions if k not in references]
    extra = [k for k in references if k not in predictions]
    if missing or extra:
        raise ValueError(f"references and predictions must have the same image ids: {len(missing)} predictions "
                         f"without references (first: {missing[:3]}), {len(extra)} references without a "
                         f"prediction (first: {extra[:3]})")
    empty = [k for k, refs in references.items() if not refs]
    if empty:
        raise ValueError(f"{len(empty)} images have no reference captions (first: {empty[:3]})")


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text[:200]}" if text else type(err).__name__


def _meteor(gts: dict[str, list[str]], res: dict[str, list[str]], *, timeout: float) -> tuple[float, list[float]]:
    """pycocoevalcap's METEOR, with its Java process always ended and a watchdog against hangs."""
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()  # starts `java -jar meteor-1.5.jar` with its cwd in the package, not ours
    process = scorer.meteor_p
    watchdog = threading.Timer(timeout, process.kill)  # a killed process makes the blocked read fail
    watchdog.start()
    try:
        score, each = scorer.compute_score(gts, res)
        return float(score), [float(x) for x in each]
    finally:
        watchdog.cancel()
        # compute_score holds its lock while it talks to Java; if that failed the lock is still held and
        # Meteor.__del__ (which takes it) would hang at garbage collection.
        if scorer.lock.locked():
            scorer.lock.release()
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        process.kill()
        process.wait()


# ----------------------------------------------------------------------------- CIDEr-D for rewards


def _ngrams(words: Sequence[str], n: int) -> Counter:
    # Every k-gram for k = 1..n as a tuple of words, counted (zip of shifted lists: one tuple per position).
    grams: list[tuple[str, ...]] = []
    for k in range(1, n + 1):
        grams.extend(zip(*(words[i:] for i in range(k)), strict=False))  # shorter shifts end first
    return Counter(grams)


class CiderD:
    """CIDEr-D with document frequencies fixed once from a corpus of reference sets (SCST rewards, validation).

    Same formula as pycocoevalcap's CiderScorer (its "CIDEr" is CIDEr-D): tf-idf vectors of 1..4-grams,
    idf = log(#reference sets) - log(max(1, df)); per n the candidate's weights are clipped by the
    reference's (min(c, r) * r) before the cosine; a Gaussian length penalty with sigma 6 on the difference
    of lengths (counted, like pycocoevalcap, as numbers of bigrams); mean over n, mean over references, x10.
    Text goes through `ptb_tokenize`, which leaves already tokenized text unchanged. Reference vectors are
    cached per reference set (LRU of `cache_size` sets, about 25 kB each for 5 references): SCST scores each
    image's references for all its samples in a batch, and again every epoch when the training set fits.
    """

    def __init__(self, corpus_refs: Sequence[Sequence[str]], *, n: int = 4, sigma: float = 6.0,
                 cache_size: int = 10_000) -> None:
        if not corpus_refs:
            raise ValueError("CiderD needs at least one reference set to compute document frequencies")
        self.n = n
        self.sigma = sigma
        self.cache_size = cache_size
        df: Counter = Counter()
        for refs in corpus_refs:
            seen: set = set()
            for ref in refs:
                seen.update(_ngrams(ptb_tokenize(ref).split(), n))
            df.update(seen)
        self.ref_len = math.log(float(len(corpus_refs)))  # log of the corpus size, the idf numerator
        # idf of every n-gram seen in the corpus; an unseen one has df 0 -> max(1, 0) -> idf = ref_len.
        self.idf = {g: self.ref_len - math.log(max(1.0, c)) for g, c in df.items()}
        self._cache: OrderedDict[tuple[str, ...], list] = OrderedDict()

    def _vector(self, words: list[str]) -> tuple[dict, list[float], int]:
        # tf-idf weights keyed by n-gram (its length tells the order), per-order norms, and the length as
        # pycocoevalcap counts it: bigrams (words - 1), which differs from words only for empty texts.
        idf, ref_len = self.idf, self.ref_len
        vec = {g: tf * idf.get(g, ref_len) for g, tf in _ngrams(words, self.n).items()}
        sq = [0.0] * self.n
        for g, w in vec.items():
            sq[len(g) - 1] += w * w
        return vec, [math.sqrt(s) for s in sq], max(len(words) - 1, 0)

    def _refs(self, refs: Sequence[str]) -> list:
        key = tuple(refs)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        vectors = [self._vector(ptb_tokenize(r).split()) for r in refs]
        self._cache[key] = vectors
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return vectors

    def score(self, candidate: str, refs: Sequence[str]) -> float:
        """CIDEr-D of one candidate caption against its image's references."""
        if not refs:
            raise ValueError("CiderD.score needs at least one reference")
        vec, norm, length = self._vector(ptb_tokenize(candidate).split())
        penalty_scale = 2.0 * self.sigma ** 2
        total = 0.0
        for ref_vec, ref_norm, ref_length in self._refs(refs):
            val = [0.0] * self.n
            # In the candidate's own order (not a set intersection, whose order follows string hashes and
            # changes per process): rewards stay bit-identical between runs.
            for g, w in vec.items():
                r = ref_vec.get(g)
                if r is not None:  # an n-gram the reference lacks adds nothing
                    val[len(g) - 1] += min(w, r) * r
            penalty = math.exp(-((length - ref_length) ** 2) / penalty_scale)
            for k in range(self.n):
                if norm[k] != 0 and ref_norm[k] != 0:
                    total += val[k] / (norm[k] * ref_norm[k]) * penalty
        return total / self.n / len(refs) * 10.0

    def batch(self, candidates: Sequence[str], refs_list: Sequence[Sequence[str]]) -> np.ndarray:
        """CIDEr-D of each candidate against its own references: (len(candidates),) float64."""
        if len(candidates) != len(refs_list):
            raise ValueError(f"{len(candidates)} candidates but {len(refs_list)} reference sets")
        return np.array([self.score(c, r) for c, r in zip(candidates, refs_list, strict=True)], dtype=np.float64)


# ----------------------------------------------------------------------------- diversity


# A caption set counts as collapsed when, with at least COLLAPSE_MIN_CAPTIONS captions, fewer than
# COLLAPSE_DISTINCT of them are distinct or one caption takes more than COLLAPSE_MODE of them: the signs
# of a decoder that writes the same safe sentence whatever the image.
COLLAPSE_MIN_CAPTIONS = 10
COLLAPSE_DISTINCT = 0.2
COLLAPSE_MODE = 0.5


def diversity(captions: Sequence[str]) -> dict[str, float | int | str | bool]:
    """How varied a set of generated captions is, and whether it looks collapsed (rule above).

    Captions are compared after `ptb_tokenize`, so case and punctuation do not make two captions differ.
    Keys: count, distinct_share, vocab_used, mean_length (words), most_common, most_common_share, collapsed.
    """
    tokenized = [ptb_tokenize(c) for c in captions]
    count = len(tokenized)
    if count == 0:
        return {"count": 0, "distinct_share": 0.0, "vocab_used": 0, "mean_length": 0.0, "most_common": "",
                "most_common_share": 0.0, "collapsed": False}
    counts = Counter(tokenized)
    top, top_count = counts.most_common(1)[0]
    distinct_share = len(counts) / count
    top_share = top_count / count
    collapsed = count >= COLLAPSE_MIN_CAPTIONS and (distinct_share < COLLAPSE_DISTINCT or top_share > COLLAPSE_MODE)
    return {
        "count": count,
        "distinct_share": distinct_share,
        "vocab_used": len({w for t in tokenized for w in t.split()}),
        "mean_length": sum(len(t.split()) for t in tokenized) / count,
        "most_common": top,
        "most_common_share": top_share,
        "collapsed": collapsed,
    }


def exact_match(predictions: dict[str, str], references: dict[str, list[str]]) -> float:
    """Share of images whose caption equals one of their references word for word (after `ptb_tokenize`).

    The strictest reading of a caption: on data where many images share a caption it says how often the
    model names the thing exactly, which n-gram scores blur.
    """
    if not predictions:
        return 0.0
    hits = sum(ptb_tokenize(text) in {ptb_tokenize(r) for r in references[key]} for key, text in predictions.items())
    return hits / len(predictions)


# ----------------------------------------------------------------------------- pointing game


@dataclass
class PointingResult:
    """Pointing game over the words of captions that name an object with a known box."""

    hits: int  # words whose attention peak lies in their object's box
    total: int  # words with a box
    chances: list[float] = field(default_factory=list)  # per counted word: box area / image area

    @property
    def hit_rate(self) -> float:
        """Share of counted words that hit (0 when none was counted)."""
        return self.hits / self.total if self.total else 0.0

    @property
    def chance(self) -> float:
        """Mean box area share: the hit rate of a peak placed uniformly at random over the image."""
        return sum(self.chances) / len(self.chances) if self.chances else 0.0


Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) in pixels, x1 and y1 exclusive


def pointing_game(maps: np.ndarray | Sequence[np.ndarray], word_boxes: Sequence[Box | None],
                  image_size: tuple[int, int]) -> PointingResult:
    """Count the words whose attention map peaks inside the box of the object they describe.

    maps: one (h, w) attention map per word over the encoder grid, covering the whole image.
    word_boxes: per word an (x0, y0, x1, y1) box in image pixels (x1, y1 exclusive) or None (not counted).
    image_size: (width, height) in pixels.
    The peak is the map's largest cell (the first in row-major order on ties); it hits when the cell's
    centre, mapped to pixels ((col + 0.5) * width / w, (row + 0.5) * height / h), lies in [x0, x1) x [y0, y1).
    Boxes are clipped to the image for the chance rate (box area / image area).
    """
    if len(maps) != len(word_boxes):
        raise ValueError(f"{len(maps)} attention maps but {len(word_boxes)} word boxes; need one per word")
    width, height = image_size
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {image_size}")
    hits = 0
    chances: list[float] = []
    for attention, box in zip(maps, word_boxes, strict=True):
        if box is None:
            continue
        grid = np.asarray(attention, dtype=np.float64)
        if grid.ndim != 2:
            raise ValueError(f"each attention map must be (h, w), got shape {grid.shape}")
        h, w = grid.shape
        row, col = divmod(int(np.argmax(grid)), w)
        x, y = (col + 0.5) * width / w, (row + 0.5) * height / h
        x0, y0, x1, y1 = box
        hits += int(x0 <= x < x1 and y0 <= y < y1)
        area = max(0.0, min(x1, width) - max(x0, 0)) * max(0.0, min(y1, height) - max(y0, 0))
        chances.append(area / (width * height))
    return PointingResult(hits, len(chances), chances)
