"""Reliability and security: bad input, hostile files and interruptions give one clear line and lose nothing.

Every case runs through a real entry point: the `captioner` CLI (via CliRunner), or the library call the
caption command makes. A batch command reports each bad file on one line (`error: PATH: REASON`), keeps
going with the others and exits 1 at the end; nothing prints a traceback unless --debug is given.
Cases tested elsewhere are not repeated here: the loader on each image mode and bad file (test_images),
hostile pickles, torn and failed writes (test_checkpoint), Ctrl-C, non-finite losses and resuming a
finished run (test_training, test_cli), the dataset readers' messages (test_sources).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import EpsImagePlugin, Image
from typer.testing import CliRunner

from captioner import checkpoint
from captioner.api import Captioner, DecodeSettings
from captioner.cli import app
from captioner.data.images import FORMATS, Preprocess, load_image
from captioner.data.sources import MAX_CAPTION_TOKENS
from captioner.data.vocab import Vocabulary
from captioner.errors import ImageError
from captioner.models.captioner import CaptionModel

from .conftest import tiny_model_config
from .test_images import _make_bad

runner = CliRunner()

CAPTIONS = ["a red circle", "a blue square above a green triangle"]

# Train options that make `captioner train` build the tiny test model and stop after one step.
TINY_TRAIN = ["--device", "cpu", "--precision", "fp32", "--max-steps", "1", "--batch-size", "2",
              "--image-size", "48", "--patch-size", "12", "--set", "d_model=32", "--set", "n_heads=2",
              "--set", "n_layers=1", "--set", "d_ff=64", "--set", "enc_layers=1", "--set", "dropout=0.0",
              "--set", "vit_stem=conv"]


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def no_crash(result) -> None:
    """Whatever the exit code, it came from the CLI deciding to exit, not from an exception escaping."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def one_line_error(result, *needles: object) -> str:
    """Exit 1 with exactly one `error:` line on stderr, holding every needle."""
    no_crash(result)
    assert result.exit_code == 1, result.output
    (line,) = error_lines(result)
    for needle in needles:
        assert str(needle) in line, line
    return line


def save_tiny_run(run_dir: Path, *, rig_unk: bool = False) -> Path:
    """An untrained tiny ViT run written with the checkpoint helpers (much faster than training one).

    rig_unk: make <unk> the most likely token at every step, "red" the next, then <eos>.
    """
    vocab = Vocabulary.build(CAPTIONS)
    config = tiny_model_config(vocab_size=len(vocab), pad_id=vocab.pad_id)
    torch.manual_seed(0)
    model = CaptionModel(config)
    if rig_unk:
        with torch.no_grad():
            # The final LayerNorm then outputs its bias (all ones) whatever it is fed, so the tied output
            # layer scores word v by the sum of its embedding row.
            model.decoder.norm.weight.zero_()
            model.decoder.norm.bias.fill_(1.0)
            embed = model.decoder.embed.weight
            embed.zero_()
            embed[vocab.unk_id] = 1.0
            embed[vocab.stoi["red"]] = 0.5
            embed[vocab.eos_id] = 0.25
    checkpoint.write_run_config(run_dir, model_config=config.to_dict(), vocab=vocab.to_dict(),
                                preprocess=Preprocess(config.image_size).to_dict(), train={}, data={})
    checkpoint.save_weights(run_dir / checkpoint.BEST, model)
    return run_dir


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_run(tmp_path_factory.mktemp("tiny") / "run")


# ----------------------------------------------------------------------------- image files


def _write_odd(kind: str, folder: Path) -> Path:
    """A valid image that is unusual in its mode, size or orientation."""
    rng = np.random.default_rng(0)
    if kind == "cmyk":
        im, name = Image.new("CMYK", (24, 16), (0, 255, 0, 0)), "cmyk.jpg"  # as Adobe tools write them
    elif kind == "gray16":
        im, name = Image.fromarray(rng.integers(0, 65536, (16, 24), dtype=np.uint16)), "gray16.png"
    elif kind == "palette":
        im, name = Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)).convert("P"), "palette.gif"
    elif kind == "rgba":
        im, name = Image.fromarray(rng.integers(0, 256, (16, 24, 4), dtype=np.uint8)), "rgba.png"
    elif kind == "gray":
        im, name = Image.new("L", (24, 16), 90), "gray.jpg"
    elif kind == "one_pixel":
        im, name = Image.new("RGB", (1, 1), (9, 9, 9)), "one_pixel.png"
    elif kind == "wide":
        im, name = Image.new("RGB", (4000, 3), (200, 0, 0)), "wide.png"
    elif kind == "tall":
        im, name = Image.new("RGB", (3, 4000), (0, 200, 0)), "tall.png"
    elif kind == "float_nan":  # a 32-bit float TIFF, as scientific cameras write, with broken pixels
        values = rng.random((16, 24), dtype=np.float32)
        values[0, :3] = [np.nan, np.inf, -np.inf]
        im, name = Image.fromarray(values), "float_nan.tif"
    elif kind == "exif_rotated":
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
        path = folder / "exif_rotated.jpg"
        Image.new("RGB", (40, 20), (0, 0, 200)).save(path, exif=exif)
        return path
    else:
        raise AssertionError(kind)
    im.save(folder / name)
    return folder / name


ODD = ["cmyk", "gray16", "float_nan", "palette", "rgba", "gray", "one_pixel", "wide", "tall", "exif_rotated"]
BAD = ["missing", "directory", "empty", "text", "truncated_jpeg", "truncated_png", "bomb", "over_limit"]


def image_folder(folder: Path) -> tuple[list[Path], dict[Path, str]]:
    """Odd-but-valid images and bad files side by side: (good paths, {bad path: reason the CLI gives})."""
    folder.mkdir(parents=True, exist_ok=True)
    good = [_write_odd(kind, folder) for kind in ODD]
    bad = dict(_make_bad(kind, folder) for kind in BAD)
    return good, bad


def assert_each_bad_file_named_once(result, bad: dict[Path, str]) -> None:
    lines = error_lines(result)
    assert len(lines) == len(bad), result.stderr
    for path, reason in bad.items():
        (line,) = [line for line in lines if line.startswith(f"error: {path}: ")]
        assert reason in line, line


@pytest.mark.filterwarnings("error::RuntimeWarning")  # e.g. numpy casting NaN: a line of noise in the output
def test_caption_captions_odd_images_and_names_each_bad_one(tiny_run: Path, tmp_path: Path) -> None:
    good, bad = image_folder(tmp_path)
    # A directory given on the command line is expanded to its images; this one holds none.
    bad = {p: ("directory holds no image files" if p.is_dir() else r) for p, r in bad.items()}
    mixed = [p for pair in zip(good, bad, strict=False) for p in pair] + good[len(bad):]
    result = run("caption", *mixed, "--model", tiny_run, "--device", "cpu", "--max-len", "5", "--json")
    no_crash(result)
    assert result.exit_code == 1  # some files failed: said at the end, after captioning the rest
    captioned = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(r["image"] for r in captioned) == sorted(str(p) for p in good)
    assert all(isinstance(r["caption"], str) and np.isfinite(r["logprob"]) for r in captioned)
    assert_each_bad_file_named_once(result, bad)


def test_attend_keeps_going_past_bad_images(tiny_run: Path, tmp_path: Path) -> None:
    good, bad = image_folder(tmp_path / "images")
    bad = {p: ("directory holds no image files" if p.is_dir() else r) for p, r in bad.items()}
    out = tmp_path / "attention"
    result = run("attend", *bad, *good, "--model", tiny_run, "--device", "cpu", "--max-len", "2", "--out", out)
    no_crash(result)
    assert result.exit_code == 1
    for path in good:
        meta = json.loads((out / f"{path.stem}_attention.json").read_text())
        assert meta["image_size"] == list(load_image(path).size)  # drawn over the whole, upright image
        assert f"{path}:" in result.stdout
    assert meta["image_size"] == [20, 40]  # the EXIF-rotated one, stored 40 x 20
    assert_each_bad_file_named_once(result, bad)


def test_dataset_with_bad_and_missing_images(tmp_path: Path) -> None:
    """check lists them; train stops with the count and first examples, or skips them when asked."""
    good, bad = image_folder(tmp_path / "images")
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "val.png")
    lines = [{"image": p.name, "caption": CAPTIONS[i % 2], "split": "train"} for i, p in enumerate(good)]
    lines += [{"image": p.name, "caption": CAPTIONS[0], "split": "train"} for p in bad]
    lines += [{"image": good[0].name, "caption": CAPTIONS[1]},  # listed twice: merged, not a second image
              {"image": "val.png", "caption": CAPTIONS[1], "split": "val"}]
    data = tmp_path / "captions.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in lines))

    check = run("data", "check", "--data", data, "--json")
    no_crash(check)
    assert check.exit_code == 1
    report = json.loads(check.stdout)
    assert report["images"] == len(good) + len(bad) + 1
    assert report["images_found"] == len(good) + 1
    assert report["images_missing"] == 1 and report["missing_examples"] == [str(tmp_path / "images" / "nope.jpg")]
    assert report["images_unreadable"] == len(bad) - 1
    for example in report["unreadable_examples"]:
        path, _, reason = example.partition(": ")
        assert Path(path).name in {p.name for p in bad} and reason
    assert any("merged" in note for note in report["notes"])

    out = tmp_path / "run"
    stopped = run("train", "--data", data, "--out", out, *TINY_TRAIN)
    line = one_line_error(stopped, f"{len(bad)} of {len(good) + len(bad) + 1} images cannot be used",
                          "--skip-bad-images", "nope.jpg: file not found")
    assert line.count("; ") >= 2  # the first examples, not just a count
    assert not out.exists()  # refused before anything was written

    skipped = run("train", "--data", data, "--out", out, "--skip-bad-images", *TINY_TRAIN)
    no_crash(skipped)
    assert skipped.exit_code == 0, skipped.output
    assert f"skipping {len(bad)} unusable images" in skipped.stderr
    assert (out / checkpoint.LAST).exists()


def test_postscript_disguised_as_jpeg_never_reaches_ghostscript(tiny_run: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow renders EPS by running Ghostscript on the file; the loader only opens raster formats."""
    calls: list[object] = []

    def ghostscript(*args: object, **kwargs: object) -> None:
        calls.append(args)
        raise OSError("Ghostscript was started")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    eps = tmp_path / "holiday.jpg"
    eps.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto showpage\n")
    result = run("caption", eps, "--model", tiny_run, "--device", "cpu")
    one_line_error(result, f"{eps}: not an image")
    assert calls == []
    Image.init()
    assert set(FORMATS) <= set(Image.OPEN)  # every allowed format is one this Pillow can open


def test_file_names_that_look_like_markup_are_printed_verbatim(tiny_run: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """`x[/b]` would be a closing tag to rich: escaped, the name prints as is and the error stays one line."""
    monkeypatch.chdir(tmp_path)
    Path("x[").mkdir()
    Image.new("RGB", (8, 8)).save("x[/b]ok.png")
    Image.new("RGB", (8, 8)).save("[red]c.png")
    Path("x[/b]bad.jpg").write_text("not an image")
    result = run("caption", "x[/b]ok.png", "[red]c.png", "x[/b]bad.jpg", "--model", tiny_run, "--device", "cpu",
                 "--max-len", "3")
    no_crash(result)
    assert result.exit_code == 1
    assert "x[/b]ok.png" in result.stdout and "[red]c.png" in result.stdout
    assert error_lines(result) == ["error: x[/b]bad.jpg: not an image (or a format Pillow cannot read)"]
    shown = run("attend", "x[/b]ok.png", "--model", tiny_run, "--device", "cpu", "--max-len", "2", "--out", "[o]")
    no_crash(shown)
    assert shown.exit_code == 0, shown.output
    assert "x[/b]ok.png:" in shown.stdout and "[o]" in shown.stdout


# ----------------------------------------------------------------------------- errors and --debug


def test_internal_error_is_one_line_and_debug_shows_the_traceback(tiny_run: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    image = tmp_path / "ok.png"
    Image.new("RGB", (8, 8)).save(image)

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(Captioner, "caption_files", boom)
    result = run("caption", image, "--model", tiny_run, "--device", "cpu")
    one_line_error(result, "internal error: RuntimeError: boom", "--debug")

    # With --debug the exception leaves the CLI and Python prints it: run the real console entry point.
    code = ("import sys\nfrom captioner.api import Captioner\n"
            "def boom(*a, **k):\n    raise RuntimeError('boom')\n"
            "Captioner.caption_files = boom\nfrom captioner.cli import main\n"
            "sys.argv[0] = 'captioner'\nmain()\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    debug = subprocess.run([sys.executable, "-c", code, "--debug", "caption", str(image), "--model", str(tiny_run),
                            "--device", "cpu"], capture_output=True, text=True, env=env, timeout=120)
    assert debug.returncode != 0
    assert "Traceback (most recent call last)" in debug.stderr and "RuntimeError: boom" in debug.stderr


def test_ctrl_c_while_captioning_is_one_line(tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = tmp_path / "ok.png"
    Image.new("RGB", (8, 8)).save(image)

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Captioner, "caption_files", interrupted)
    result = run("caption", image, "--model", tiny_run, "--device", "cpu")
    no_crash(result)
    assert result.exit_code == 130
    assert error_lines(result) == ["error: interrupted"]


# ----------------------------------------------------------------------------- run directories


def _edit_config(run_dir: Path, change) -> None:
    config = json.loads((run_dir / checkpoint.CONFIG).read_text())
    change(config)
    (run_dir / checkpoint.CONFIG).write_text(json.dumps(config))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


BROKEN_RUNS = {
    "no config": (lambda d: (d / checkpoint.CONFIG).unlink(), ["config.json: missing", "not a captioner run"]),
    "no weights": (lambda d: (d / checkpoint.BEST).unlink(), ["model.safetensors: weights file not found"]),
    "truncated weights": (lambda d: _truncate(d / checkpoint.BEST),
                          ["model.safetensors: not a readable safetensors file"]),
    "future format": (lambda d: _edit_config(d, lambda c: c.update(format_version=999)),
                      ["config.json: run format 999 is not the supported 1"]),
    "vocabulary lost words": (
        lambda d: _edit_config(d, lambda c: c["vocab"].update(tokens=c["vocab"]["tokens"][:-3])),
        ["config.json: vocabulary has", "but the model expects"]),
    "config disagrees with weights": (lambda d: _edit_config(d, lambda c: c["model"].update(d_ff=128)),
                                      ["model.safetensors: weight", "the configuration expects"]),
}


@pytest.mark.parametrize("case", list(BROKEN_RUNS))
def test_broken_run_directory_is_one_line(case: str, tmp_path: Path) -> None:
    break_it, needles = BROKEN_RUNS[case]
    run_dir = save_tiny_run(tmp_path / "run")
    break_it(run_dir)
    image = tmp_path / "ok.png"
    Image.new("RGB", (8, 8)).save(image)
    result = run("caption", image, "--model", run_dir, "--device", "cpu")
    one_line_error(result, run_dir, *needles)


@pytest.mark.parametrize("case, needle", [
    ("missing", "run directory not found"),
    ("photos", "config.json: missing; not a captioner run directory"),
    ("inference only", "holds no last.safetensors, so there is no training state to resume from"),
])
def test_resume_of_something_that_is_not_a_run(case: str, needle: str, tmp_path: Path) -> None:
    target = tmp_path / "target"
    if case == "photos":
        target.mkdir()
        Image.new("RGB", (8, 8)).save(target / "holiday.jpg")
    elif case == "inference only":
        save_tiny_run(target)  # config.json and model.safetensors, but no resume state
    before = sorted(p.name for p in target.iterdir()) if target.exists() else None
    result = run("train", "--resume", target, "--device", "cpu")
    one_line_error(result, target, needle)
    assert (sorted(p.name for p in target.iterdir()) if target.exists() else None) == before


# ----------------------------------------------------------------------------- datasets


def _dataset(tmp_path: Path, case: str) -> tuple[list[str], str]:
    """Annotations with one problem: (extra arguments naming the dataset, the message expected)."""
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    if case == "malformed JSON":
        path = tmp_path / "captions.json"
        path.write_text('{"images": [\n{"id": 1,}\n], "annotations": []}')
        return ["--data", path], f"{path}: not valid JSON at line 2"
    if case == "CSV without a caption column":
        path = tmp_path / "captions.csv"
        path.write_text("image,label\na.png,cat\n")
        return ["--data", path], f"{path}: no caption column"
    if case == "images folder not there":
        path = tmp_path / "captions.jsonl"
        path.write_text(json.dumps({"image": "a.png", "caption": "a cat"}))
        return ["--data", path, "--images", tmp_path / "gone"], f"{tmp_path / 'gone'}: images folder not found"
    if case == "images folder not found":
        path = tmp_path / "far" / "away" / "captions.jsonl"  # no images folder beside it or one level up
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"image": "a.png", "caption": "a cat"}))
        return ["--data", path], "cannot find the image folder"
    if case == "image in two splits":
        path = tmp_path / "captions.jsonl"
        path.write_text("\n".join(json.dumps({"image": "a.png", "caption": "a cat", "split": s})
                                  for s in ("train", "test")))
        return ["--data", path], "image 'a.png' is listed in two splits"
    raise AssertionError(case)


@pytest.mark.parametrize("command", ["check", "train"])
@pytest.mark.parametrize("case", ["malformed JSON", "CSV without a caption column", "images folder not there",
                                  "images folder not found", "image in two splits"])
def test_unusable_dataset_is_one_line(case: str, command: str, tmp_path: Path) -> None:
    args, message = _dataset(tmp_path, case)
    out = tmp_path / "run"
    result = run("data", "check", *args) if command == "check" else run("train", *args, "--out", out, *TINY_TRAIN)
    one_line_error(result, message)
    assert not out.exists()


def test_empty_long_and_repeated_captions_are_dropped_and_reported(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / "images" / name)
    absurd = " ".join(["word"] * (MAX_CAPTION_TOKENS + 50))
    long = "a red circle " + " ".join(["very"] * 40)  # fits the data limit, longer than the model's 30 tokens
    lines = [{"image": "a.png", "captions": ["a red circle", "", "  ", absurd], "split": "train"},
             {"image": "b.png", "captions": [long, "a blue square"], "split": "train"},
             {"image": "a.png", "caption": "a red circle"},  # the same image again, the same caption again
             {"image": "c.png", "caption": "a green triangle", "split": "val"}]
    data = tmp_path / "captions.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in lines))
    expected = ["2 empty captions dropped", f"1 captions longer than {MAX_CAPTION_TOKENS} words dropped",
                "1 repeated image entries merged", "1 duplicate captions of the same image dropped"]

    check = run("data", "check", "--data", data, "--json")
    no_crash(check)
    assert check.exit_code == 0, check.output
    report = json.loads(check.stdout)
    assert report["images"] == 3 and report["captions"] == 4
    assert report["caption_length"]["max"] == 43
    for note in expected:
        assert any(note in n for n in report["notes"]), report["notes"]

    train = run("train", "--data", data, "--out", tmp_path / "run", *TINY_TRAIN)
    no_crash(train)
    assert train.exit_code == 0, train.output
    warnings = [line for line in train.stderr.splitlines() if line.startswith("warning:")]
    for note in [*expected, "1 training captions are longer than 30 words"]:
        assert any(note in w for w in warnings), train.stderr


@pytest.mark.parametrize("how", [[], ["--beam", "3"], ["--sample", "--seed", "1"]])
def test_unk_is_never_printed(how: list[str], tmp_path: Path) -> None:
    """A model whose favourite token is <unk> still writes only real words."""
    run_dir = save_tiny_run(tmp_path / "run", rig_unk=True)
    image = tmp_path / "ok.png"
    Image.new("RGB", (8, 8)).save(image)
    result = run("caption", image, "--model", run_dir, "--device", "cpu", "--max-len", "4", "--json", *how)
    no_crash(result)
    assert result.exit_code == 0, result.output
    assert "<unk>" not in result.output and "unk" not in json.loads(result.stdout)["caption"]
    assert json.loads(result.stdout)["caption"].startswith("red")


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize("args, message", [
    (["attend", "{image}", "--layer", "7"], "layer 7 does not exist: the decoder has 1 layers"),
    (["attend", "{image}", "--layer", "-2"], "layer -2 does not exist"),
    (["attend", "{image}", "--layer", "top"], "--layer must be last, all or a layer index, got 'top'"),
    (["attend", "{image}", "--heads", "some"], "--heads must be mean or all, got 'some'"),
    (["attend", "{image}", "--max-len", "0"], "'--max-len': Input should be greater than or equal to 1"),
    (["caption", "{image}", "--temperature", "0"], "'--temperature': Input should be greater than or equal to"),
    (["caption", "{image}", "--top-p", "0"], "'--top-p': Input should be greater than or equal to"),
    (["caption", "{image}", "--batch-size", "0"], "'--batch-size': Input should be greater than or equal to 1"),
    (["evaluate", "--split", "nope"], "'nope' is not one of 'train', 'val', 'test'"),
    (["evaluate", "--beam", "65"], "'--beam': Input should be less than or equal to 64"),
    (["evaluate", "--limit", "0"], "'--limit': Input should be greater than or equal to 1"),
    (["train", "--batch-size", "0"], "'--batch-size': Input should be greater than or equal to 1"),
    (["train", "--max-steps", "0"], "'--max-steps': Input should be greater than or equal to 1"),
    (["train", "--lr", "-1"], "'--lr': Input should be greater than or equal to 0"),
    (["train", "--patch-size", "0"], "'--patch-size': Input should be greater than or equal to 1"),
    (["train", "--cnn-arch", "vgg16", "--encoder", "cnn"], "cnn_arch must be one of resnet_small, resnet18,"),
    (["data", "synth", "--n", "0"], "'--n': Input should be greater than or equal to 1"),
    (["data", "check", "--data", "{image}", "--min-count", "0"], "'--min-count': Input should be greater than"),
])
def test_out_of_range_options_refused_before_any_work(args: list[str], message: str, tiny_run: Path,
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def work(*args: object, **kwargs: object) -> None:
        raise RuntimeError("work started before the options were checked")

    monkeypatch.setattr(Captioner, "caption_tensor", work)
    monkeypatch.setattr("captioner.training.train", work)
    monkeypatch.setattr("captioner.data.sources.load_samples", work)
    image = tmp_path / "ok.png"
    Image.new("RGB", (8, 8)).save(image)
    out = tmp_path / "out"
    args = [a.replace("{image}", str(image)) for a in args]
    if args[0] in ("attend", "caption", "evaluate"):
        args += ["--model", str(tiny_run), "--device", "cpu"]
    if args[0] in ("attend", "train") or args[:2] == ["data", "synth"]:
        args += ["--out", str(out)]
    result = run(*args)
    no_crash(result)
    assert result.exit_code != 0
    flat = " ".join(result.output.replace("│", " ").split())  # undo the usage box's line wrapping
    assert message in flat
    assert not out.exists() and not result.stdout.strip()  # nothing decoded, trained or written


# ----------------------------------------------------------------------------- fuzzing


def _seed_files() -> list[bytes]:
    """Small valid files, one per allowed format and a few modes, for the fuzzer to corrupt."""
    rgb = np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    files = []
    for fmt, mode, options in [("JPEG", "RGB", {"exif": exif}), ("JPEG", "CMYK", {}), ("PNG", "RGBA", {}),
                               ("PNG", "P", {"transparency": 0}), ("GIF", "P", {}), ("BMP", "RGB", {}),
                               ("TIFF", "RGB", {"compression": "tiff_lzw"}), ("TIFF", "I;16", {}),
                               ("WEBP", "RGB", {}), ("PPM", "L", {})]:
        buffer = io.BytesIO()
        Image.fromarray(rgb).convert(mode).save(buffer, fmt, **options)
        files.append(buffer.getvalue())
    return files


SEED_FILES = _seed_files()


@st.composite
def corrupted_files(draw: st.DrawFn) -> bytes:
    """A valid file with a few bytes overwritten and maybe cut short: past the header checks, into decoders."""
    data = bytearray(draw(st.sampled_from(SEED_FILES)))
    for _ in range(draw(st.integers(0, 6))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(1, len(data)))]
    return bytes(data)


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.filterwarnings("error")  # a warning would be a second line beside the one-line error
@FUZZ
@given(data=st.one_of(st.binary(min_size=1, max_size=512), corrupted_files()))
def test_fuzz_any_bytes_give_an_rgb_image_or_an_image_error(data: bytes, scratch: Path) -> None:
    path = scratch / "fuzzed.jpg"
    path.write_bytes(data)
    try:
        image = load_image(path)
    except ImageError as err:
        assert err.path == str(path) and "\n" not in str(err)
    else:
        assert image.mode == "RGB" and min(image.size) >= 1


# The modes each format can store (Pillow converts or refuses the others).
MODES_BY_FORMAT = {
    "PNG": ["L", "RGB", "RGBA", "P", "I;16", "1"],
    "JPEG": ["L", "RGB", "CMYK", "1"],
    "BMP": ["L", "RGB", "RGBA", "P", "1"],
    "TIFF": ["L", "RGB", "RGBA", "P", "CMYK", "I;16", "1"],
    "GIF": ["L", "RGB", "RGBA", "P", "I;16", "1"],
}


@st.composite
def odd_images(draw: st.DrawFn) -> tuple[Image.Image, str]:
    fmt = draw(st.sampled_from(sorted(MODES_BY_FORMAT)))
    mode = draw(st.sampled_from(MODES_BY_FORMAT[fmt]))
    w, h = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    else:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8)).convert(mode)  # (h, w, RGBA)
    return image, fmt


@pytest.fixture(scope="module")
def captioner(tmp_path_factory: pytest.TempPathFactory) -> Captioner:
    return Captioner.load(save_tiny_run(tmp_path_factory.mktemp("fuzz_run") / "run"), device="cpu")


@FUZZ
@given(case=odd_images())
def test_fuzz_odd_images_are_captioned(case: tuple[Image.Image, str], captioner: Captioner, scratch: Path) -> None:
    """The caption command's path: a file it cannot use comes back as an ImageError, never raised; and these
    files are all valid, so each must be captioned."""
    image, fmt = case
    path = scratch / f"odd.{fmt.lower()}"
    image.save(path, fmt)
    results, failures = captioner.caption_files([path], DecodeSettings(max_len=3))
    assert not failures, f"{image.mode} {image.size} {fmt}: {failures}"
    ((captioned, caption),) = results
    assert captioned == path and isinstance(caption.text, str)
