"""Decode a split and score it: caption metrics, diversity, and on the synthetic world accuracy and grounding.

Used by validation during training, by `captioner evaluate`, and by SCST's validation, so every number
the project reports comes from this one function.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from captioner.api import Captioner
from captioner.checkpoint import write_json
from captioner.data.images import to_tensor_batch
from captioner.data.sources import SampleList, load_samples, sample_image, split_or_whole
from captioner.decoding import Caption, DecodeSettings, decode_batch
from captioner.errors import DataError

if TYPE_CHECKING:
    from captioner.data.images import Preprocess
    from captioner.data.sources import Sample
    from captioner.data.vocab import Vocabulary
    from captioner.models.captioner import CaptionModel


@dataclass
class EvalReport:
    """Everything measured on one split."""

    predictions: dict[str, str]
    references: dict[str, list[str]]
    scores: dict[str, float]
    tokenizer: str
    notes: list[str] = field(default_factory=list)
    diversity: dict[str, Any] = field(default_factory=dict)
    accuracy: float | None = None  # share of captions the synthetic world's checker calls accurate
    accuracy_by_objects: dict[str, float] = field(default_factory=dict)  # the same per object count
    claims: dict[str, float] = field(default_factory=dict)  # share of the claims of each kind that hold
    grounding: dict[str, float] | None = None  # pointing game: hit rate beside the chance rate

    def summary(self) -> dict[str, Any]:
        """One flat JSON-ready record (what metrics.jsonl and `evaluate --json` hold)."""
        out: dict[str, Any] = {k: round(v, 4) for k, v in self.scores.items()}
        if self.accuracy is not None:
            out["accuracy"] = round(self.accuracy, 4)
            out.update({f"accuracy_{k}": round(v, 4) for k, v in self.accuracy_by_objects.items()})
            out.update({f"claims_{k}": round(v, 4) for k, v in self.claims.items()})
        if self.grounding is not None:
            out.update({f"grounding_{k}": round(v, 4) for k, v in self.grounding.items()})
        for key in ("distinct_share", "most_common_share", "vocab_used", "mean_length", "collapsed"):
            if key in self.diversity:
                value = self.diversity[key]
                out[key] = round(value, 4) if isinstance(value, float) else value
        out["images"] = len(self.predictions)
        return out


def _batches(samples: Sequence[Sample], size: int):
    for i in range(0, len(samples), size):
        yield samples[i:i + size]


@torch.inference_mode()
def decode_samples(model: CaptionModel, samples: Sequence[Sample], vocab: Vocabulary, preprocess: Preprocess, *,
                   device: torch.device | str = "cpu", settings: DecodeSettings | None = None,
                   batch_size: int = 64, need_weights: bool = False) -> list[Caption]:
    """Caption every sample (rendered scene or image file), in order."""
    was_training = model.training
    model.eval()
    captions: list[Caption] = []
    for chunk in _batches(samples, batch_size):
        pils = [sample_image(s, min_side=preprocess.image_size) for s in chunk]
        images = to_tensor_batch(pils, preprocess).to(device)
        captions.extend(decode_batch(model, vocab, images, settings, need_weights=need_weights))
    model.train(was_training)
    return captions


def knows_truth(samples: Sequence[Sample]) -> bool:
    """Whether every sample is a scene of the built-in world (rendered, or read back from `data synth`
    files), whose checker knows the truth of each claim: caption accuracy can then be scored."""
    return bool(samples) and all(s.scene is not None for s in samples)


def evaluate_samples(model: CaptionModel, samples: Sequence[Sample], vocab: Vocabulary, preprocess: Preprocess, *,
                     device: torch.device | str = "cpu", max_len: int = 30, settings: DecodeSettings | None = None,
                     batch_size: int = 64, java: bool | None = None, synthetic: bool = False,
                     grounding: bool = False) -> EvalReport:
    """Decode `samples` (never teacher-forced) and score the captions against their references."""
    settings = settings or DecodeSettings(max_len=max_len)
    need_weights = grounding and synthetic
    captions = decode_samples(model, samples, vocab, preprocess, device=device, settings=settings,
                              batch_size=batch_size, need_weights=need_weights)
    report = score_samples(samples, [c.text for c in captions], java=java, synthetic=synthetic)
    if need_weights:
        report.grounding = synthetic_grounding(samples, captions)
    return report


def score_samples(samples: Sequence[Sample], texts: Sequence[str], *, java: bool | None = None,
                  synthetic: bool = False) -> EvalReport:
    """Score one caption per sample (decoded here, or gathered from several processes) against its references."""
    predictions = {s.image_id: text for s, text in zip(samples, texts, strict=True)}
    report = score_predictions(predictions, {s.image_id: s.captions for s in samples}, java=java)
    if synthetic:
        accuracy = synthetic_accuracy(samples, predictions)
        report.accuracy = accuracy.pop("all")
        report.accuracy_by_objects = accuracy
        report.claims = synthetic_claims(samples, predictions)
    return report


def score_predictions(predictions: dict[str, str], references: dict[str, list[str]], *,
                      java: bool | None = None) -> EvalReport:
    """Score captions from any system against references (the `--predictions` path uses this alone)."""
    from captioner.metrics import diversity, exact_match, score_captions

    scores = score_captions(references, predictions, java=java)
    values = {**scores.values, "exact_match": exact_match(predictions, references)}
    return EvalReport(predictions, references, values, scores.tokenizer, list(scores.notes),
                      diversity(list(predictions.values())))


def synthetic_accuracy(samples: Sequence[Sample], predictions: dict[str, str]) -> dict[str, float]:
    """Share of captions whose every claim is true and that mention every object of their scene.

    Keys: "all", and "objects_1" .. "objects_3" for scenes of that many objects.
    """
    from captioner.data.synthetic import check_caption

    by_count: dict[str, list[bool]] = {"all": []}
    for s in samples:
        if s.scene is None:
            continue
        ok = check_caption(s.scene, predictions[s.image_id]).accurate
        by_count["all"].append(ok)
        by_count.setdefault(f"objects_{len(s.scene.objects)}", []).append(ok)
    return {k: sum(v) / max(len(v), 1) for k, v in sorted(by_count.items())}


def synthetic_claims(samples: Sequence[Sample], predictions: dict[str, str]) -> dict[str, float]:
    """Share of the captions' claims of each kind that hold: "object", "relation", "count", and "relation_used".

    Accuracy needs every claim of a caption right; this says which kind fails. "relation_used" is the
    share of captions of several-object scenes that state a relation at all: the world's references also
    allow relation-free lists ("a red circle and a blue square"), so accuracy depends both on how often a
    model chooses to state relations and on how often the ones it states are true.
    """
    from captioner.data.synthetic import check_caption

    held: dict[str, list[bool]] = {}
    used: list[bool] = []
    for s in samples:
        if s.scene is None:
            continue
        claims = check_caption(s.scene, predictions[s.image_id]).claims
        for claim in claims:
            if claim.kind in ("object", "relation", "count"):
                held.setdefault(claim.kind, []).append(claim.ok)
        if len(s.scene.objects) > 1:
            used.append(any(c.kind == "relation" for c in claims))
    out = {k: sum(v) / len(v) for k, v in sorted(held.items())}
    if used:
        out["relation_used"] = sum(used) / len(used)
    return out


def synthetic_grounding(samples: Sequence[Sample], captions: Sequence[Caption]) -> dict[str, float]:
    """Pointing game over colour/shape words: does the last layer's mean-head attention peak in the box?"""
    from captioner.metrics import pointing_game

    hits = total = 0
    chance: list[float] = []
    for s, c in zip(samples, captions, strict=True):
        if s.scene is None or c.cross is None or c.grid is None:
            continue
        h, w = c.grid
        maps = c.cross[: len(c.words), -1].mean(dim=1).reshape(-1, h, w).numpy()  # (T, h, w)
        boxes = s.scene.word_boxes(c.text)
        size = (s.scene.image_size, s.scene.image_size)
        result = pointing_game(maps, boxes, size)
        hits += result.hits
        total += result.total
        chance.extend(result.chances)
    return {"hit_rate": hits / max(total, 1), "chance": sum(chance) / max(len(chance), 1), "words": float(total)}


@dataclass
class EvaluateResult:
    """What `captioner evaluate` shows: the report, a title saying what was scored, the saved captions."""

    report: EvalReport
    title: str
    results_file: Path | None = None


def read_predictions(path: Path) -> dict[str, str]:
    """Read a COCO results file `[{"image_id": ..., "caption": ...}]` (ids compared as strings)."""
    try:
        items = json.loads(Path(path).read_text())
    except FileNotFoundError as err:
        raise DataError(f"{path}: predictions file not found") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a list of {{\"image_id\", \"caption\"}} objects")
    predictions: dict[str, str] = {}
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "image_id" not in item or not isinstance(item.get("caption"), str):
            raise DataError(f"{path}: entry {i} needs \"image_id\" and a string \"caption\"")
        predictions[str(item["image_id"])] = item["caption"]
    return predictions


def write_predictions(path: Path, predictions: dict[str, str]) -> None:
    """Save captions in the COCO results format (numeric ids written as numbers, as COCO tools expect)."""
    write_json(path, [{"image_id": int(k) if k.isdigit() else k, "caption": v} for k, v in predictions.items()])


WORLD_OPTIONS = ("synth_train", "synth_val", "synth_test", "synth_max_objects", "seed")


def run_samples(train_options: dict[str, Any], *, data: str | None = None, image_dir: str | None = None,
                format: str = "auto") -> SampleList:
    """The samples a run was trained on, rebuilt from its stored training options (or `data` instead)."""
    if data is None and train_options.get("data") is not None:
        saved_dir = train_options.get("image_dir", train_options.get("images"))  # "images": older runs' name
        data, image_dir = train_options["data"], image_dir or saved_dir
        format = train_options.get("format", format)
    world = {k: train_options[k] for k in WORLD_OPTIONS if k in train_options}
    return load_samples(data, image_dir=image_dir, format=format, **world)


def _split_to_score(samples: SampleList, split: str, *, whole_ok: bool) -> tuple[list[Sample], str]:
    """The samples of `split`, or every sample of a file that names no splits (COCO's val2017 is one test set).

    Returns the samples and the words the title uses for them.
    """
    if not whole_ok:
        return [s for s in samples if s.split == split], split
    chosen, whole = split_or_whole(samples, split)
    return chosen, split if whole is None else "all, the file names no splits"


def run_evaluate(*, model: Path | None, data: str | None, image_dir: str | None, format: str, split: str,
                 predictions: Path | None, settings: DecodeSettings, limit: int | None, batch_size: int,
                 java: bool | None, out: Path | None, device: str, precision: str = "auto",
                 which: str = "best") -> EvaluateResult:
    """Evaluate a run on a split (default: the data it was trained on), or score a predictions file."""
    if predictions is not None:
        if data is None:
            raise DataError("--predictions needs --data with the reference captions")
        samples, split = _split_to_score(load_samples(data, image_dir=image_dir, format=format), split, whole_ok=True)
        predicted = read_predictions(predictions)
        by_id = {s.image_id: s for s in samples}
        unknown = [k for k in predicted if k not in by_id]
        if unknown:
            raise DataError(f"{predictions}: {len(unknown)} image ids are not in the {split} split of {data} "
                            f"(first: {unknown[:3]})")
        missing = [k for k in by_id if k not in predicted]
        report = score_predictions(predicted, {k: by_id[k].captions for k in predicted}, java=java)
        if missing:
            report.notes.append(f"{len(missing)} images of the {split} split have no prediction; scored the rest")
        return EvaluateResult(report, f"{predictions} on {data} ({split}, {len(predicted)} images)")

    captioner = Captioner.load(model, which=which, device=device, precision=precision)
    run_config = captioner.run.config
    train_options = run_config.get("train", {})
    own_data = data is None or data == train_options.get("data")  # its unnamed splits are the hash buckets it held out
    samples, split = _split_to_score(run_samples(train_options, data=data, image_dir=image_dir, format=format), split,
                                     whole_ok=not own_data)
    if limit is not None:
        samples = samples[:limit]
    synthetic = knows_truth(samples)
    if not samples:
        raise DataError(f"the {split} split of {data or 'the synthetic world'} is empty")
    report = evaluate_samples(captioner.model, samples, captioner.vocab, captioner.preprocess,
                              device=captioner.device, settings=settings, batch_size=batch_size, java=java,
                              synthetic=synthetic, grounding=synthetic)
    results_file = out or captioner.run.run_dir / f"captions_{split.split()[0]}.json"
    write_predictions(results_file, report.predictions)
    source = data or "synthetic world"
    search = "greedy" if settings.beam == 1 else f"beam {settings.beam}"
    encoder = str(captioner.dtype).replace("torch.", "")
    title = (f"{captioner.run.run_dir} ({captioner.run.which}) on {source} ({split}, {len(samples)} images, {search}, "
             f"encoder {encoder})")
    return EvaluateResult(report, title, results_file)
