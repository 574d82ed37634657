"""What every dataset reader returns: `Sample`s (an image, its reference captions, its split) in a `SampleList`.

Kept apart from the readers (`sources.py`) so the samples cache (`fastload.py`) can build them too.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from captioner.data.synthetic import Scene


@dataclass
class Sample:
    """One image with its reference captions: a file (`path`) or a scene of the synthetic world (`scene`)."""

    image_id: str
    captions: list[str]
    split: str
    path: Path | None = None
    scene: Scene | None = None


class SampleList(list):
    """A list of Samples that also remembers where it came from and what loading changed."""

    def __init__(self, samples: Iterable[Sample] = (), *, source: str = "", format: str = "",
                 notes: Sequence[str] = (), has_splits: bool = True) -> None:
        super().__init__(samples)
        self.source, self.format, self.notes = source, format, list(notes)
        self.has_splits = has_splits  # False: no entry named a split, so the splits are hash buckets
