"""Split files as users have them: parsing, header detection and line-numbered errors.

Every reader opens its file as ``utf-8-sig`` (CREMA-D's csv files begin with a byte-order
mark in some copies), accepts CRLF line ends, skips blank lines, treats a first line that
does not parse as a data row as a header, and stops at any later malformed line with an
error naming the file and the line number.
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Callable, Sequence

from utils.errors import UserError

log = logging.getLogger(__name__)
Row = tuple[str, str]  # (clip, label)
HEADER_WORDS = {"clip", "name", "file", "filename", "video", "videoid", "id", "label", "labels",
                "emotion", "class", "category", "split"}


def numbered_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the non-blank lines of a split file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"split file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read split file {path}: {error}") from None
    lines = [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise UserError(f"split file {path} is empty")
    return lines


def parse_rows(path: Path, parse: Callable[[str], object], expected: str,
               is_header: Callable[[str], bool] = lambda line: False) -> list:
    """``parse(line)`` for every line; it returns None for a line that is not a data row.

    A first line that fails to parse, or that ``is_header`` recognises, is a header.
    """
    rows = []
    for position, (number, line) in enumerate(numbered_lines(path)):
        row = None if position == 0 and is_header(line) else parse(line)
        if row is None:
            if position == 0:
                log.info("%s: line 1 taken as a header: %r", path, line[:60])
                continue
            raise UserError(f"split file {path} line {number} is not {expected}: {line[:60]!r}")
        rows.append(row)
    if not rows:
        raise UserError(f"split file {path} is empty (a header line only)")
    return rows


def csv_fields(line: str) -> list[str]:
    if '"' not in line:  # the common case, several times faster than a csv.reader per line
        return [field.strip() for field in line.split(",")]
    return [field.strip() for field in next(csv.reader([line]))]


def words_header(line: str) -> bool:
    """A header names its columns: its fields are words such as clip, label, VideoID."""
    fields = [field.strip().lower().lstrip("#").strip() for field in line.replace("&", ",").split(",")]
    return line.lstrip().startswith("#") or any(field in HEADER_WORDS for field in fields)


def parse_clip_label(line: str) -> Row | None:
    fields = csv_fields(line)
    if len(fields) < 2 or not fields[0] or not fields[1]:
        return None
    return fields[0], fields[1]


def read_clip_labels(path: Path) -> list[Row]:
    """``clip,label`` rows (extra columns ignored); the project's own split files."""
    return parse_rows(path, parse_clip_label, "clip,label", words_header)


def write_clip_labels(path: Path, rows: Sequence[Row]) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    tmp.replace(path)


# ---------------------------------------------------------------- the public formats

CREMAD_CLASSES = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")  # the released index order


def read_cremad(path: Path) -> list[Row]:
    """CREMA-D ``clip,EMOTION`` (train.csv / test.csv)."""
    def parse(line):
        row = parse_clip_label(line)
        return row if row and row[1] in CREMAD_CLASSES else None
    return parse_rows(path, parse, f"clip,EMOTION with EMOTION one of {' '.join(CREMAD_CLASSES)}")


def read_kinetics(path: Path) -> list[Row]:
    """Kinetics-Sounds ``clip,10,label_index`` (my_train.txt / my_test.txt)."""
    def parse(line):
        fields = csv_fields(line)
        if len(fields) < 3 or not fields[0] or not fields[-1].isdigit():
            return None
        return fields[0], fields[-1]
    return parse_rows(path, parse, "clip,10,label_index")


def ave_class_name(category: str) -> str:
    """The released class names (its stat.txt): 'Violin, fiddle' -> 'Violin-fiddle',
    'Frying (food)' -> 'Frying_(food)'; names already in that form are kept."""
    return category.strip().replace(", ", "-").replace(" ", "_")


def read_ave_official(path: Path) -> list[Row]:
    """AVE's official ``Category&VideoID&Quality&Start&End`` (trainSet.txt, ...)."""
    def parse(line):
        fields = line.split("&")
        if len(fields) < 2 or not fields[0].strip() or not fields[1].strip():
            return None
        return fields[1].strip(), ave_class_name(fields[0])
    return parse_rows(path, parse, "Category&VideoID&Quality&Start&End", words_header)


def read_ave_released(path: Path) -> list[Row]:
    """The released loader's AVE lists (my_train.txt / my_test.txt): ``Category,VideoID,...``."""
    def parse(line):
        fields = csv_fields(line)
        if len(fields) < 2 or not fields[0] or not fields[1]:
            return None
        return fields[1], ave_class_name(fields[0])
    return parse_rows(path, parse, "Category,VideoID", words_header)


VGGSOUND_SPLITS = ("train", "test")


def vggsound_clip_name(ytid: str, start: str) -> str:
    """``<ytid>_<start:06d>``, as the released preprocessing names files and folders."""
    return f"{ytid}_{int(start):06d}"


def read_vggsound(path: Path) -> dict[str, list[Row]]:
    """VGGSound ``ytid,start_seconds,label,train|test`` -> {"train": rows, "test": rows}."""
    def parse(line):
        fields = csv_fields(line)
        if len(fields) != 4 or not fields[0] or not fields[1].isdigit() or fields[3] not in VGGSOUND_SPLITS:
            return None
        return vggsound_clip_name(fields[0], fields[1]), fields[2], fields[3]
    splits: dict[str, list[Row]] = {split: [] for split in VGGSOUND_SPLITS}
    for clip, label, split in parse_rows(path, parse, "ytid,start_seconds,label,train|test"):
        splits[split].append((clip, label))
    for split, rows in splits.items():
        if not rows:
            raise UserError(f"split file {path} has no {split} rows")
    return splits


def class_index(names: Sequence[str]) -> dict[str, int]:
    return {name: i for i, name in enumerate(names)}
