"""A blob the processor can start reading but not finish until the test says: a named pipe.

A file analysis that takes as long as the test wants, without a large file or a sleep: the
processor's worker opens the blob and waits in its first read; `taken` says it got that far;
`release` hands that read the bytes and puts a regular file with them in the pipe's place, for
every later open of the blob.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path


class HeldBlob:
    def __init__(self, path: Path, content: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(path)
        self.path = path
        self._content = content
        self._writer: int | None = None
        self._released = False

    def taken(self) -> bool:
        """True once a reader opened the pipe. The first call to find one becomes its writer,
        so the reader waits in its read (a writer that closed would hand it an empty file)."""
        if self._writer is None:
            try:
                self._writer = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: nobody has it open for reading
                    raise
                return False
        return True

    def release(self) -> None:
        """The bytes to the read in progress; a regular file with them for any later open."""
        assert self._writer is not None, "release after taken()"
        staged = self.path.with_name(f"{self.path.name}.staged")
        staged.write_bytes(self._content)
        os.replace(staged, self.path)  # the open pipe stays the reader's
        self._released = True
        writer, self._writer = self._writer, None
        try:
            os.set_blocking(writer, True)
            os.write(writer, self._content)  # a pipe's buffer (64 KiB) takes it whole
        finally:
            os.close(writer)

    def close(self) -> None:
        """A reader still waiting gets an empty file, and the pipe is removed."""
        if self._writer is not None:
            os.close(self._writer)
        elif not self._released:
            with contextlib.suppress(OSError):  # ENXIO: no reader waits in its open
                os.close(os.open(self.path, os.O_WRONLY | os.O_NONBLOCK))
        self.path.unlink(missing_ok=True)
