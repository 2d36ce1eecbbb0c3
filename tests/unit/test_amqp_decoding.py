"""Decoding AMQP values: an odd value is read, only a broken frame is refused."""

from __future__ import annotations

import struct

import pytest
from pamqp import decode, encode

import services.messaging  # noqa: F401  # installs the decoders
from services.messaging import amqp_decoding


def test_the_decoders_are_the_ones_pamqp_uses() -> None:
    assert decode.METHODS["timestamp"] is amqp_decoding.timestamp
    assert decode.TABLE_MAPPING[b"F"] is amqp_decoding.field_table


def test_a_timestamp_beyond_datetime_reads_as_absent() -> None:
    microseconds = struct.pack(">Q", 1_767_323_045 * 1_000_000)
    assert decode.by_type(microseconds, "timestamp") == (8, None)


def test_a_timestamp_cut_short_is_still_a_broken_frame() -> None:
    with pytest.raises(ValueError, match="timestamp"):
        decode.by_type(b"\x00\x01", "timestamp")


def test_a_short_string_that_is_not_utf8_reads_with_replacement_characters() -> None:
    assert decode.by_type(b"\x03a\xffb", "shortstr") == (4, "a\ufffdb")


def test_a_short_string_that_is_not_utf8_is_cut_to_what_a_short_string_holds() -> None:
    # 200 bytes, each read as U+FFFD (3 bytes): written again, it would not fit.
    consumed, read = amqp_decoding.short_str(b"\xc8" + b"\xff" * 200)
    assert consumed == 201 and read == "\ufffd" * 85
    assert decode.by_type(encode.short_string(read), "shortstr") == (256, read)


def test_a_table_with_keys_and_values_that_are_not_utf8_reads_and_encodes_again() -> None:
    table = b"\x02k\xffS\x00\x00\x00\x02\xff\xfe"
    raw = struct.pack(">I", len(table)) + table
    consumed, headers = decode.by_type(raw, "table")
    assert consumed == len(raw) and headers == {"k\ufffd": bytearray(b"\xff\xfe")}
    assert isinstance(headers, dict)
    assert decode.by_type(encode.field_table(headers), "table")[1] == headers
