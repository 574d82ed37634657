"""Project hygiene: dependency floors above known code-execution bugs, no terminal escapes from the CLI."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from captioner.errors import printable

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"

# The lowest version of each dependency without a known code-execution bug reachable from this project.
FLOORS = {
    "torch": (2, 6),  # CVE-2025-32434: torch.load(weights_only=True) could still run code
    "torchvision": (0, 21),  # the release built for torch 2.6
    "pillow": (10, 3),  # libwebp CVE-2023-4863 (10.0.1), ImageMath.eval CVE-2023-50447 (10.2), CVE-2024-28219
}
UPPER_BOUNDS = ("torch", "torchvision")  # APIs we rely on change across majors: keep the ceilings


def _dependencies() -> dict[str, str]:
    """The [project] dependencies as {lower-case name: version specifier}."""
    if sys.version_info < (3, 11):
        pytest.skip("tomllib needs Python 3.11")
    import tomllib

    deps = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]["dependencies"]
    pairs = (re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*(.*)", d).groups() for d in deps)
    return {name.lower(): spec for name, spec in pairs}


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


@pytest.mark.parametrize("name", FLOORS)
def test_dependency_floors_exclude_known_code_execution_bugs(name: str) -> None:
    spec = _dependencies()[name]
    floor = re.search(r">=\s*([0-9][0-9.]*)", spec)
    assert floor, f"{name} has no >= floor: {spec!r}"
    assert _version(floor.group(1)) >= FLOORS[name], f"{name}{spec} allows a version below {FLOORS[name]}"
    if name in UPPER_BOUNDS:
        assert re.search(r"<\s*[0-9]", spec), f"{name} lost its upper bound: {spec!r}"


# ----------------------------------------------------------------------------- terminal escapes

# A window title with a bell, a screen wipe, an 8-bit CSI and a backspace that hides the text before it.
HOSTILE = ["\x1b]0;pwned\x07", "\x1b[2J", "\x9b31m", "ok\x08\x08"]
CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def test_printable_escapes_what_a_terminal_obeys_and_keeps_the_rest() -> None:
    assert printable("\x1b]0;pwned\x07") == "\\x1b]0;pwned\\x07"
    assert printable("a\x9b2Jb\x7f\x00\rc\x08") == "a\\x9b2Jb\\x7f\\x00\\rc\\x08"
    assert printable("café 猫 🐈 [red]x[/]\ttab") == "café 猫 🐈 [red]x[/]\ttab"  # ordinary text untouched
    assert printable("one\ntwo") == "one\\ntwo"  # a one-line message stays one line
    assert printable("one\ntwo", newlines=True) == "one\ntwo"
    every = "".join(map(chr, range(0x100)))
    assert not CONTROLS.search(printable(every)) and not CONTROLS.search(printable(every, newlines=True))


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run whose likeliest word (after <unk>) carries a terminal escape, as a hostile vocab.json can."""
    import json

    from captioner import checkpoint

    from .test_reliability import save_tiny_run

    run_dir = save_tiny_run(tmp_path_factory.mktemp("hostile") / "run", rig_unk=True)
    config_file = run_dir / checkpoint.CONFIG
    config = json.loads(config_file.read_text())
    tokens = config["vocab"]["tokens"]
    tokens[tokens.index("red")] = "\x1b[2Jred"
    config_file.write_text(json.dumps(config))
    return run_dir


def test_no_control_character_reaches_the_terminal(hostile_run: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """File names, errors and caption words from outside are shown with their control characters escaped."""
    from PIL import Image

    from .test_reliability import run

    monkeypatch.chdir(tmp_path)
    names = [f"{h}.png" for h in HOSTILE]
    for name in names:
        Image.new("RGB", (8, 8)).save(name)
    Path("\x1b[2Jbad.jpg").write_text("not an image")
    result = run("caption", *names, "\x1b[2Jbad.jpg", "--model", hostile_run, "--device", "cpu", "--max-len", "3")
    assert result.exit_code == 1, result.output
    for stream in (result.stdout, result.stderr):
        assert not CONTROLS.search(stream), ascii(stream)
    assert "\\x1b]0;pwned\\x07.png" in result.stdout and "\\x1b[2Jred" in result.stdout
    assert "error: \\x1b[2Jbad.jpg: not an image" in result.stderr


@pytest.mark.parametrize("json_out", [[], ["--json"]])
def test_data_check_shows_hostile_names_escaped(json_out: list[str], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from PIL import Image

    from .test_reliability import run

    monkeypatch.chdir(tmp_path)
    Path("images").mkdir()
    Image.new("RGB", (8, 8)).save("images/ok.png")
    Path("images/\x1b[2Jbad.png").write_text("not an image")
    lines = [{"image": "ok.png", "caption": "a \x1b]0;pwned\x07 thing"}, {"image": "\x1b[2Jbad.png", "caption": "b"},
             {"image": "\x1b]0;gone\x07.png", "caption": "c"}]
    Path("d.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    result = run("data", "check", "--data", "d.jsonl", *json_out)
    assert result.exit_code == 1, result.output
    assert not CONTROLS.search(result.stdout + result.stderr), ascii(result.output)
    assert "2Jbad.png" in result.stdout and "gone" in result.stdout
    Path("out.jsonl").write_text(json.dumps({"image": "../\x1b[2J.png", "caption": "a"}))
    refused = run("data", "check", "--data", "out.jsonl", "--images", "images", *json_out)
    assert refused.exit_code == 1 and "leads outside" in refused.stderr
    assert not CONTROLS.search(refused.stdout + refused.stderr), ascii(refused.output)
