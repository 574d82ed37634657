"""Caption result files (.jsonl, .csv, .json): written as each batch finishes, read back to resume.

One record per image: `image` (the path as given), `caption`, `score`, `logprob`, and `n_best` (the
best and its runners-up, best first) when more than one caption per image was asked for. Every batch
is flushed as soon as it is written, so an interrupted run leaves every finished batch on disk; a JSON
array is closed when the writer closes, Ctrl-C included, and a file torn by a hard kill is read back
up to its last whole record.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any

from captioner.decoding import Caption
from captioner.errors import ConfigError, DataError

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".json": "json"}
COLUMNS = ["image", "caption", "score", "logprob"]
# Non-UTF-8 bytes in a file name survive the round trip as Python's surrogate escapes, not as an error.
ENCODING = dict(encoding="utf-8", errors="surrogateescape")


def result_format(path: Path) -> str:
    """jsonl, csv or json, from the file's suffix."""
    fmt = SUFFIXES.get(Path(path).suffix.lower())
    if fmt is None:
        suffix = Path(path).suffix or "no suffix"
        raise ConfigError(f"{path}: results are written as .jsonl, .csv or .json, not {suffix}")
    return fmt


def caption_record(image: str, caption: Caption, *, n_best: bool = False) -> dict[str, Any]:
    """The record of one captioned image; with n_best, every kept caption with its scores, best first."""
    record: dict[str, Any] = {"image": image, "caption": caption.text, "score": round(caption.score, 4),
                              "logprob": round(caption.logprob, 4)}
    if n_best:
        record["n_best"] = [{"caption": c.text, "score": round(c.score, 4), "logprob": round(c.logprob, 4)}
                            for c in [caption, *caption.runners_up]]
    return record


# ----------------------------------------------------------------------------- reading


def read_results(path: Path) -> list[dict[str, Any]]:
    """The records of a results file, up to its last whole one (a hard kill can tear the final line)."""
    path = Path(path)
    fmt = result_format(path)
    try:
        with open(path, newline="" if fmt == "csv" else None, **ENCODING) as f:  # csv reads its own line ends
            text = f.read()
    except OSError as err:
        raise DataError(f"{path}: cannot read the results file ({err.strerror or err})") from None
    records = _read_csv(text) if fmt == "csv" else _read_json_lines(path, text, array=fmt == "json")
    for i, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get("image"), str):
            raise DataError(f"{path}: record {i + 1} has no image path; is this a captioner results file?")
    return records


def _read_json_lines(path: Path, text: str, *, array: bool) -> list[Any]:
    """JSON lines, or a JSON array written one record per line (as ResultWriter does), possibly unclosed."""
    if array:
        with contextlib.suppress(json.JSONDecodeError):
            whole = json.loads(text)
            if isinstance(whole, list):
                return whole  # a complete array, however it is laid out
    lines = [line.strip().rstrip(",") for line in text.splitlines()]
    lines = [line for line in lines if line and line not in ("[", "]")]
    records = []
    for n, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines) - 1:
                break  # the torn last record of an interrupted write: that image is captioned again
            raise DataError(f"{path}: not a results file (record {n + 1} is not valid JSON)") from None
    return records


def _read_csv(text: str) -> list[dict[str, Any]]:
    """CSV rows back to records: numbers as numbers, the n-best cell from its JSON."""
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    if rows and not text.endswith(("\n", "\r")):
        rows.pop()  # the torn last row of an interrupted write
    records = []
    for row in rows:
        record: dict[str, Any] = {k: v for k, v in row.items() if k is not None}
        for key in ("score", "logprob"):
            with contextlib.suppress(TypeError, ValueError):
                record[key] = float(record[key])
        if record.get("n_best"):
            with contextlib.suppress(json.JSONDecodeError):
                record["n_best"] = json.loads(record["n_best"])
        records.append(record)
    return records


def done_images(records: Iterable[dict[str, Any]]) -> set[str]:
    """Absolute paths of the images the records caption (a path given relatively matches its absolute form)."""
    return {os.path.abspath(r["image"]) for r in records}


# ----------------------------------------------------------------------------- writing


class ResultWriter:
    """Streams records to a .jsonl, .csv or .json file, flushed after every `write`.

    `carried` records (from the run being resumed) are written first, to a temporary file that then
    replaces `path`: until that moment the old file, their only copy, stays whole.
    """

    def __init__(self, path: Path, *, n_best: bool = False, carried: Sequence[dict[str, Any]] = ()) -> None:
        self.path = Path(path)
        self.format = result_format(self.path)
        self.count = 0  # records written, carried ones included
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".partial")
        # Open for the writer's lifetime (closed by close()), so no `with` block.
        self._file: IO[str] | None = open(tmp, "w", newline="" if self.format == "csv" else None,  # noqa: SIM115
                                          **ENCODING)
        self._csv = None
        if self.format == "csv":
            carried_columns = [k for r in carried for k in r if k not in COLUMNS]
            columns = COLUMNS + list(dict.fromkeys(carried_columns + (["n_best"] if n_best else [])))
            self._csv = csv.DictWriter(self._file, fieldnames=columns, restval="", extrasaction="ignore")
            self._csv.writeheader()
        elif self.format == "json":
            self._file.write("[")
        self.write(carried)
        os.replace(tmp, self.path)

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        """Append records and flush them to the operating system, so an interruption keeps them."""
        if self._file is None:
            raise ValueError(f"{self.path}: the writer is closed")
        for r in records:
            if self._csv is not None:
                self._csv.writerow({k: json.dumps(v) if k == "n_best" else v for k, v in r.items()})
            elif self.format == "json":  # one record per line, so a torn array is still read line by line
                self._file.write(("\n  " if self.count == 0 else ",\n  ") + json.dumps(r))
            else:
                self._file.write(json.dumps(r) + "\n")
            self.count += 1
        self._file.flush()

    def close(self) -> None:
        """Finish the file (a JSON array gets its closing bracket); safe to call twice."""
        if self._file is None:
            return
        if self.format == "json":
            self._file.write("\n]\n")
        self._file.close()
        self._file = None

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
