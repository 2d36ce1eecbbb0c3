"""How much memory the gateway (and the processor) needs for a 1 GB file upload.

    python -m bench.upload_memory                    # 1 GB CSV; gateway and processor
    python -m bench.upload_memory --size 200e6 --no-processor

Starts a real gateway process (and a processor) on the broker at `AMQP_URL` (default
127.0.0.1:5672) in a namespace of its own, then uploads a CSV file generated on the fly: the
request body is a generator of 1 MiB blocks, so this client never holds the file either. While
the upload runs, the gateway's resident memory is sampled from /proc/<pid>/status; its peak
(`VmHWM`, reset just before the upload where the kernel allows it) is compared with its memory
before the upload, and the upload's throughput is printed. With the processor, it then waits for
the analysis and reports the processor's and its pool workers' peak memory and the analysis time.
Not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_fixed

from bench.report import Result, save
from tests.conftest import LOCAL_URL, Namespace
from tests.support.processes import ServiceProcess, base_url, consumer, gateway

MiB = 1 << 20
MAX_GATEWAY_GROWTH = 32 * MiB
"""What an upload may add to the gateway's RSS, whatever its size: it streams to the blob store
(measured: 3.4 MiB for 1 GB). A buffered upload would grow by the file's size."""
BOUNDARY = "courier-bench-boundary"
SAMPLE_SECONDS = 0.02


def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes (empty if it is gone)."""
    figures: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return figures
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            figures[key] = int(value.split()[0]) * 1024
    return figures


def _reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs); False if not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _role(pid: int, main_pid: int) -> str:
    if pid == main_pid:
        return "main"
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return "?"
    if b"resource_tracker" in command:
        return "resource tracker"
    return "pool worker" if b"spawn_main" in command else "child"


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return found + [grandchild for child in found for grandchild in _children(child)]


@dataclass
class Sampler:
    """Samples the RSS of a process and its descendants in a thread; keeps each one's peak."""

    pid: int
    peaks: dict[int, int] = field(default_factory=dict)
    hwm: dict[int, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            for pid in (self.pid, *_children(self.pid)):
                figures = _status(pid)
                if "VmRSS" in figures:
                    self.peaks[pid] = max(self.peaks.get(pid, 0), figures["VmRSS"])
                    self.hwm[pid] = figures["VmHWM"]

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def csv_block() -> bytes:
    rows = [
        f"{i},item-{i % 5000},{(i * 7919) % 100_000 / 100:.2f},{i % 17},2024-01-{i % 28 + 1:02d}\n"
        for i in range(100_000)
    ]
    return "".join(rows).encode()[: 2 * MiB].rsplit(b"\n", 1)[0] + b"\n"


def multipart_body(block: bytes, blocks: int) -> tuple[Iterator[bytes], int]:
    """A multipart/form-data body with `blocks` copies of `block` as the file, and its length."""
    head = (
        f"--{BOUNDARY}\r\n"
        'Content-Disposition: form-data; name="file"; filename="generated.csv"\r\n'
        "Content-Type: text/csv\r\n\r\n"
    ).encode()
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    header = b"id,name,price,qty,date\n"

    def body() -> Iterator[bytes]:
        yield head + header
        for _ in range(blocks):
            yield block
        yield tail

    return body(), len(head) + len(header) + len(block) * blocks + len(tail)


def mib(n: int) -> str:
    return f"{n / MiB:8.1f} MiB"


def wait_for(check: Any, timeout: float) -> Any:
    for attempt in Retrying(
        stop=stop_after_delay(timeout),
        wait=wait_fixed(0.5),
        retry=retry_if_exception_type(AssertionError),
        reraise=True,
    ):
        with attempt:
            return check()
    raise AssertionError("unreachable")


def run(size: int, with_processor: bool, analysis_timeout: float) -> None:
    namespace = Namespace(LOCAL_URL)
    workdir = Path(tempfile.mkdtemp(prefix="courier-bench-"))
    env = namespace.env(
        COURIER_BLOB_DIR=str(workdir / "blobs"),
        COURIER_MAX_UPLOAD_BYTES=str(2 * size + 16 * MiB),
        COURIER_LOG_LEVEL="WARNING",
    )
    services: list[ServiceProcess] = [gateway(env, workdir)]
    if with_processor:
        services.append(consumer("processor", env, workdir))
    try:
        for service in services:
            service.start()
        for service in services:
            service.wait_ready(60)
        gateway_process = services[0].process
        assert gateway_process is not None
        pid = gateway_process.pid

        block = csv_block()
        blocks = math.ceil(size / len(block))
        body, length = multipart_body(block, blocks)
        before = _status(pid)
        reset = _reset_peak(pid)
        sampler = Sampler(pid).start()
        started = time.perf_counter()
        response = httpx.post(
            f"{base_url(services[0])}/v1/files",
            content=body,
            headers={
                "content-type": f"multipart/form-data; boundary={BOUNDARY}",
                "content-length": str(length),
            },
            timeout=httpx.Timeout(600),
        )
        elapsed = time.perf_counter() - started
        sampler.stop()
        after = _status(pid)
        assert response.status_code == 202, response.text
        file_id = response.json()["id"]
        stored = len(block) * blocks + len(b"id,name,price,qty,date\n")

        print(f"upload: {stored:,} bytes of CSV in {elapsed:.1f} s", end="")
        print(f" = {stored / elapsed / 1e6:.1f} MB/s ({length:,} bytes on the wire)")
        print("gateway memory (RSS):")
        print(f"  before the upload   {mib(before['VmRSS'])}")
        print(f"  peak, sampled       {mib(sampler.peaks.get(pid, 0))}  (every 20 ms)")
        peak_label = "peak, VmHWM" + ("" if reset else " (since start)")
        print(f"  {peak_label:<19} {mib(after['VmHWM'])}")
        print(f"  after the upload    {mib(after['VmRSS'])}")
        growth = max(sampler.peaks.get(pid, 0), after["VmHWM"] if reset else 0) - before["VmRSS"]
        print(f"  peak - before       {mib(growth)}  ({growth / stored:.4%} of the file)")
        if growth > MAX_GATEWAY_GROWTH:
            raise SystemExit(
                f"FAILED: the gateway grew {mib(growth).strip()} during the upload; "
                f"streaming keeps it under {mib(MAX_GATEWAY_GROWTH).strip()}"
            )
        print(f"  within the bound    {mib(MAX_GATEWAY_GROWTH)}  (asserted)")
        client_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(f"this client's peak RSS {mib(client_peak)}")
        results = [
            Result("upload throughput", "MB/s", stored / elapsed / 1e6, [stored / elapsed / 1e6]),
            Result("gateway peak RSS - before", "MiB", growth / MiB, [growth / MiB]),
        ]
        extra: dict[str, Any] = {
            "file_bytes": stored,
            "gateway": {
                "before_mib": before["VmRSS"] / MiB,
                "peak_mib": (before["VmRSS"] + growth) / MiB,
                "after_mib": after["VmRSS"] / MiB,
                "growth_of_file": growth / stored,
            },
        }

        if with_processor:
            processor_process = services[1].process
            assert processor_process is not None
            ppid = processor_process.pid
            before_tree = {p: _status(p).get("VmRSS", 0) for p in (ppid, *_children(ppid))}
            for p in before_tree:
                _reset_peak(p)
            sampler = Sampler(ppid).start()
            started = time.perf_counter()

            def analysed() -> dict[str, Any]:
                found: dict[str, Any] = httpx.get(
                    f"{base_url(services[0])}/v1/files/{file_id}", timeout=10
                ).json()
                assert found["status"] in ("succeeded", "dead_lettered"), found["status"]
                assert found["status"] == "dead_lettered" or found["analysis"] is not None
                return found

            found = wait_for(analysed, analysis_timeout)
            elapsed = time.perf_counter() - started
            sampler.stop()
            print(f"analysis: {found['status']} in {elapsed:.1f} s", end="")
            print(f" = {stored / elapsed / 1e6:.1f} MB/s (including the queue hop and polling)")
            analysis = found.get("analysis") or {}
            print(
                f"  {analysis.get('format')}: {analysis.get('record_count'):,} records, "
                f"{analysis.get('column_count')} columns"
            )
            print("processor memory (RSS), per process (main first, then pool workers):")
            roles: dict[str, int] = {}
            for p, peak in sorted(sampler.peaks.items(), key=lambda item: item[0] != ppid):
                start_rss = before_tree.get(p, 0)  # 0: the pool started the worker for this file
                top = max(peak, sampler.hwm[p])
                print(
                    f"  {_role(p, ppid):<16} before {mib(start_rss)}  peak {mib(top)}"
                    f"  peak - before {mib(top - start_rss)}"
                )
                role = f"processor {_role(p, ppid)}"
                roles[role] = roles.get(role, 0) + 1
                role += f" {roles[role]}" if role.endswith("worker") else ""
                results.append(Result(f"{role} peak RSS", "MiB", top / MiB, [top / MiB]))
            extra["analysis_seconds"] = elapsed
            extra["analysis_status"] = found["status"]
        print(f"saved {save('upload_memory', results, extra)}")
    finally:
        for service in services:
            if service.process is not None:
                service.kill()
        asyncio.run(namespace.cleanup())
        for path in sorted(workdir.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        workdir.rmdir()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size", type=float, default=1e9, help="bytes of file (default 1e9)")
    parser.add_argument("--no-processor", action="store_true", help="measure the upload only")
    parser.add_argument(
        "--analysis-timeout", type=float, default=1800, help="seconds to wait for the analysis"
    )
    args = parser.parse_args(argv)
    run(int(args.size), not args.no_processor, args.analysis_timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
