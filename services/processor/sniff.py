"""What a file is, from its first bytes: magic numbers (`filetype`) and text formats.

Binary formats with a signature (images, PDF, archives, audio, video, fonts ...) are recognised
by `filetype`, unless the head has the shape of a text format (below). A file without a
signature is text if its head is UTF-8 without NUL bytes, and then, by its shape: JSON lines
(every sampled line a JSON value, the first an object or array), JSON (starts with `{` or `[`),
CSV (a delimiter that splits the sampled lines into the same number, at least two, of fields),
or plain text. The head is a sample: the analysis that follows reads the whole file and may
find that it is not what its head suggested.
"""

from __future__ import annotations

import codecs
import csv
from collections import Counter
from dataclasses import dataclass
from typing import Final

import filetype
import orjson

from contracts.files import FileFormat

HEAD_SIZE: Final = 64 * 1024
SAMPLE_LINES: Final = 50
DELIMITERS: Final = (",", "\t", ";", "|")
CONSISTENT_SHARE: Final = 0.8

FORMAT_TYPES: Final[dict[FileFormat, str]] = {
    "csv": "text/csv",
    "jsonl": "application/x-ndjson",
    "json": "application/json",
    "text": "text/plain",
    "binary": "application/octet-stream",
}
FORMAT_EXTENSIONS: Final[dict[FileFormat, str | None]] = {
    "csv": "csv",
    "jsonl": "jsonl",
    "json": "json",
    "text": "txt",
    "binary": None,
}


@dataclass(frozen=True)
class Sniffed:
    format: FileFormat
    media_type: str
    extension: str | None
    delimiter: str | None = None


def _sniffed(fmt: FileFormat, delimiter: str | None = None) -> Sniffed:
    if delimiter == "\t":
        return Sniffed(fmt, "text/tab-separated-values", "tsv", delimiter)
    return Sniffed(fmt, FORMAT_TYPES[fmt], FORMAT_EXTENSIONS[fmt], delimiter)


def decode_head(head: bytes, whole: bool) -> str | None:
    """The head as text, or None if it is not UTF-8 text (a cut last character is fine)."""
    if b"\x00" in head:
        return None
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=whole)
    except UnicodeDecodeError:
        return None
    return text.removeprefix("\ufeff")


def sample_lines(text: str, whole: bool) -> list[str]:
    """Complete, non-blank lines of the head (the last one only if the head is the file).

    Only `\n` ends a line, as in the analysis (`str.splitlines` also splits at U+2028, NEL,
    form feeds and more, which JSON strings and CSV fields may hold)."""
    lines = text.split("\n")
    if not whole:
        lines.pop()  # after the last line end: cut off, or nothing
    return [line.removesuffix("\r") for line in lines if line.strip()][:SAMPLE_LINES]


def _is_json_lines(lines: list[str]) -> bool:
    if len(lines) < 2:  # one line alone is a JSON document
        return False
    try:
        values = [orjson.loads(line) for line in lines]
    except orjson.JSONDecodeError:
        return False
    return isinstance(values[0], dict | list)


def csv_delimiter(lines: list[str]) -> str | None:
    """The delimiter that splits most sampled lines into one same field count (≥ 2), if any."""
    if len(lines) < 2:  # a header and a record at least
        return None
    best: tuple[int, str] | None = None
    # With their line ends, so that a quoted field may hold one: the records, not the lines,
    # must agree.
    text = [line + "\n" for line in lines]
    for delimiter in DELIMITERS:
        try:
            widths = Counter(len(row) for row in csv.reader(text, delimiter=delimiter) if row)
        except csv.Error:
            continue
        if not widths:
            continue
        width, rows = widths.most_common(1)[0]
        records = widths.total()
        consistent = width >= 2 and records >= 2 and rows >= CONSISTENT_SHARE * records
        if consistent and (best is None or width > best[0]):
            best = (width, delimiter)
    return best[1] if best else None


def sniff(head: bytes, whole: bool) -> Sniffed:
    """Classify a file by its first bytes; `whole` says the head is the entire file.

    Several signatures are printable ("BM", "MZ", "ID3", "OggS", "8BPS"), so a CSV whose header
    starts "BMI," has one: a head that reads as CSV, JSON lines or JSON is taken for that, and
    a signature only beats plain text (an ASCII-only PDF or PostScript file) and a JSON
    document too large to check."""
    kind = filetype.guess(head) if head else None
    signed = None if kind is None else Sniffed("binary", str(kind.mime), str(kind.extension))
    text = decode_head(head, whole)
    if text is None:
        return signed or _sniffed("binary")
    shaped = _text_shape(text, whole)
    # JSON too large for the head is only a guess: an RTF file (`{\rtf1`) starts the same.
    guessed = shaped.format == "text" or (shaped.format == "json" and not whole)
    return signed if signed is not None and guessed else shaped


def _text_shape(text: str, whole: bool) -> Sniffed:
    lines = sample_lines(text, whole)
    if text.lstrip()[:1] in ("{", "["):
        if _is_json_lines(lines):
            return _sniffed("jsonl")
        if not whole:
            return _sniffed("json")  # too big to validate here; the analysis will tell
        try:
            orjson.loads(text)
        except orjson.JSONDecodeError:
            return _sniffed("text")
        return _sniffed("json")
    delimiter = csv_delimiter(lines)
    if delimiter is not None:
        return _sniffed("csv", delimiter)
    return _sniffed("text")
