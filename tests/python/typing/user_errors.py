"""Mistakes a type checker must catch with ringpool's types (tests/python/test_typing.py expects an
error on each line marked E)."""
from __future__ import annotations

from concurrent.futures import Future

import ringpool


def square(x: int) -> int:
    return x * x


def main() -> None:
    with ringpool.Executor(max_workers="two") as ex:  # E: arg-type
        ex.submit(square, "seven")  # E: arg-type
        f: Future[str] = ex.submit(square, 7)  # E: arg-type
        names: list[str] = list(ex.map(square, range(3)))  # E: arg-type
        print(f, names)
    ringpool.get_context(spares="many")  # E: arg-type
    ringpool.Queue().put_many(5)  # E: arg-type
    a, b = ringpool.Pipe()
    text: str = a.recv_bytes()  # E: assignment
    print(b, text)
