"""AMQP property and header decoding that never fails on a value, only on a broken frame.

pamqp (aiormq's codec) raises on a `timestamp` beyond `datetime`'s range (a producer that sent
microseconds), and on a short string or a header-table key that is not UTF-8. aiormq then
closes the whole connection: every delivery in flight on it comes back, each spending a
delivery count and running its handler again, and the malformed message, delivered first once
more, does it again. On a queue without a delivery limit (a dead-letter queue) that never ends,
and a gateway whose drain shares the publisher's connection stops accepting events. RabbitMQ
passes such values through unchecked, so any producer can send one.

Decoded here instead, such a message is delivered like any other (its event then fails
validation, or the odd property is ignored): one message's problem. And a long string that is
not UTF-8 decodes to a `bytearray`, which pamqp encodes again (it refuses `bytes`), so its
retry copy or dead letter can be published with the header as sent.

`install` is called once, when `services.messaging` is imported: before any connection.
"""

from __future__ import annotations

import datetime
import struct

from pamqp import common, decode

_STRICT_TIMESTAMP = decode.timestamp
_STRICT_LONG_STR = decode.long_str


def timestamp(value: bytes) -> tuple[int, datetime.datetime | None]:
    """A timestamp; None (as if absent) for one `datetime` cannot hold."""
    try:
        return _STRICT_TIMESTAMP(value)
    except (ValueError, OverflowError, OSError):
        if len(value) < 8:
            raise  # cut short: a broken frame, not an odd value
        return 8, None


SHORT_STR_MAX = 255  # bytes of UTF-8


def short_str(value: bytes) -> tuple[int, str]:
    """A short string; bytes that are not UTF-8 become U+FFFD, cut to what a short string
    holds: each replacement takes three bytes where the byte it replaced took one, and a
    property that no longer fits could not be written again (a retry, a dead letter)."""
    try:
        length: int = common.Struct.byte.unpack(value[0:1])[0]
    except (struct.error, TypeError) as err:
        raise ValueError("Could not unpack short string value") from err
    raw = value[1 : length + 1]
    try:
        return length + 1, raw.decode("utf-8")
    except UnicodeDecodeError:
        read = raw.decode("utf-8", "replace")
        return length + 1, read.encode()[:SHORT_STR_MAX].decode("utf-8", "ignore")


def long_str(value: bytes) -> tuple[int, str | bytearray]:
    """A long string; one that is not UTF-8 as a `bytearray` (pamqp gives `bytes`, which it
    cannot encode again)."""
    consumed, decoded = _STRICT_LONG_STR(value)
    return consumed, bytearray(decoded) if isinstance(decoded, bytes) else decoded


def field_table(value: bytes) -> tuple[int, common.FieldTable]:
    """A field table (pamqp's, with keys that are not UTF-8 decoded with U+FFFD)."""
    try:
        length: int = common.Struct.integer.unpack(value[0:4])[0]
        offset = 4
        data: common.FieldTable = {}
        end = offset + length
        if end > len(value):
            raise ValueError("Field table length exceeds available data")
        while offset < end:
            key_length: int = common.Struct.byte.unpack_from(value, offset)[0]
            offset += 1
            if offset + key_length > end:
                raise ValueError("Field table key length exceeds data")
            key = value[offset : offset + key_length].decode("utf-8", "replace")
            offset += key_length
            consumed, result = decode.embedded_value(value[offset:])
            offset += consumed
            data[key] = result
        return end, data
    except (struct.error, TypeError) as err:
        raise ValueError("Could not unpack data") from err


def install() -> None:
    """Use these decoders wherever pamqp looks one up (idempotent)."""
    # pamqp's annotations promise a datetime and `bytes`; a property read as None is absent, as
    # pamqp's own unset ones are, and a `bytearray` is bytes to every reader.
    decode.timestamp = timestamp  # type: ignore[assignment]
    decode.short_str = short_str
    decode.long_str = long_str  # type: ignore[assignment]
    decode.field_table = field_table
    decode.METHODS.update(
        timestamp=timestamp, shortstr=short_str, longstr=long_str, table=field_table
    )
    decode.TABLE_MAPPING.update({b"T": timestamp, b"S": long_str, b"F": field_table})
