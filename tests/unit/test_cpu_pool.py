"""The CPU pool: work runs in another process, and a dead worker does not break the pool."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.context import SpawnProcess
from pathlib import Path

import pytest

from services.messaging.cpu import OUTCOMES_PREFIX, CpuPool, WorkerLost
from tests.support.polling import eventually


def square(n: int) -> int:
    return n * n


def die(code: int) -> int:
    os._exit(code)


def once_released(gate: str, value: int) -> int:
    """Work that is in flight until the test opens `gate` (a file)."""
    while not os.path.exists(gate):
        time.sleep(0.01)
    return value


async def test_work_runs_in_a_worker_process() -> None:
    pool = CpuPool(1)
    try:
        assert await pool.run(square, 7) == 49
    finally:
        pool.close()


async def test_a_worker_that_dies_is_a_transient_failure_and_the_pool_recovers() -> None:
    pool = CpuPool(1)
    try:
        with pytest.raises(WorkerLost):
            await pool.run(die, 9)
        assert await pool.run(square, 3) == 9
    finally:
        pool.close()


async def test_jobs_beside_a_dying_worker_run_again_and_only_its_own_job_fails(
    tmp_path: Path,
) -> None:
    pool = CpuPool(4)
    gate = tmp_path / "gate"
    try:
        neighbours = [asyncio.create_task(pool.run(once_released, str(gate), n)) for n in (1, 2, 3)]
        with pytest.raises(WorkerLost):
            await pool.run(die, 137)  # broke the pool under the neighbours, then died alone
        gate.touch()
        assert await asyncio.gather(*neighbours) == [1, 2, 3]
        assert await pool.run(square, 4) == 16
    finally:
        pool.close()


def timed(folder: str, name: str) -> str:
    """Work of 1 s that leaves when it ran in `folder`/`name` (start and end, monotonic)."""
    start = time.monotonic()
    time.sleep(1.0)
    Path(folder, name).write_text(f"{start} {time.monotonic()}")
    return name


def ran(folder: Path) -> list[tuple[float, ...]]:
    """When each `timed` job in `folder` ran."""
    return [tuple(map(float, p.read_text().split())) for p in folder.iterdir()]


async def test_jobs_running_again_alone_take_the_pools_room_not_more(tmp_path: Path) -> None:
    # While the jobs of the broken pool ran again, each in a process of its own, the new
    # pool took as many more: twice the work at once, right after a worker was killed.
    pool = CpuPool(2)
    try:
        dying = asyncio.create_task(pool.run(die, 137))
        jobs = [asyncio.create_task(pool.run(timed, str(tmp_path), f"j{n}")) for n in range(2)]
        with pytest.raises(WorkerLost):
            await dying  # the others run again alone meanwhile
        jobs += [asyncio.create_task(pool.run(timed, str(tmp_path), f"j{n}")) for n in (2, 3)]
        assert sorted(await asyncio.gather(*jobs)) == [f"j{n}" for n in range(4)]
    finally:
        pool.close()
    spans = ran(tmp_path)
    running_at = [sum(1 for s, e in spans if s <= start < e) for start, _ in spans]
    assert max(running_at) <= 2, spans


async def test_every_worker_starts_with_the_first_job() -> None:
    """CPython starts spawn workers on demand after waking the thread that watches them, which
    can then miss the death of the newest one: its jobs would wait for ever. All workers
    start with the first job instead (this pins the CPython internals that relies on)."""
    pool = CpuPool(3)
    try:
        assert await pool.run(square, 2) == 4
        workers = pool._executor._processes or {}
        assert len(workers) == 3 and all(p.is_alive() for p in workers.values())
    finally:
        pool.close()


async def test_workers_start_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Spawning a worker blocks the thread that does it for tens of milliseconds: never the
    event loop's, which must keep acking and heart-beating; nor when a broken pool is
    replaced or a job runs again alone."""
    started_on: list[int] = []
    start = SpawnProcess.start

    def recorded(process: SpawnProcess) -> None:
        started_on.append(threading.get_ident())
        start(process)

    monkeypatch.setattr(SpawnProcess, "start", recorded)
    pool = CpuPool(2)
    try:
        assert await pool.run(square, 5) == 25
        with pytest.raises(WorkerLost):
            await pool.run(die, 9)  # then runs again alone, in a process of its own
        assert await pool.run(square, 6) == 36  # on the replacement pool
    finally:
        pool.close()
    assert len(started_on) == 2 + 1 + 2
    assert threading.get_ident() not in started_on
    # One thread, alive as long as the pool: a worker ends with the thread that started it.
    assert len(set(started_on)) == 1


SERVICE = """
import asyncio, os, sys, time
from services.messaging.cpu import CpuPool
from tests.unit.test_cpu_pool import once_released

async def main():
    pool = CpuPool(2)
    job = asyncio.ensure_future(pool.run(once_released, sys.argv[1], 1))
    while len(pool._executor._processes or {}) < 2:  # started by the pool's launcher thread
        await asyncio.sleep(0.01)
    print(" ".join(str(pid) for pid in pool._executor._processes), flush=True)
    await job

asyncio.run(main())
"""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_killed_service_takes_its_workers_with_it(tmp_path: Path) -> None:
    # They went on with the abandoned job, then idled for ever: a few more at each crash.
    with subprocess.Popen(
        [sys.executable, "-c", SERVICE, str(tmp_path / "never")],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    ) as service:
        assert service.stdout is not None
        workers = [int(pid) for pid in service.stdout.readline().split()]
        assert len(workers) == 2 and all(alive(pid) for pid in workers)
        outcomes = f"{OUTCOMES_PREFIX}{service.pid}-*"
        assert list(Path(tempfile.gettempdir()).glob(outcomes))
        service.kill()
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in workers), "workers outlived their service"
    # Nor does the directory of its jobs' outcomes outlive the next pool's start (this one's,
    # or a pool's of a test beside it).
    CpuPool(1).close()
    assert not list(Path(tempfile.gettempdir()).glob(outcomes))


RESULT_BYTES = 1 << 20  # more than a pipe takes at once (a 1,000-field summary is ~90 kB)


def _kill_self_while_sending() -> None:
    main = threading.main_thread().ident
    assert main is not None
    while True:
        frame = sys._current_frames().get(main)
        while frame is not None:
            if frame.f_code.co_name in ("_send_bytes", "_send"):
                os.kill(os.getpid(), signal.SIGKILL)
            frame = frame.f_back


def big_result(marker: str) -> bytes:
    """A large result; the first time, its worker is killed while it sends it back."""
    if not os.path.exists(marker):
        Path(marker).touch()
        threading.Thread(target=_kill_self_while_sending, daemon=True).start()
    return b"x" * RESULT_BYTES


KILLED_WHILE_SENDING = """
import asyncio, sys
from services.messaging.cpu import CpuPool
from tests.unit.test_cpu_pool import RESULT_BYTES, big_result, square

async def main() -> None:
    pool = CpuPool(2)
    try:
        try:
            result = await asyncio.wait_for(pool.run(big_result, sys.argv[1]), 20)
            print("job returned", len(result) == RESULT_BYTES, flush=True)
        except TimeoutError:
            print("job hung", flush=True)
        try:
            print("next job", await asyncio.wait_for(pool.run(square, 5), 10), flush=True)
        except TimeoutError:
            print("next job hung", flush=True)
    finally:
        pool.close()

asyncio.run(main())
"""


def test_a_worker_killed_while_sending_its_result_back_hangs_nothing(tmp_path: Path) -> None:
    # The OOM killer strikes at a worker's peak memory: its result and the result's pickled
    # copy. Killed in the middle of writing it to the pool's pipe, it left the pool's manager
    # waiting for the rest for ever: the job and every later one hung, and the process could
    # not exit. (In a child process, so that a hang fails the test instead of hanging it.)
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_WHILE_SENDING, str(tmp_path / "killed-once")],
        cwd=Path(__file__).parents[2],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = child.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        out, _ = child.communicate()
        pytest.fail(f"the process did not end:\n{out}")
    assert (tmp_path / "killed-once").exists()  # the worker was killed once
    assert "job returned True" in out and "next job 25" in out, out
    assert child.returncode == 0, out


class Refusal(Exception):
    def __init__(self, code: int, why: str) -> None:  # two arguments: pickles, unpickles not
        super().__init__(f"{code} {why}")


def refuse() -> None:
    raise Refusal(550, "no such mailbox")


def refuse_plainly() -> None:
    raise ValueError("no such mailbox")


async def test_a_job_s_error_reaches_its_caller_with_where_it_was_raised() -> None:
    pool = CpuPool(1)
    try:
        with pytest.raises(ValueError, match="no such mailbox") as raised:
            await pool.run(refuse_plainly)
        assert "in refuse_plainly" in str(raised.value.__cause__)  # the worker's traceback
        assert await pool.run(square, 4) == 16
    finally:
        pool.close()


async def test_an_error_its_caller_cannot_rebuild_is_an_error_naming_it() -> None:
    pool = CpuPool(1)
    try:
        with pytest.raises(RuntimeError, match="cannot be read back") as raised:
            await pool.run(refuse)
        assert "Refusal: 550 no such mailbox" in str(raised.value.__cause__)
        assert await pool.run(square, 4) == 16  # the pool is whole
    finally:
        pool.close()


def deaf(folder: str) -> None:
    """Kills its worker the first time; run again alone, it ignores SIGTERM (as a library with
    a handler of its own may) and never ends."""
    died = Path(folder, "died")
    if not died.exists():
        died.touch()
        os._exit(9)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    Path(folder, "pid.tmp").write_text(str(os.getpid()))
    Path(folder, "pid.tmp").rename(Path(folder, "pid"))
    while True:
        time.sleep(1)


async def test_a_job_given_up_on_ends_with_its_worker_at_once_even_one_deaf_to_sigterm(
    tmp_path: Path,
) -> None:
    # Its worker was sent SIGTERM and joined on the event loop for 5 s (the loop neither
    # acking nor heart-beating), then left running for ever.
    pool = CpuPool(1)
    try:
        job = asyncio.create_task(pool.run(deaf, str(tmp_path)))

        async def started() -> int:
            assert (tmp_path / "pid").exists()
            return int((tmp_path / "pid").read_text())

        worker = await eventually(started)
        given_up = time.monotonic()
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        assert time.monotonic() - given_up < 1.0

        async def ended() -> None:
            assert not alive(worker)

        await eventually(ended)
    finally:
        pool.close()


async def test_a_ctrl_c_leaves_the_workers_to_the_service_s_drain(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C in a terminal signals the whole process group, workers included. The service
    drains its handlers on SIGINT; a worker that took it as its own KeyboardInterrupt killed
    the job being drained and printed a plain-text traceback among the JSON log lines."""
    pool = CpuPool(1)
    gate = tmp_path / "gate"
    try:
        await pool.run(square, 1)
        [worker] = list((pool._executor._processes or {}).values())
        assert worker.pid is not None
        job = asyncio.ensure_future(pool.run(once_released, str(gate), 5))
        await asyncio.sleep(0.2)  # the job is in the worker
        os.kill(worker.pid, signal.SIGINT)
        await asyncio.sleep(0.2)
        gate.touch()
        assert await job == 5  # without SIGINT ignored: a KeyboardInterrupt ends the test run
        assert worker.is_alive()
    finally:
        pool.close()
    assert "KeyboardInterrupt" not in capfd.readouterr().err
