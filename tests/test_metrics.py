"""Metrics: parity with pycocoevalcap's own scorers, the Java and no-Java paths, CIDEr-D, diversity, pointing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from captioner import metrics
from captioner.metrics import CiderD, diversity, pointing_game, ptb_tokenize, score_captions

HAS_JAVA = metrics.java_available()
needs_java = pytest.mark.skipif(not HAS_JAVA, reason="no working java on PATH")

# A small hand-made evaluation set: capitals, punctuation, clitics and contractions, quotes, abbreviations,
# brackets, a perfect match, an empty prediction, a one-word prediction, repeated words, and an image with a
# different number of references.
REFS = {
    "1": ["A dog runs on the beach.", "A brown dog running along the shore.", "A dog on the sand near water"],
    "2": ["Two people ride bikes (red ones).", "A man and a woman are cycling.", "People on bicycles on a road"],
    "3": ["A cat sleeps on a laptop's keyboard.", "A cat lying on a computer", "The cat is asleep, isn't it?"],
    "4": ["A red circle left of a small blue square.", "A small blue square right of a red circle"],
    "5": ["A plate of food with broccoli and rice.", "Broccoli, rice and chicken on a white plate",
          "A meal on a plate", "Food on a table"],
    "6": ["A man rides a wave on a surfboard.", "A surfer on a big wave", "Someone surfing in the ocean"],
    "11": ["Kids can't wait to play -- they're excited!", "The children don't want to stop playing.",
           "Two kids playing; they're happy..."],
    "12": ['A "Stop" sign at a U.S. intersection.', "It's a red stop sign on a pole",
           "A stop sign at 5 p.m. by the road"],
}
PREDS = {
    "1": "A dog running on the beach.",
    "2": "two people riding bikes",
    "3": "A cat sleeps on a laptop's keyboard.",  # equal to a reference
    "4": "a red red red circle",  # repeated words: CIDEr-D's clipping matters
    "5": "",  # empty caption
    "6": "surfing",  # one word: CIDEr-D counts length in bigrams
    "11": "The kids can't stop playing, they're happy!",
    "12": 'It\'s a red "STOP" sign.',
}

# The COCO toolkit's figures on the raw text above: pycocoevalcap 1.2 with its Java PTBTokenizer and the
# METEOR 1.5 jar (Java 17), recorded once with its own classes (METEOR takes ~10 s to start):
#   gts = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in REFS.items()})
#   res = PTBTokenizer().tokenize({k: [{"caption": PREDS[k]}] for k in REFS})
#   Bleu(4).compute_score(gts, res), Meteor(), Rouge(), Cider() .compute_score(gts, res)[0]
JAVA_FIGURES = {
    "BLEU-1": 0.6283499061124405,
    "BLEU-2": 0.5780662615780275,
    "BLEU-3": 0.49662037255463365,
    "BLEU-4": 0.4401112217822624,
    "METEOR": 0.3365499053655528,
    "ROUGE-L": 0.5592347565763885,
    "CIDEr-D": 1.7862488921084,
}
# Both paths run pycocoevalcap's own scorers, so on identical tokens they give the same floats; 1e-9 only
# absorbs float noise between platforms. One token tokenized differently moves the figures by far more
# (over 1e-3: the naive-tokenizer check below).
SAME_FIGURES = 1e-9


def _pycoco(gts: dict[str, list[str]], res: dict[str, list[str]]) -> dict[str, float]:
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"BLEU-{n + 1}": bleu[n] for n in range(4)}
    out["ROUGE-L"] = Rouge().compute_score(gts, res)[0]
    out["CIDEr-D"] = Cider().compute_score(gts, res)[0]
    return out


def test_python_path_on_raw_text_gives_the_java_toolkits_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    scores = score_captions(REFS, PREDS)
    assert scores.tokenizer == "ptb-python"
    # METEOR exists only as a Java jar: the no-Java path leaves it out and says so, never a stand-in figure.
    assert "METEOR" not in scores.values and any("METEOR" in n for n in scores.notes)
    assert set(scores.values) == set(JAVA_FIGURES) - {"METEOR"}
    for key, value in scores.values.items():
        assert value == pytest.approx(JAVA_FIGURES[key], abs=SAME_FIGURES), key
    # The per-image scores line up with the ids: the caption equal to a reference scores BLEU-1 = 1.
    assert scores.per_image["BLEU-1"][scores.ids.index("3")] == pytest.approx(1.0)
    assert scores.per_image["ROUGE-L"][scores.ids.index("5")] == 0.0
    # The comparison has teeth: lowercasing and splitting on spaces (no clitics, punctuation kept) misses.
    monkeypatch.setattr(metrics, "ptb_tokenize", lambda text: " ".join(text.lower().split()))
    naive = score_captions(REFS, PREDS)
    assert all(abs(naive[k] - JAVA_FIGURES[k]) > 1e-3 for k in naive.values), naive.values


def test_java_asked_but_missing_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    scores = score_captions(REFS, PREDS, java=True)
    assert scores.tokenizer == "ptb-python" and "METEOR" not in scores.values
    assert any("java" in n.lower() for n in scores.notes)


def test_java_failures_become_notes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "java_available", lambda: True)

    def broken(*args, **kwargs):
        raise OSError("java went away")

    monkeypatch.setattr(metrics, "java_ptb_tokenize", broken)
    scores = score_captions(REFS, PREDS, java=True)
    assert scores.tokenizer == "ptb-python" and "METEOR" not in scores.values
    assert any("java went away" in n for n in scores.notes)

    monkeypatch.setattr(metrics, "java_ptb_tokenize", lambda s, **kw: [ptb_tokenize(x) for x in s])
    monkeypatch.setattr(metrics, "_meteor", broken)
    scores = score_captions(REFS, PREDS, java=True)
    assert scores.tokenizer == "ptb-java" and "METEOR" not in scores.values and "CIDEr-D" in scores.values
    assert any("METEOR failed" in n for n in scores.notes)


def test_mismatched_ids_are_refused() -> None:
    with pytest.raises(ValueError, match="same image ids"):
        score_captions(REFS, {"1": "a dog"})
    with pytest.raises(ValueError, match="no reference"):
        score_captions({"1": []}, {"1": "a dog"})


@needs_java
def test_python_tokenizer_matches_java_ptb() -> None:
    captions = [c for refs in REFS.values() for c in refs] + list(PREDS.values()) + [
        "There's a cat sitting on the laptop's keyboard.", "Kids can't wait to play -- they're excited...",
        "A close-up of a 2-story building at 5 p.m. in the U.S.", '"Stop" sign at an intersection.',
        "It's 10:30, and the bus is 15 minutes late!", "the men's room ; the ladies' room", "  spaces   here  ",
        "A black-and-white photo (old) of a train [on tracks] {x}", "I'm here; you're there: we'll see?",
    ]
    java = metrics.java_ptb_tokenize(captions)
    assert [ptb_tokenize(c) for c in captions] == java
    # ... and our driver of the jar gives what pycocoevalcap's own PTBTokenizer class gives.
    theirs = PTBTokenizer().tokenize({str(i): [{"caption": c}] for i, c in enumerate(captions)})
    assert [theirs[str(i)][0] for i in range(len(captions))] == java


@needs_java
def test_java_path_matches_pycocoevalcap_and_leaves_no_files(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    package = Path(ptbtokenizer.__file__).parent.parent
    before = sorted(p.name for p in package.rglob("*") if "__pycache__" not in p.parts)
    scores = score_captions(REFS, PREDS)  # auto-detects Java
    assert scores.tokenizer == "ptb-java", scores.notes
    assert scores.notes == []
    tokenized = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in REFS.items()})
    res = PTBTokenizer().tokenize({k: [{"caption": PREDS[k]}] for k in REFS})
    for key, value in _pycoco(tokenized, res).items():
        assert scores[key] == pytest.approx(value, abs=1e-12), key
    assert set(scores.values) == set(JAVA_FIGURES)
    for key, value in JAVA_FIGURES.items():  # this Java, jar and toolkit still give the recorded figures
        assert scores[key] == pytest.approx(value, abs=SAME_FIGURES), key
    assert list(tmp_path.iterdir()) == []
    assert sorted(p.name for p in package.rglob("*") if "__pycache__" not in p.parts) == before


# ----------------------------------------------------------------------------- CIDEr-D


def test_ciderd_equals_pycocoevalcap_cider() -> None:
    # Pre-tokenized text (what pycocoevalcap scores) with df from the evaluated set itself, as Cider does.
    gts = {k: [ptb_tokenize(r) for r in v] for k, v in REFS.items()}
    gts.update({
        "7": ["a giraffe standing next to a tree", "a tall giraffe near a tree", "giraffe eating leaves"],
        "8": ["a train on the tracks", "a red train at a station", "a train pulling into a station"],
        "9": ["a bowl of fruit on a table", "apples and bananas in a bowl", "fruit in a bowl"],
        "10": ["a dog on the beach", "a dog running on a beach", "two dogs playing on the sand"],
    })
    res = {k: ptb_tokenize(v) for k, v in PREDS.items()}
    res.update({"7": "a giraffe standing next to a tree", "8": "a train at the station",
                "9": "a table", "10": "a dog a dog a dog on the beach"})
    ids = list(gts)
    mean, each = Cider().compute_score(gts, {k: [res[k]] for k in ids})
    cider = CiderD([gts[k] for k in ids])
    ours = cider.batch([res[k] for k in ids], [gts[k] for k in ids])
    assert ours.shape == (len(ids),) and ours.dtype == np.float64
    np.testing.assert_allclose(ours, each, rtol=0, atol=1e-6)
    assert ours.mean() == pytest.approx(mean, abs=1e-6)
    assert len({round(x, 6) for x in ours}) > 5  # a varied set, not all zeros
    # Cached reference vectors give the same scores the second time.
    np.testing.assert_array_equal(cider.batch([res[k] for k in ids], [gts[k] for k in ids]), ours)
    assert cider.score(res["7"], gts["7"]) == ours[ids.index("7")]


def test_ciderd_tokenizes_raw_text_and_checks_inputs() -> None:
    corpus = list(REFS.values())
    cider = CiderD(corpus)
    refs = REFS["1"]
    assert cider.score("A dog running on the beach.", refs) == cider.score("a dog running on the beach", refs)
    assert cider.score("a dog running on the beach", refs) > cider.score("a cat on a laptop", refs) >= 0.0
    assert cider.score("", refs) == 0.0
    with pytest.raises(ValueError):
        cider.batch(["a dog"], [refs, refs])
    with pytest.raises(ValueError):
        CiderD([])


def test_ciderd_cache_is_bounded() -> None:
    cider = CiderD(list(REFS.values()), cache_size=2)
    for refs in REFS.values():
        cider.score("a dog", refs)
    assert len(cider._cache) == 2


# ----------------------------------------------------------------------------- diversity


def test_diversity_counts_and_collapse() -> None:
    varied = [f"a dog number {i}" for i in range(10)]
    d = diversity(varied)
    assert d["distinct_share"] == 1.0 and not d["collapsed"]
    assert d["vocab_used"] == 3 + 10 and d["mean_length"] == 4.0 and d["most_common_share"] == 0.1

    mode = ["A dog on the beach."] * 6 + [f"a cat {i}" for i in range(4)]  # the mode takes 60%
    d = diversity(mode)
    assert d["collapsed"] and d["most_common"] == "a dog on the beach" and d["most_common_share"] == 0.6

    few = [f"caption {i % 2}" for i in range(20)]  # two distinct captions: share 0.1 < 0.2
    assert diversity(few)["collapsed"]

    assert not diversity(["a dog"] * 9)["collapsed"]  # too few captions to judge
    assert diversity(["A dog.", "a dog"])["distinct_share"] == 0.5  # case and punctuation do not count
    assert diversity([])["count"] == 0 and not diversity([])["collapsed"]


# ----------------------------------------------------------------------------- pointing game


def _peak(h: int, w: int, row: int, col: int) -> np.ndarray:
    m = np.full((h, w), 0.1 / (h * w - 1))
    m[row, col] = 0.9
    return m / m.sum()


def test_pointing_game_hits_misses_and_chance() -> None:
    # 4x4 grid on a 400x200 image: cells are 100x50 px, cell (r, c) has its centre at (100c+50, 50r+25).
    maps = np.stack([_peak(4, 4, 0, 0), _peak(4, 4, 3, 3), _peak(4, 4, 1, 2), _peak(4, 4, 2, 1)])
    boxes = [
        (0, 0, 100, 100),  # centre (50, 25) inside: hit
        (300, 0, 400, 100),  # peak at (350, 175) below the box: miss
        None,  # not an object word: not counted
        (150, 125, 151, 126),  # centre (150, 125): x0 <= x < x1 and y0 <= y < y1, a 1x1 box: hit
    ]
    result = pointing_game(maps, boxes, (400, 200))
    assert (result.hits, result.total) == (2, 3)
    assert result.hit_rate == pytest.approx(2 / 3)
    assert result.chances == pytest.approx([100 * 100 / 80000, 100 * 100 / 80000, 1 / 80000])
    assert result.chance == pytest.approx(sum(result.chances) / 3)


def test_pointing_game_edges() -> None:
    # The centre of the peak cell on the box's exclusive right edge is a miss; boxes are clipped for chance.
    maps = [_peak(2, 2, 0, 1)]  # centre (75, 25) on a 100x100 image
    assert pointing_game(maps, [(0, 0, 75, 50)], (100, 100)).hits == 0
    assert pointing_game(maps, [(0, 0, 76, 50)], (100, 100)).hits == 1
    assert pointing_game(maps, [(-50, -50, 150, 150)], (100, 100)).chances == [1.0]
    # Ties go to the first cell in row-major order.
    assert pointing_game([np.full((2, 2), 0.25)], [(0, 0, 50, 50)], (100, 100)).hits == 1
    empty = pointing_game(maps, [None], (100, 100))
    assert (empty.hits, empty.total, empty.hit_rate, empty.chance) == (0, 0, 0.0, 0.0)
    with pytest.raises(ValueError, match="one per word"):
        pointing_game(maps, [None, None], (100, 100))



def test_exact_match_compares_words_not_case_or_punctuation() -> None:
    from captioner.metrics import exact_match

    refs = {"a": ["A squirrel.", "a grey squirrel"], "b": ["Two wild boars."], "c": ["a frog"]}
    assert exact_match({"a": "a squirrel", "b": "two wild boars", "c": "a toad"}, refs) == pytest.approx(2 / 3)
    assert exact_match({"a": "squirrel"}, refs) == 0.0
    assert exact_match({}, refs) == 0.0
