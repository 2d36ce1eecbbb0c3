"""Analysis of an uploaded file: pure CPU work on a stream, run in a worker process.

Memory stays bounded whatever the file's size: the blob is read through a 1 MiB buffer, one
line (at most `MAX_LINE_BYTES`) or one CSV record at a time, and records are handled in batches
of at most `BATCH_ROWS` and about `BATCH_BYTES` of the file; per column only counters and a
set of at most `DISTINCT_CAP` value hashes are kept, for at most `MAX_COLUMNS` columns.

Every pass also hashes and counts the bytes it reads and compares them with the upload's
sha256 and size, so a blob that changed since upload is caught. Which format a file is read as:

* a declared specific type (`text/csv`, `application/x-ndjson`, `application/json` ...) is
  enforced: content that is not that format (invalid UTF-8, a malformed record, a line too long)
  is a `PermanentError` saying where and why;
* a declared generic text type (`text/*`) must be UTF-8; its shape is sniffed;
* anything else is read as what its content looks like; when a sniffed text format turns out
  wrong further in, the file is read again as plain text, then as binary, with a note.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import hashlib
import io
import itertools
import math
import operator
import re
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO, Final, TypeVar

import orjson

from contracts.files import (
    MAX_COLUMNS,
    MAX_NOTES,
    ColumnKind,
    ColumnStats,
    FileAnalysis,
    FileFormat,
)
from services.blobs import BlobNotFound, BlobStore, InvalidBlobKey
from services.messaging.errors import PermanentError
from services.processor.sniff import FORMAT_EXTENSIONS, FORMAT_TYPES, HEAD_SIZE, Sniffed, sniff
from services.processor.summary import finite_mean

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

READ_SIZE: Final = 1 << 20
MAX_LINE_BYTES: Final = 1 << 20
"""A CSV record or JSON line longer than this is refused, so that one line bounds memory."""
BATCH_ROWS: Final = 2048
"""Records handled together, column by column, so that builtins do the per-value work."""
BATCH_BYTES: Final = 1 << 20
"""A batch also ends once this much of the file went into it: parsed, a record can take many
times its text (a line of a million commas is a million cells; nested JSON ~20 times its size),
and 2048 such records of a megabyte each would take tens of GB."""
DISTINCT_CAP: Final = 10_000
"""Distinct values tracked per column; past it, `distinct` is a lower bound."""
JSON_PARSE_LIMIT: Final = 4 << 20
"""A JSON document up to this size is parsed whole; a larger one is analysed as text."""
MAX_NAME_LENGTH: Final = 256

DECLARED_FORMATS: Final[dict[str, FileFormat]] = {
    "text/csv": "csv",
    "application/csv": "csv",
    "text/tab-separated-values": "csv",
    "application/x-ndjson": "jsonl",
    "application/ndjson": "jsonl",
    "application/jsonl": "jsonl",
    "application/x-jsonlines": "jsonl",
    "application/jsonlines": "jsonl",
    "application/json": "json",
}
GENERIC_TYPES: Final = frozenset({"application/octet-stream", "binary/octet-stream"})


R = TypeVar("R")

_NUMBER = re.compile(r"\s*[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?\s*")
_NUMBER_START = frozenset("0123456789+-. \t")
_first = operator.itemgetter(0)


class NotThisFormat(Exception):
    """The content is not the format it is being read as; the message says where and why."""


# --- reading the blob -------------------------------------------------------------------------


class _HashingReader(io.RawIOBase):
    """Counts and hashes every byte read from the blob."""

    def __init__(self, file: BinaryIO) -> None:
        super().__init__()
        self._file = file
        self.size = 0
        self.hash = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        target = memoryview(buffer).cast("B")
        data = self._file.read(len(target))
        n = len(data)
        target[:n] = data
        self.size += n
        self.hash.update(data)
        return n

    def drain(self) -> None:
        """Read (and hash) what nobody read yet."""
        while chunk := self._file.read(READ_SIZE):
            self.size += len(chunk)
            self.hash.update(chunk)


@dataclass(frozen=True)
class _Blob:
    store: BlobStore
    key: str
    size: int
    sha256: str

    def open(self) -> BinaryIO:
        try:
            return self.store.open_blocking(self.key)
        except BlobNotFound as exc:
            raise PermanentError(
                f"the file is missing from blob storage (key {self.key!r})"
            ) from exc
        except InvalidBlobKey as exc:
            raise PermanentError(str(exc)) from exc

    def head(self) -> bytes:
        with self.open() as file:
            return file.read(HEAD_SIZE)

    @contextlib.contextmanager
    def read(self) -> Iterator[io.BufferedReader]:
        """The blob through a hashing reader; verified against the upload once fully read."""
        with self.open() as file:
            source = _HashingReader(file)
            yield io.BufferedReader(source, READ_SIZE)
            source.drain()
        if source.size != self.size or source.hash.hexdigest() != self.sha256:
            raise PermanentError(
                f"the stored file does not match its upload: {source.size} bytes with sha256 "
                f"{source.hash.hexdigest()}, expected {self.size} bytes with {self.sha256}"
            )


class _Blocks:
    """The blob as decoded text in blocks of whole lines (about READ_SIZE each).

    Lines are counted as they go; a block is decoded at once, and an invalid byte is reported
    with its line. A line longer than MAX_LINE_BYTES is refused, so one line bounds memory.
    """

    def __init__(self, raw: io.BufferedReader) -> None:
        self._raw = raw
        self.lines = 0
        self.taken = 0
        """Bytes of the blocks handed out so far."""

    def __iter__(self) -> Iterator[str]:
        carry = b""
        first = True
        while chunk := self._raw.read(READ_SIZE):
            data = carry + chunk if carry else chunk
            first_end = data.find(b"\n")
            if (first_end if first_end >= 0 else len(data)) > MAX_LINE_BYTES:
                raise NotThisFormat(f"line {self.lines + 1} is longer than {MAX_LINE_BYTES} bytes")
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                carry = data
                continue
            block, carry = data[:cut], data[cut:]
            self.taken += cut
            yield self._decode(block, first)
            self.lines += block.count(b"\n")
            first = False
        if carry:
            self.taken += len(carry)
            yield self._decode(carry, first)
            self.lines += 1  # a last line without a line end

    def _decode(self, block: bytes, first: bool) -> str:
        try:
            text = block.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = self.lines + block.count(b"\n", 0, exc.start) + 1
            column = exc.start - (block.rfind(b"\n", 0, exc.start) + 1) + 1
            raise NotThisFormat(
                f"not valid UTF-8 on line {line} (byte {column} of the line): {exc.reason}"
            ) from exc
        return text.removeprefix("\ufeff") if first else text

    def lines_of(self) -> Iterator[str]:
        """Every line, with its line end (only `\\n` ends a line, as the csv module expects)."""
        return itertools.chain.from_iterable(io.StringIO(block, newline="\n") for block in self)


def _not_utf8(exc: UnicodeDecodeError, where: str) -> NotThisFormat:
    return NotThisFormat(f"not valid UTF-8 {where}: {exc.reason}")


# --- per-column statistics --------------------------------------------------------------------


def _finite_mean(numbers: list[float]) -> tuple[list[float], float]:
    """The numbers without NaN and infinities, and their mean (nan if none is left). One exact
    sum in the common case; `finite_mean` only where it overflowed or found a non-finite."""
    try:
        total = math.fsum(numbers)
    except (OverflowError, ValueError):  # out of range, or inf - inf
        total = math.nan
    if math.isfinite(total):
        return numbers, total / len(numbers) if numbers else math.nan
    numbers = [n for n in numbers if math.isfinite(n)]
    return numbers, finite_mean(numbers) if numbers else math.nan


def _digest(value: Hashable) -> int:
    """What stands for a distinct JSON scalar: its hash, with its type for a number or a bool
    (`hash(1) == hash(1.0) == hash(True)`), and -1 told from -2 (`hash` gives -2 for both)."""
    if type(value) is str:
        return hash(value)
    return hash((type(value), value if value != -1 else "-1"))


def _numbers_in(cells: list[str]) -> list[float]:
    """The cells that are decimal numbers, as numbers: starting as one (`_NUMBER_START`) and read
    by `float`, or, where it reads more than the decimal pattern ("1_000"), matching that. The
    same cell is a number or not whatever its neighbours."""
    if "_" not in "".join(cells):
        candidates = (
            cells
            if all(map(_NUMBER_START.__contains__, map(_first, cells)))  # the common case
            else [cell for cell in cells if cell[0] in _NUMBER_START]
        )
        try:
            return list(map(float, candidates))
        except ValueError:  # some are not numbers
            pass
    return [float(cell) for cell in cells if cell[0] in _NUMBER_START and _NUMBER.fullmatch(cell)]


class _Column:
    """Statistics of one column, fed a batch of values at a time (builtins do most work)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.count = self.numbers = self.strings = self.booleans = self.nested = 0
        self.mean = math.nan  # of the numbers so far, merged batch by batch
        self.low = math.inf
        self.high = -math.inf
        self.hashes: set[int] = set()
        self.capped = False

    def _add_numbers(self, numbers: list[float]) -> int:
        numbers, mean = _finite_mean(numbers)
        if numbers:
            self.numbers += len(numbers)
            # A running mean, each batch's weighted by its share: finite where a running sum
            # would not be, and constant memory (a list of the batches' means grew ~30 MB per
            # GB of numbers).
            share = len(numbers) / self.numbers
            self.mean = mean if share == 1 else self.mean * (1 - share) + mean * share
            self.low = min(self.low, min(numbers))
            self.high = max(self.high, max(numbers))
        return len(numbers)

    def _add_distinct(self, digests: list[int]) -> None:
        """Count distinct values by their hashes, not the values: memory per column is bounded
        by the cap, whatever the values' size."""
        if self.capped:
            return
        hashes = self.hashes
        if len(hashes) + len(digests) <= DISTINCT_CAP:
            hashes.update(digests)
            return
        for digest in digests:
            if len(hashes) < DISTINCT_CAP:
                hashes.add(digest)
            elif digest not in hashes:
                self.capped = True
                return

    def add_texts(self, values: Sequence[str]) -> None:
        """CSV cells: empty (or blank) is null; a finite number is a number; else a string."""
        present = list(filter(str.strip, values))
        self.count += len(present)
        numbers = _numbers_in(present)
        self.strings += len(present) - self._add_numbers(numbers)  # "nan", "inf": strings
        self._add_distinct(list(map(hash, present)))

    def add_json(self, values: Sequence[object]) -> None:
        """JSON values: null is null; bool, number, string; objects and arrays are nested."""
        present = [value for value in values if value is not None]
        self.count += len(present)
        numbers: list[float] = []
        scalars: list[Hashable] = []
        for value in present:
            kind = type(value)
            if kind is float or kind is int:
                numbers.append(float(value))  # type: ignore[arg-type]
            elif kind is str:
                self.strings += 1
            elif kind is bool:
                self.booleans += 1
            else:
                self.nested += 1
                continue  # objects and arrays are not counted as distinct values
            scalars.append(value)
        self._add_numbers(numbers)
        self._add_distinct(list(map(_digest, scalars)))

    def kind(self) -> ColumnKind:
        counted: tuple[tuple[ColumnKind, int], ...] = (
            ("number", self.numbers),
            ("string", self.strings),
            ("boolean", self.booleans),
            ("nested", self.nested),
        )
        kinds = [kind for kind, n in counted if n]
        if not kinds:
            return "null"
        return kinds[0] if len(kinds) == 1 else "mixed"

    def stats(self, records: int, name: str) -> ColumnStats:
        numbers = self.numbers > 0
        # Within the values, where merging the batches' means may round it out by an ulp
        # (3,000 values of float's largest came out just below their minimum).
        mean = min(max(self.mean, self.low), self.high) if numbers else math.nan
        return ColumnStats(
            name=name,
            kind=self.kind(),
            count=self.count,
            nulls=max(records - self.count, 0),
            min=self.low if numbers else None,
            max=self.high if numbers else None,
            mean=mean if math.isfinite(mean) else None,
            distinct=len(self.hashes),
            distinct_capped=self.capped,
        )


def _column_stats(columns: list[_Column], records: int) -> list[ColumnStats]:
    """Stats with unique, bounded, non-empty names."""
    seen: set[str] = set()
    out = []
    for index, column in enumerate(columns, start=1):
        name = column.name.strip()[:MAX_NAME_LENGTH] or f"column_{index}"
        if name in seen:  # `_<index>`, or the next number free (a column may be named so)
            stem = name[: MAX_NAME_LENGTH - 12]
            name = next(c for n in itertools.count(index) if (c := f"{stem}_{n}") not in seen)
        seen.add(name)
        out.append(column.stats(records, name))
    return out


# --- the formats ------------------------------------------------------------------------------


@dataclass
class _Result:
    line_count: int | None = None
    record_count: int | None = None
    column_count: int | None = None
    delimiter: str | None = None
    header: bool | None = None
    columns: list[ColumnStats] = field(default_factory=list)
    columns_truncated: bool = False
    notes: list[str] = field(default_factory=list)


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def _looks_like_header(row: list[str]) -> bool:
    cells = [cell.strip() for cell in row]
    return all(cells) and not any(_is_number(c) for c in cells) and len(set(cells)) == len(cells)


def _batches(rows: Iterator[R], source: _Blocks | None = None) -> Iterator[list[R]]:
    """`rows` in batches of at most BATCH_ROWS, each ending as well once `source` (if the rows
    are read from one) handed out BATCH_BYTES since it began (a batch then holds the records of
    at most about two blocks)."""

    def taken() -> int:
        return 0 if source is None else source.taken

    batch: list[R] = []
    start = taken()
    for row in rows:
        batch.append(row)
        if len(batch) >= BATCH_ROWS or taken() - start >= BATCH_BYTES:
            yield batch
            batch = []
            start = taken()
    if batch:
        yield batch


class _RecordLines:
    """Lines for the csv reader, refusing a record longer than MAX_LINE_BYTES characters: a
    quoted field may hold line ends, so one record can run over any number of lines, each
    short enough for `_Blocks`, and the reader keeps all of its fields until it ends (a 64 MiB
    file of one record took ~1 GiB)."""

    def __init__(self, lines: Iterator[str]) -> None:
        self._lines = lines
        self._pending = 0  # characters read since the last record ended

    def __iter__(self) -> Iterator[str]:
        for line in self._lines:
            self._pending += len(line)
            if self._pending > MAX_LINE_BYTES + 1:  # the last line end not counted, as by _Blocks
                raise NotThisFormat(f"a record is longer than {MAX_LINE_BYTES} characters")
            yield line

    def records(self, reader: Iterator[list[str]]) -> Iterator[list[str]]:
        for row in reader:
            self._pending = 0
            yield row


def _csv_error(exc: csv.Error) -> str:
    """The csv module's message, but for a carriage return outside quotes, where it would
    advise Python's universal-newline mode."""
    if "new-line character seen in unquoted field" in str(exc):
        return (
            "a carriage return (CR) outside quotes; lines must end in LF or CRLF "
            "(CR alone, as classic Mac OS ended lines, is not read)"
        )
    return str(exc)


def analyse_csv(raw: io.BufferedReader, delimiter: str) -> _Result:
    blocks = _Blocks(raw)
    lines = _RecordLines(blocks.lines_of())
    reader = csv.reader(lines, delimiter=delimiter, strict=True)
    rows: Iterator[list[str]] = filter(None, lines.records(reader))  # blank lines: no records
    columns: list[_Column] = []
    first_width = widest = records = ragged = 0
    try:
        first = next(rows, None)
        header = first is not None and _looks_like_header(first)
        if first is not None:
            first_width = widest = len(first)
            columns = [_Column(name if header else "") for name in first[:MAX_COLUMNS]]
            if not header:
                rows = itertools.chain([first], rows)
        for batch in _batches(rows, blocks):
            records += len(batch)
            width = max(map(len, batch))
            if width != first_width or min(map(len, batch)) != first_width:
                ragged += sum(1 for row in batch if len(row) != first_width)
                widest = max(widest, width)
                columns.extend(_Column("") for _ in range(len(columns), min(widest, MAX_COLUMNS)))
            for column, values in zip(
                columns, itertools.zip_longest(*batch, fillvalue=""), strict=False
            ):
                column.add_texts(values)
    except csv.Error as exc:
        raise NotThisFormat(f"malformed CSV at line {reader.line_num}: {_csv_error(exc)}") from exc
    notes = []
    if ragged:
        notes.append(f"{ragged} records do not have the {first_width} fields of the first row")
    if widest > MAX_COLUMNS:
        notes.append(f"{widest} columns: only the first {MAX_COLUMNS} are described")
    return _Result(
        line_count=blocks.lines,
        record_count=records,
        column_count=widest,
        delimiter=delimiter,
        header=header,
        columns=_column_stats(columns, records),
        columns_truncated=widest > MAX_COLUMNS,
        notes=notes,
    )


def _records(values: Iterator[object], source: _Blocks | None = None) -> _Result:
    """Columns of a stream of JSON values: each object's keys are its columns."""
    columns: dict[str, _Column] = {}
    records = others = 0
    truncated = False
    for batch in _batches(values, source):
        records += len(batch)
        by_key: dict[str, list[object]] = {}
        for value in batch:
            if type(value) is not dict:
                others += 1
                continue
            for key, item in value.items():
                by_key.setdefault(key, []).append(item)
        for key, items in by_key.items():
            column = columns.get(key)
            if column is None:
                if len(columns) >= MAX_COLUMNS:
                    truncated = True
                    continue
                column = columns[key] = _Column(key)
            column.add_json(items)
    notes = [f"{others} records are not JSON objects"] if others else []
    if truncated:
        notes.append(
            f"more than {MAX_COLUMNS} distinct keys; the first {MAX_COLUMNS} are described"
        )
    return _Result(
        record_count=records,
        column_count=len(columns),
        columns=_column_stats(list(columns.values()), records),
        columns_truncated=truncated,
        notes=notes,
    )


def analyse_jsonl(raw: io.BufferedReader) -> _Result:
    blocks = _Blocks(raw)

    def values() -> Iterator[object]:
        for block in blocks:
            for offset, line in enumerate(block.split("\n")):
                if line.strip():
                    try:
                        yield orjson.loads(line)
                    except orjson.JSONDecodeError as exc:
                        where = blocks.lines + offset + 1
                        raise NotThisFormat(f"line {where} {_json_problem(exc)}") from exc

    result = _records(values(), blocks)
    result.line_count = blocks.lines
    return result


def analyse_text(raw: io.BufferedReader) -> _Result:
    """UTF-8 validity and line count, a chunk at a time (lines may be of any length)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    lines = offset = 0
    last = b"\n"
    while chunk := raw.read(READ_SIZE):
        pending = len(decoder.getstate()[0])  # bytes of a character cut by the last chunk
        try:
            decoder.decode(chunk)
        except UnicodeDecodeError as exc:
            raise _not_utf8(exc, f"at byte {offset - pending + exc.start}") from exc
        lines += chunk.count(b"\n")
        last = chunk[-1:]
        offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        raise _not_utf8(exc, "at the end (a cut character)") from exc
    return _Result(line_count=lines + (last != b"\n"))


def _json_problem(exc: orjson.JSONDecodeError) -> str:
    """What is wrong with JSON orjson refused. A number beyond a double's range (1e400, a
    400-digit integer) is valid JSON that no analysis can represent, not a syntax error."""
    if "infinity" in exc.msg:
        return f"holds a number beyond a double's range ({exc})"
    return f"is not valid JSON: {exc}"


def analyse_json(raw: io.BufferedReader, size: int, *, declared: bool = True) -> _Result:
    """A JSON document, parsed whole up to JSON_PARSE_LIMIT; a larger one declared as JSON is
    read as text, and one only sniffed as JSON is not taken for it (it may be JSON lines whose
    first lines outgrew the sniffed head)."""
    if size > JSON_PARSE_LIMIT:
        if not declared:
            raise NotThisFormat(f"larger than {JSON_PARSE_LIMIT} bytes: not parsed as one document")
        result = analyse_text(raw)
        result.notes.append(
            f"larger than {JSON_PARSE_LIMIT} bytes: read as text, the structure not validated"
        )
        return result
    body = raw.read(JSON_PARSE_LIMIT + 1)
    try:
        value = orjson.loads(body.removeprefix(codecs.BOM_UTF8))
    except orjson.JSONDecodeError as exc:
        raise NotThisFormat(f"the document {_json_problem(exc)}") from exc
    lines = body.count(b"\n") + (not body.endswith(b"\n") and bool(body))
    result = _records(iter(value)) if isinstance(value, list) else _Result()
    result.line_count = lines
    return result


def analyse_binary(raw: io.BufferedReader) -> _Result:
    return _Result()  # the reader drains and verifies it


# --- choosing and running -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Attempt:
    format: FileFormat
    strict: bool
    delimiter: str | None = None


def plan(declared: str, sniffed: Sniffed) -> list[_Attempt]:
    """Which formats to read the file as, in order; a strict one fails permanently."""
    fmt = DECLARED_FORMATS.get(declared)
    if fmt == "csv":
        delimiter = "\t" if declared == "text/tab-separated-values" else sniffed.delimiter
        return [_Attempt("csv", True, delimiter or ",")]
    if fmt is not None:
        return [_Attempt(fmt, True)]
    shapes = [_Attempt(sniffed.format, False, sniffed.delimiter)]
    if sniffed.format == "json":
        # Or the head held less than two whole lines: JSON lines with long lines look the same.
        shapes.append(_Attempt("jsonl", False))
    if declared.startswith("text/"):
        shaped = [] if sniffed.format in ("text", "binary") else shapes
        return [*shaped, _Attempt("text", True)]
    attempts = shapes
    if sniffed.format in ("csv", "jsonl", "json"):
        attempts.append(_Attempt("text", False))
    if sniffed.format != "binary":
        attempts.append(_Attempt("binary", False))
    return attempts


def _run(attempt: _Attempt, raw: io.BufferedReader, size: int) -> _Result:
    readers: dict[FileFormat, Callable[[], _Result]] = {
        "csv": lambda: analyse_csv(raw, attempt.delimiter or ","),
        "jsonl": lambda: analyse_jsonl(raw),
        "json": lambda: analyse_json(raw, size, declared=attempt.strict),
        "text": lambda: analyse_text(raw),
        "binary": lambda: analyse_binary(raw),
    }
    return readers[attempt.format]()


def analyse_file(
    store: BlobStore, key: str, declared_type: str, size: int, sha256: str
) -> FileAnalysis:
    """Analyse the blob `key` (uploaded as `declared_type`, `size` bytes, `sha256`)."""
    csv.field_size_limit(MAX_LINE_BYTES)
    blob = _Blob(store, key, size, sha256)
    head = blob.head()
    sniffed = sniff(head, whole=len(head) < HEAD_SIZE)
    notes: list[str] = []
    if (
        size > 0  # no content looks like anything
        and declared_type not in GENERIC_TYPES
        and declared_type != sniffed.media_type
        # Another name of the same format (`application/jsonl`) is no difference to note.
        and DECLARED_FORMATS.get(declared_type) != sniffed.format
    ):
        notes.append(f"declared {declared_type}; the content looks like {sniffed.media_type}")
    for attempt in plan(declared_type, sniffed):
        try:
            with blob.read() as raw:
                result = _run(attempt, raw, size)
        except NotThisFormat as exc:
            if attempt.strict:
                raise PermanentError(f"unreadable as {declared_type}: {exc}") from exc
            notes.append(f"not {attempt.format} after all ({exc})")
            continue
        same = attempt.format == sniffed.format
        return FileAnalysis(
            detected_type=sniffed.media_type if same else FORMAT_TYPES[attempt.format],
            detected_extension=sniffed.extension if same else FORMAT_EXTENSIONS[attempt.format],
            format=attempt.format,
            encoding=None if attempt.format == "binary" else "utf-8",
            line_count=result.line_count,
            record_count=result.record_count,
            column_count=result.column_count,
            delimiter=result.delimiter,
            header=result.header,
            columns=result.columns,
            columns_truncated=result.columns_truncated,
            notes=[note[:500] for note in [*notes, *result.notes]][:MAX_NOTES],
        )
    raise AssertionError("unreachable: the last attempt is binary or strict")
