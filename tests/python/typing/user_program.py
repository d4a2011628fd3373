"""A small user program with type annotations, checked by mypy --strict against ringpool's package
(tests/python/test_typing.py): what a user's type checker sees of ringpool's public API."""
from __future__ import annotations

import queue
from concurrent.futures import Future, as_completed
from typing import Iterator

import ringpool
from ringpool.connection import Connection


def square(x: int) -> int:
    return x * x


def label(x: int, prefix: str = "#") -> str:
    return f"{prefix}{x}"


def pipes() -> tuple[Connection, Connection]:
    return ringpool.Pipe(duplex=False)


def main() -> int:
    ctx: ringpool.RingpoolContext = ringpool.get_context(preload=("json",), spares=2, ready_timeout=60.0)
    ctx.ensure_running()
    q: ringpool.Queue = ctx.Queue(maxsize=10)
    q.put({"x": 1}, timeout=1.0)
    q.put_many(range(3))
    got: list[object] = q.get_many(8, timeout=5.0)
    try:
        q.get_nowait()
    except queue.Empty:
        pass
    sq = ringpool.SimpleQueue()
    sq.put("hello")
    reader, writer = pipes()
    writer.send_bytes(b"abc")
    data: bytes = reader.recv_bytes()
    with ringpool.Executor(max_workers=2, preload=["json"], task_timeout=30.0) as ex:
        f: Future[int] = ex.submit(square, 7)
        g: Future[str] = ex.submit(label, 3, prefix="n")
        by_name: Future[object] = ex.submit("json:dumps", [1, 2])
        squares: Iterator[int] = ex.map(square, range(10), chunksize=4)
        total = sum(squares) + sum(ex.imap_unordered(square, iter(range(5))))
        for done in as_completed([f]):
            total += done.result()
        pids: list[int] = ex.worker_pids()
        try:
            ex.submit(square, 1).result(timeout=10)
        except ringpool.WorkerDied as e:
            print(e.pid, e.exitcode)
        except ringpool.TaskTimeout as e:
            print(e.timeout)
    ctx.shutdown()
    print(got, sq.get(), data, g.result(), by_name.result(), pids)
    return total


if __name__ == "__main__":
    main()
