"""File analysis: sniffing, per-format statistics in bounded memory, corrupt input refused."""

from __future__ import annotations

import hashlib
import math
import struct
import zlib
from pathlib import Path

import orjson
import pytest

from contracts.files import ColumnStats, FileAnalysis
from services.blobs import LocalBlobStore
from services.messaging.cpu import CpuPool
from services.messaging.errors import PermanentError
from services.processor.analysis import DISTINCT_CAP, analyse_file
from services.processor.sniff import sniff


def png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\x00\x00")
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


class Stored:
    def __init__(self, root: Path) -> None:
        self.store = LocalBlobStore(root)
        self.blobs: dict[str, tuple[int, str]] = {}

    def put(self, key: str, content: bytes) -> str:
        path = self.store.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        self.blobs[key] = (len(content), hashlib.sha256(content).hexdigest())
        return key

    def analyse(self, content: bytes, declared: str) -> FileAnalysis:
        key = self.put(f"k{len(self.blobs)}", content)
        size, sha256 = self.blobs[key]
        return analyse_file(self.store, key, declared, size, sha256)


@pytest.fixture
def stored(tmp_path: Path) -> Stored:
    return Stored(tmp_path)


def column(analysis: FileAnalysis, name: str) -> ColumnStats:
    [found] = [c for c in analysis.columns if c.name == name]
    return found


# --- what a file is --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "media_type", "fmt"),
    [
        (png(), "image/png", "binary"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", "application/pdf", "binary"),
        (bytes(range(256)) * 4, "application/octet-stream", "binary"),
        (b"a,b\n1,2\n3,4\n", "text/csv", "csv"),
        (b"a\tb\n1\t2\n", "text/tab-separated-values", "csv"),
        (b'{"a": 1}\n{"a": 2}\n', "application/x-ndjson", "jsonl"),
        (b'{\n  "a": [1, 2]\n}\n', "application/json", "json"),
        (b'{"a": 1}\n', "application/json", "json"),
        (b"Dear reader\nthis is prose\n", "text/plain", "text"),
        ("caf\u00e9 cr\u00e8me\n".encode(), "text/plain", "text"),
        # Characters `str.splitlines` splits at inside a JSON string or a CSV field, and a
        # quoted field over two lines: all were taken for plain text.
        ('{"a": "x\u2028y"}\n{"a": 2}\n'.encode(), "application/x-ndjson", "jsonl"),
        ('{"a": "x\u0085y"}\n{"a": 2}\n'.encode(), "application/x-ndjson", "jsonl"),
        (b'a,b\n"x\x0cy",1\nz,2\n', "text/csv", "csv"),
        (b'a,b\n"x\ny",1\n"z",2\n', "text/csv", "csv"),
        (b"a,b\r\n1,2\r\n3,4\r\n", "text/csv", "csv"),
        # Printable signatures (BMP, Windows executable, MP3, Ogg, Photoshop) at the start of
        # a header: each was taken for its binary format.
        (b"BMI,height\n22.5,180\n", "text/csv", "csv"),
        (b"MZ_code;region\n7;north\n", "text/csv", "csv"),
        (b"ID3,title\n1,x\n", "text/csv", "csv"),
        (b"OggS\tsize\n1\t2\n", "text/tab-separated-values", "csv"),
        # Signed but all text: the signature says more than "plain text" would.
        (b"%PDF-1.1\n1 0 obj\n<< /Type /Catalog >>\nendobj\n", "application/pdf", "binary"),
        (b"%!PS-Adobe-3.0\n/Times findfont\n", "application/postscript", "binary"),
    ],
)
def test_the_type_is_sniffed_from_the_content(content: bytes, media_type: str, fmt: str) -> None:
    sniffed = sniff(content, whole=True)
    assert (sniffed.media_type, sniffed.format) == (media_type, fmt)


def test_a_signature_beats_json_too_large_to_check_in_the_head() -> None:
    # RTF starts like a JSON object: beyond the head it was taken for JSON, then for text.
    rtf = b"{\\rtf1\\ansi\\deff0 {\\fonttbl {\\f0 Times;}}\n" + b"\\par text\n" * 20_000
    sniffed = sniff(rtf[:65_536], whole=False)
    assert (sniffed.format, sniffed.media_type) == ("binary", "application/rtf")


def test_a_character_cut_at_the_end_of_the_head_is_still_text() -> None:
    head = ("x" * 10 + "\u00e9").encode()[:-1]
    assert sniff(head, whole=False).format == "text"
    assert sniff(head, whole=True).format == "binary"


# --- CSV -------------------------------------------------------------------------------------


def test_a_csv_gets_records_columns_and_per_column_stats(stored: Stored) -> None:
    content = b'sku,price,note\r\na,10,x\r\nb,30,\r\na,,"multi\nline"\r\n'
    analysis = stored.analyse(content, "text/csv")
    assert analysis.format == "csv" and analysis.detected_type == "text/csv"
    assert (analysis.delimiter, analysis.header, analysis.encoding) == (",", True, "utf-8")
    assert (analysis.line_count, analysis.record_count, analysis.column_count) == (5, 3, 3)
    assert [c.name for c in analysis.columns] == ["sku", "price", "note"]
    sku, price, note = (column(analysis, n) for n in ("sku", "price", "note"))
    assert (sku.kind, sku.count, sku.nulls, sku.distinct, sku.mean) == ("string", 3, 0, 2, None)
    assert (price.kind, price.count, price.nulls) == ("number", 2, 1)
    assert (price.min, price.max, price.mean, price.distinct) == (10.0, 30.0, 20.0, 2)
    assert (note.kind, note.count, note.nulls) == ("string", 2, 1)
    assert not any(c.distinct_capped for c in analysis.columns)


def test_a_csv_without_a_header_gets_generated_column_names(stored: Stored) -> None:
    analysis = stored.analyse(b"1;2.5\n3;-1\n", "application/octet-stream")
    assert (analysis.format, analysis.delimiter, analysis.header) == ("csv", ";", False)
    assert [c.name for c in analysis.columns] == ["column_1", "column_2"]
    assert analysis.record_count == 2
    assert (analysis.columns[1].min, analysis.columns[1].max) == (-1.0, 2.5)


def test_fields_named_alike_get_unique_column_names(stored: Stored) -> None:
    # Names are trimmed: ` a` is a second `a`, renamed by its position, `a_3`, which the
    # second field holds already.
    analysis = stored.analyse(b'{"a": 1, "a_3": 2, " a": 3}\n{"a": 4}\n', "application/x-ndjson")
    assert [c.name for c in analysis.columns] == ["a", "a_3", "a_4"]


def test_a_csv_whose_lines_end_in_a_bare_carriage_return_is_refused_saying_so(
    stored: Stored,
) -> None:
    with pytest.raises(PermanentError) as refused:
        stored.analyse(b"a,b\r1,2\r3,4\r", "text/csv")
    assert "carriage return (CR) outside quotes" in str(refused.value)
    assert "universal-newline" not in str(refused.value)


def test_mixed_and_ragged_columns_are_reported(stored: Stored) -> None:
    analysis = stored.analyse(b"a,b\n1,x\nfoo,y,extra\n", "text/csv")
    assert column(analysis, "a").kind == "mixed"
    assert analysis.column_count == 3
    assert column(analysis, "column_3").count == 1
    assert any("do not have the 2 fields" in note for note in analysis.notes)


def test_distinct_values_are_bounded(stored: Stored) -> None:
    rows = [f"id-{i},{i % 3}" for i in range(DISTINCT_CAP + 500)]
    analysis = stored.analyse(("key,bucket\n" + "\n".join(rows)).encode(), "text/csv")
    key, bucket = column(analysis, "key"), column(analysis, "bucket")
    assert (key.distinct, key.distinct_capped, key.count) == (
        DISTINCT_CAP,
        True,
        DISTINCT_CAP + 500,
    )
    assert (bucket.distinct, bucket.distinct_capped) == (3, False)


def test_a_csv_value_is_a_number_or_a_string_whatever_its_neighbours(stored: Stored) -> None:
    # "1_000" was a number in a column of numbers and a string beside one that was not.
    analysis = stored.analyse(b"a,b\n1_000,1_000\n2,+x\n", "text/csv")
    assert (column(analysis, "a").kind, column(analysis, "b").kind) == ("mixed", "string")


def test_a_cell_in_other_digits_is_a_string_beside_numbers_or_text(stored: Stored) -> None:
    analysis = stored.analyse("a,b\n\u0661\u0662,\u0661\u0662\n3,x\n".encode(), "text/csv")
    assert (column(analysis, "a").kind, column(analysis, "b").kind) == ("mixed", "string")


def test_a_csv_line_of_exactly_the_limit_is_read(stored: Stored) -> None:
    from services.processor.analysis import MAX_LINE_BYTES

    line = b"a" * (MAX_LINE_BYTES - 2) + b",b"
    assert stored.analyse(b"h1,h2\n" + line + b"\n", "text/csv").record_count == 1


def test_json_values_that_hash_alike_are_still_distinct(stored: Stored) -> None:
    # Counted by `hash`: -1 and -2 hash alike, and so do 1, 1.0 and true.
    rows = [{"n": -1}, {"n": -2}, {"n": -1}, {"m": 1}, {"m": 1.0}, {"m": True}]
    analysis = stored.analyse(b"\n".join(orjson.dumps(r) for r in rows), "application/x-ndjson")
    assert column(analysis, "n").distinct == 2
    assert column(analysis, "m").distinct == 3


def test_a_column_with_exactly_the_cap_of_distinct_values_is_not_capped(stored: Stored) -> None:
    rows = "\n".join(f"v{i}" for i in range(DISTINCT_CAP))
    analysis = stored.analyse(("value\n" + rows + "\nv0\n").encode(), "text/csv")
    assert (analysis.columns[0].distinct, analysis.columns[0].distinct_capped) == (
        DISTINCT_CAP,
        False,
    )


# --- JSON lines, JSON, text, binary ----------------------------------------------------------


def test_json_lines_get_columns_from_object_keys(stored: Stored) -> None:
    lines = [
        {"id": 1, "ok": True, "tags": ["a"], "name": "x"},
        {"id": 2.5, "ok": False, "name": None},
        {"id": 3, "extra": "only here"},
    ]
    content = b"\n".join(orjson.dumps(line) for line in lines) + b"\n\n"
    analysis = stored.analyse(content, "application/x-ndjson")
    assert analysis.format == "jsonl"
    assert (analysis.line_count, analysis.record_count, analysis.column_count) == (4, 3, 5)
    ident, ok, tags, name = (column(analysis, n) for n in ("id", "ok", "tags", "name"))
    assert (ident.kind, ident.min, ident.max, ident.mean) == ("number", 1.0, 3.0, 6.5 / 3)
    assert (ok.kind, ok.count, ok.distinct, ok.mean) == ("boolean", 2, 2, None)
    assert (tags.kind, tags.count, tags.nulls) == ("nested", 1, 2)
    assert (name.kind, name.count, name.nulls) == ("string", 1, 2)


def test_a_json_array_of_objects_is_read_as_records(stored: Stored) -> None:
    analysis = stored.analyse(b'[{"a": 1}, {"a": 3, "b": "x"}]', "application/json")
    assert (analysis.format, analysis.record_count, analysis.line_count) == ("json", 2, 1)
    assert column(analysis, "a").mean == 2.0


def test_text_gets_a_line_count(stored: Stored) -> None:
    analysis = stored.analyse(
        "one line\nan\u00e9other\nlast without newline".encode(), "text/plain"
    )
    assert (analysis.format, analysis.line_count, analysis.record_count) == ("text", 3, None)
    assert analysis.columns == []


def test_binary_gets_its_type_from_magic_numbers(stored: Stored) -> None:
    analysis = stored.analyse(png(), "application/octet-stream")
    assert (analysis.format, analysis.detected_type) == ("binary", "image/png")
    assert (analysis.detected_extension, analysis.encoding, analysis.line_count) == (
        "png",
        None,
        None,
    )


def test_a_declared_type_that_differs_from_the_content_is_noted(stored: Stored) -> None:
    analysis = stored.analyse(png(), "image/jpeg")
    assert analysis.detected_type == "image/png"
    assert "declared image/jpeg; the content looks like image/png" in analysis.notes


def test_a_column_s_mean_stays_within_its_values(stored: Stored) -> None:
    # Merged batch by batch, the mean of 3,000 values of float's largest came out an ulp
    # below their minimum.
    content = b"x\n" + b"1.7976931348623157e308\n" * 3000
    stats = column(stored.analyse(content, "text/csv"), "x")
    assert stats.mean is not None and stats.min is not None and stats.max is not None
    assert stats.min <= stats.mean <= stats.max


@pytest.mark.parametrize("declared", ["application/jsonl", "application/ndjson"])
def test_another_name_of_the_content_s_format_is_no_difference(
    stored: Stored, declared: str
) -> None:
    analysis = stored.analyse(b'{"a": 1}\n{"a": 2}\n', declared)
    assert analysis.record_count == 2
    assert not [note for note in analysis.notes if "looks like" in note], analysis.notes


@pytest.mark.parametrize("lines", [50, 200])  # under and over the 4 MiB a document is parsed
def test_json_lines_too_long_for_the_sniffed_head_are_still_json_lines(
    stored: Stored, lines: int
) -> None:
    # Two whole lines did not fit in the 64 KiB head: taken for one JSON document, then read
    # as text (or, over 4 MiB, reported as JSON without a check), with no records.
    rows = [orjson.dumps({"n": i, "pad": "x" * 40_000}) for i in range(lines)]
    analysis = stored.analyse(b"\n".join(rows) + b"\n", "application/octet-stream")
    assert (analysis.format, analysis.record_count) == ("jsonl", lines)


def test_content_that_only_looked_like_csv_falls_back_to_binary(stored: Stored) -> None:
    content = b"a,b\n" + b"1,2\n" * 20_000 + b"\xff\xfe\x00binary tail"
    analysis = stored.analyse(content, "application/octet-stream")
    assert analysis.format == "binary"
    assert any(note.startswith("not csv after all (not valid UTF-8") for note in analysis.notes)


# --- corrupt or unreadable: permanent, with the reason ---------------------------------------


@pytest.mark.parametrize(
    ("content", "declared", "reason"),
    [
        (
            b"a,b\n1,2\n3,\xff\n",
            "text/csv",
            r"unreadable as text/csv: not valid UTF-8 on line 3 \(byte 3 of the line\)",
        ),
        (
            b'{"a": 1}\n{"a": \n',
            "application/x-ndjson",
            r"unreadable as application/x-ndjson: line 2 is not valid JSON",
        ),
        (b'a,"b\n1,2\n', "text/csv", r"malformed CSV"),
        (b'{"a": [1, 2}', "application/json", r"the document is not valid JSON"),
        # Valid JSON, yet no analysis can represent it: said so, not "not valid JSON".
        (b'[{"a": 1e400}]', "application/json", r"holds a number beyond a double's range"),
        (
            b'{"a": 1}\n{"a": 1' + b"0" * 400 + b"}\n",
            "application/x-ndjson",
            r"line 2 holds a number",
        ),
        (b"plain \xc3\x28 text", "text/plain", r"not valid UTF-8 at byte 6"),
        (b'{"a": "' + b"x" * (1 << 20) + b'"}\n', "application/x-ndjson", r"longer than"),
        # One record over many short lines (line ends inside quotes): the reader kept all its
        # fields, ~14x the file's size in memory.
        (b"a,b\n" + b'"x\n",' * (1 << 18) + b"1\n", "text/csv", r"a record is longer than"),
    ],
)
def test_corrupt_content_is_a_permanent_failure(
    stored: Stored, content: bytes, declared: str, reason: str
) -> None:
    with pytest.raises(PermanentError, match=reason):
        stored.analyse(content, declared)


def test_a_missing_blob_is_a_permanent_failure(stored: Stored) -> None:
    with pytest.raises(PermanentError, match="missing from blob storage"):
        analyse_file(stored.store, "gone", "text/csv", 3, "0" * 64)


def test_a_blob_that_changed_since_upload_is_a_permanent_failure(stored: Stored) -> None:
    key = stored.put("changed", b"a,b\n1,2\n")
    _, sha256 = stored.blobs[key]
    stored.store.path(key).write_bytes(b"a,b\n1,3\n")
    with pytest.raises(PermanentError, match="does not match its upload"):
        analyse_file(stored.store, key, "text/csv", 8, sha256)


async def test_the_analysis_runs_in_a_worker_process(stored: Stored) -> None:
    key = stored.put("pooled", b"x,y\n1,2\n")
    size, sha256 = stored.blobs[key]
    pool = CpuPool(1)
    try:
        analysis = await pool.run(analyse_file, stored.store, key, "text/csv", size, sha256)
        assert analysis.record_count == 1
        with pytest.raises(PermanentError, match="missing"):
            await pool.run(analyse_file, stored.store, "absent", "text/csv", size, sha256)
    finally:
        pool.close()


def _peak_rss_growth_mib(kind: str, lines: int, root: str) -> float:
    """In a fresh process: analyse `lines` maximal lines that parse to many times their size
    (nested JSON, or a CSV record of empty cells); how much the peak RSS grew, in MiB."""
    import resource

    from services.processor.analysis import MAX_LINE_BYTES

    room = MAX_LINE_BYTES - 64
    if kind == "jsonl":
        line, declared = (
            b'{"a":[' + b",".join([b"[]"] * (room // 3)) + b"]}\n",
            "application/x-ndjson",
        )
    else:
        line, declared = b"," * room + b"\n", "text/csv"
    stored = Stored(Path(root))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    analysis = stored.analyse(line * lines, declared)
    assert analysis.record_count == lines
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_memory_does_not_grow_with_records_that_parse_large(kind: str, tmp_path: Path) -> None:
    # Before batches were bounded by bytes, 2048 such records were held at once: a 32 MiB file
    # of them took ~800 MiB, a 1 GiB upload ~23 GiB.
    import concurrent.futures
    import multiprocessing

    spawn = multiprocessing.get_context("spawn")
    growth = {}
    for lines in (4, 24):
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
            root = tmp_path / str(lines)
            growth[lines] = pool.submit(_peak_rss_growth_mib, kind, lines, str(root)).result()
    assert growth[24] < growth[4] + 48, growth


def test_a_column_mean_is_given_where_its_sum_overflows(stored: Stored) -> None:
    rows = [{"big": 1e308}] * 3000  # more than a batch: the batches' sums overflow too
    analysis = stored.analyse(b"\n".join(orjson.dumps(r) for r in rows), "application/x-ndjson")
    assert column(analysis, "big").mean == pytest.approx(1e308)


def test_a_column_of_the_largest_double_has_it_as_its_mean(stored: Stored) -> None:
    # Three of them made the mean's fallback overflow: retried as transient, never analysed.
    largest = "1.7976931348623157e308"
    analysis = stored.analyse(("big\n" + f"{largest}\n" * 3).encode(), "text/csv")
    assert column(analysis, "big").mean == float(largest)


def test_a_column_mean_over_many_batches_of_different_sizes_is_exact_enough(stored: Stored) -> None:
    # The running mean, merged batch by batch, stays exact (it replaced a list of every
    # batch's mean, ~30 MB per GB of numbers).
    rows = [{"n": float(i % 97) + 0.25} for i in range(7001)]  # batches of 2048 and a rest
    analysis = stored.analyse(b"\n".join(orjson.dumps(r) for r in rows), "application/x-ndjson")
    expected = math.fsum(r["n"] for r in rows) / len(rows)
    assert column(analysis, "n").mean == pytest.approx(expected, rel=1e-12)


def test_a_column_mean_of_batches_at_opposite_ends_of_the_range_is_finite(stored: Stored) -> None:
    rows = [{"n": -1.5e308}] * 3000 + [{"n": 1.5e308}] * 3000  # batches of one sign each
    analysis = stored.analyse(b"\n".join(orjson.dumps(r) for r in rows), "application/x-ndjson")
    assert column(analysis, "n").mean == pytest.approx(0.0, abs=1e295)


@pytest.mark.parametrize("declared", ["text/csv", "application/x-ndjson"])
def test_an_empty_file_is_not_noted_as_looking_like_another_type(
    stored: Stored, declared: str
) -> None:
    # Read as declared, yet noted "the content looks like text/plain": no content looks like
    # anything.
    analysis = stored.analyse(b"", declared)
    assert not any("looks like" in note for note in analysis.notes), analysis.notes
