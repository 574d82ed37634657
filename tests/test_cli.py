"""The CLI wiring, end to end on a briefly trained run: train, caption, attend, evaluate, data."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from captioner import __version__
from captioner.cli import app

from .conftest import TINY_MODEL

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    result = run("data", "synth", "--out", out, "--n", "6", "--split", "test", "--image-size", "48")
    assert result.exit_code == 0, result.output
    return out


def test_help_lists_commands_and_version() -> None:
    result = run("--help")
    assert result.exit_code == 0
    for command in ("train", "caption", "attend", "evaluate", "data"):
        assert command in result.output
    assert run("--version").output.strip() == f"captioner {__version__}"
    assert "synth" in run("data", "--help").output


@pytest.mark.parametrize("args, message", [
    (["caption", "x.png", "--beam", "0"], "'--beam': Input should be greater than or equal to 1"),
    (["caption", "x.png", "--max-len", "-3"], "'--max-len': Input should be greater than or equal to 1"),
    (["train", "--encoder", "rnn"], "'rnn' is not one of 'vit', 'cnn'"),
    (["train", "--image-size", "50", "--patch-size", "16", "--out", "never"], "divisible by patch_size"),
    (["train", "--set", "n_heads=3", "--out", "never"], "divisible by n_heads"),
])
def test_bad_options_refused_before_work(args: list[str], message: str, tmp_path: Path) -> None:
    result = run(*args)
    assert result.exit_code != 0
    flat = " ".join(result.output.replace("│", " ").split())  # undo the error box's line wrapping
    assert message in flat
    assert "Traceback" not in result.output
    assert not Path("never").exists()


def test_config_file_with_command_line_override(tmp_path: Path) -> None:
    config = tmp_path / "train.toml"
    model = "\n".join(f"{k} = {json.dumps(v)}" for k, v in TINY_MODEL.items())
    config.write_text(
        'encoder = "cnn"\nmax_steps = 50\nbatch_size = 8\nsynth_train = 32\nsynth_val = 8\nsynth_test = 8\n'
        f'device = "cpu"\nprecision = "fp32"\n[model]\n{model}\n'
    )
    out = tmp_path / "run"
    result = run("train", "--config", config, "--max-steps", "2", "--out", out)
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["max_steps"] == 2  # the command line wins
    assert saved["train"]["encoder"] == "cnn" and saved["model"]["encoder"] == "cnn"  # the file applies
    assert saved["model"]["d_model"] == TINY_MODEL["d_model"]
    again = run("train", "--resume", out)
    assert again.exit_code == 1 and "already finished" in again.output


def test_caption_files_directory_and_bad_file(trained_run: Path, samples: Path, tmp_path: Path) -> None:
    images = sorted((samples / "images").iterdir())
    bad = tmp_path / "broken.jpg"
    bad.write_text("not an image")
    result = run("caption", images[0], images[1], bad, "--model", trained_run, "--json")
    assert result.exit_code == 1  # some failed
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [Path(r["image"]).name for r in lines] == [images[0].name, images[1].name]
    assert all(r["caption"] for r in lines)
    assert "broken.jpg" in result.stderr and "Traceback" not in result.output
    whole = run("caption", samples / "images", "--model", trained_run, "--beam", "3")
    assert whole.exit_code == 0, whole.output
    assert images[-1].name in whole.stdout


def test_checkpoint_option_picks_best_or_last(trained_run: Path, samples: Path, tmp_path: Path) -> None:
    import shutil

    from captioner import checkpoint

    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    last = checkpoint.load_run(run_dir, which="last")
    with torch.no_grad():
        last.model.decoder.embed.weight.zero_()  # tied output layer: every logit 0, a caption unlike best's
    checkpoint.save_weights(run_dir / checkpoint.LAST, last.model)
    image = sorted((samples / "images").iterdir())[0]
    captions = {}
    for which in ("best", "last"):
        result = run("caption", image, "--model", run_dir, "--checkpoint", which, "--json")
        assert result.exit_code == 0, result.output
        captions[which] = json.loads(result.stdout)["caption"]
    assert captions["best"] == json.loads(run("caption", image, "--model", run_dir, "--json").stdout)["caption"]
    assert captions["best"] != captions["last"]
    evaluated = run("evaluate", "--model", run_dir, "--checkpoint", "last", "--limit", "2", "--no-java")
    assert evaluated.exit_code == 0 and "(last)" in evaluated.stdout, evaluated.output
    (run_dir / checkpoint.BEST).unlink()  # stopped before its first validation: `best` falls back to last
    assert checkpoint.load_run(run_dir).which == "last"
    evaluated = run("evaluate", "--model", run_dir, "--limit", "2", "--no-java")
    assert evaluated.exit_code == 0 and "(last)" in evaluated.stdout, evaluated.output


def test_caption_missing_model_is_one_line(samples: Path, tmp_path: Path) -> None:
    image = next((samples / "images").iterdir())
    result = run("caption", image, "--model", tmp_path / "nope")
    assert result.exit_code == 1
    assert "run directory not found" in result.output and "Traceback" not in result.output


def test_attend_writes_overlays(trained_run: Path, samples: Path, tmp_path: Path) -> None:
    image = sorted((samples / "images").iterdir())[0]
    out = tmp_path / "attend"
    result = run("attend", image, "--model", trained_run, "--out", out)
    assert result.exit_code == 0, result.output
    stem = image.stem
    meta = json.loads((out / f"{stem}_attention.json").read_text())
    words = meta["words"]
    assert words
    gif = Image.open(out / f"{stem}.gif")
    assert gif.n_frames == len(words)
    assert Image.open(out / f"{stem}_grid.png").size[0] > 0
    assert len(list(out.glob(f"{stem}_[0-9][0-9]_*.png"))) == len(words)
    assert str(out) in result.stdout


def test_evaluate_run_and_predictions(trained_run: Path, samples: Path, tmp_path: Path) -> None:
    result = run("evaluate", "--model", trained_run, "--limit", "8", "--json", "--no-java")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    for key in ("BLEU-4", "CIDEr-D", "ROUGE-L", "accuracy", "grounding_hit_rate", "grounding_chance"):
        assert key in report
    assert 0 <= report["accuracy"] <= 1
    saved = json.loads(Path(report["results_file"]).read_text())
    assert len(saved) == 8 and {"image_id", "caption"} <= set(saved[0])

    annotations = samples / "captions.json"
    coco = json.loads(annotations.read_text())
    refs: dict = {}
    for a in coco["annotations"]:
        refs.setdefault(a["image_id"], a["caption"])
    predictions = tmp_path / "preds.json"
    predictions.write_text(json.dumps([{"image_id": k, "caption": v} for k, v in refs.items()]))
    scored = run("evaluate", "--predictions", predictions, "--data", annotations, "--split", "test", "--json",
                 "--no-java")
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.stdout)["CIDEr-D"] > 1.0  # a reference scored against all five is very high


def test_data_check(samples: Path, tmp_path: Path) -> None:
    from captioner.data.vocab import tokenize

    annotations = samples / "captions.json"
    result = run("data", "check", "--data", annotations, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    # The figures, recomputed from the annotations file the command read (6 test scenes, 5 captions each).
    coco = json.loads(annotations.read_text())
    captions = [a["caption"] for a in coco["annotations"]]
    per_image = [sum(a["image_id"] == im["id"] for a in coco["annotations"]) for im in coco["images"]]
    lengths = [len(tokenize(c)) for c in captions]
    words = {w for c in captions for w in tokenize(c)}
    assert (report["format"], report["images"], report["images_found"]) == ("coco", 6, 6)
    assert (report["images_missing"], report["images_unreadable"]) == (0, 0)
    assert report["splits"] == {"train": 0, "val": 0, "test": 6}
    assert report["captions"] == len(captions) == sum(per_image)
    for key, values in (("captions_per_image", per_image), ("caption_length", lengths)):
        assert (report[key]["min"], report[key]["max"]) == (min(values), max(values)), key
    assert report["caption_length"]["mean"] == pytest.approx(sum(lengths) / len(lengths), abs=0.01)
    counts = Counter(w for c in captions for w in tokenize(c))
    assert report["distinct_words"] == len(words) == len(counts)
    # At training's threshold for a small dataset (words seen twice), plus the 4 specials.
    assert report["vocab_min_count"] == 2 and report["vocab_size"] == sum(n >= 2 for n in counts.values()) + 4
    # A missing image is counted, named, and fails the check.
    broken = tmp_path / "data"
    shutil.copytree(samples, broken)
    gone = sorted((broken / "images").iterdir())[0]
    gone.unlink()
    result = run("data", "check", "--data", broken / "captions.json", "--json")
    report = json.loads(result.stdout)
    assert result.exit_code == 1 and (report["images_found"], report["images_missing"]) == (5, 1)
    assert report["missing_examples"] == [str(gone)]


def _csv_dataset(folder: Path) -> Path:
    """Five images in a CSV (one row per caption): 3 train with 2 captions each, 1 val, 1 test."""
    (folder / "images").mkdir()
    rows = ["image,caption,split"]
    for i, split in enumerate(["train", "train", "train", "val", "test"]):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / "images" / f"{i}.png")
        rows.append(f"{i}.png,a red dog on grass,{split}")
        if split == "train":
            rows.append(f"{i}.png,the red dog runs fast,{split}")
    (folder / "captions.csv").write_text("\n".join(rows))
    return folder / "captions.csv"


def test_data_check_prints_tables_and_json_with_the_same_facts(tmp_path: Path) -> None:
    data = _csv_dataset(tmp_path)
    as_json = run("data", "check", "--data", data, "--json")
    assert as_json.exit_code == 0, as_json.output
    report = json.loads(as_json.stdout)
    assert (report["images"], report["captions"], report["images_found"]) == (5, 8, 5)
    assert report["splits"] == {"train": 3, "val": 1, "test": 1}
    assert report["split_captions"] == {"train": 6, "val": 1, "test": 1}
    assert [report["caption_length"][k] for k in ("min", "median", "max")] == [5, 5, 5]
    # The train captions' words seen at least twice (training's threshold here): all 8, plus the 4 specials.
    assert (report["vocab_min_count"], report["vocab_size"], report["vocab_from"]) == (2, 12, "train")
    assert report["warnings"] == []
    stricter = json.loads(run("data", "check", "--data", data, "--json", "--min-count", "4").stdout)
    assert (stricter["vocab_min_count"], stricter["vocab_size"]) == (4, 4 + 2)  # "red" and "dog", seen 6 times

    table = run("data", "check", "--data", data)
    assert table.exit_code == 0, table.output
    assert "{" not in table.stdout  # a table, not a dict repr
    rows = {line.split()[1]: line.split()[3:6:2] for line in table.stdout.splitlines()
            if line.startswith("│") and line.split()[1] in ("train", "val", "test", "all")}
    assert rows == {"train": ["3", "6"], "val": ["1", "1"], "test": ["1", "1"], "all": ["5", "8"]}
    assert "vocabulary: 12 tokens" in table.stdout and "at min count 2" in table.stdout
    assert "images: 5 usable" in table.stdout

    (tmp_path / "images" / "4.png").unlink()
    broken = run("data", "check", "--data", data)
    assert broken.exit_code == 1 and "1 missing" in broken.stdout and "warning: 1 images not found" in broken.stdout
    assert f"missing: {tmp_path / 'images' / '4.png'}" in broken.stdout


def test_bf16_encoder_inference_keeps_a_float32_decoder(trained_run: Path, samples: Path) -> None:
    import torch

    from captioner import Captioner

    images = sorted((samples / "images").iterdir())[:4]
    full = Captioner.load(trained_run, device="cpu", precision="fp32")
    reference = full.caption(images)
    mixed = Captioner.load(trained_run, device="cpu", precision="bf16")
    assert next(mixed.model.encoder.parameters()).dtype == torch.bfloat16
    assert mixed.model.decoder.embed.weight.dtype == torch.float32
    assert mixed.model.encode(mixed.to_tensor(images)).memory.dtype == torch.float32
    # The encoder's output moves by bf16 rounding only, and the float32 decoder reads it to the same words
    # with nearly the same log-probability (this run's word choices win by far more than that).
    memory = full.model.encode(full.to_tensor(images)).memory
    mixed_memory = mixed.model.encode(mixed.to_tensor(images)).memory
    assert ((mixed_memory - memory).norm() / memory.norm()).item() < 0.02
    captions = mixed.caption(images)
    assert [c.text for c in captions] == [c.text for c in reference]
    assert [c.logprob for c in captions] == pytest.approx([c.logprob for c in reference], abs=0.05)
    result = run("caption", *images, "--model", trained_run, "--precision", "fp32", "--json")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(r["image"]).name for r in lines] == [i.name for i in images]
    assert [r["caption"] for r in lines] == [c.text for c in reference]
    refused = run("caption", images[0], "--model", trained_run, "--precision", "fp16", "--device", "cpu")
    assert refused.exit_code != 0 and "fp16 needs a CUDA device" in refused.output
