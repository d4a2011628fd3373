# Types of ringpool/executor.py for users' type checkers (mypy, pyright): the module itself is
# unannotated. tests/python/test_typing.py checks that every public name and parameter here matches
# the module at run time, and type-checks a user program against it.
from concurrent.futures import Executor as _Executor
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.context import BaseContext
from typing import Any, Callable, Iterable, Iterator, ParamSpec, TypeVar, overload

_T = TypeVar("_T")
_P = ParamSpec("_P")

class WorkerDied(BrokenProcessPool):
    pid: int | None
    exitcode: int | None
    def __init__(self, pid: int | None, exitcode: int | None) -> None: ...

class TaskTimeout(TimeoutError):
    pid: int | None
    timeout: float
    def __init__(self, pid: int | None, timeout: float) -> None: ...

class RemoteTraceback(Exception):
    tb: str
    def __init__(self, tb: str) -> None: ...

class Executor(_Executor):
    def __init__(
        self,
        max_workers: int | None = None,
        preload: Iterable[str] = (),
        initializer: Callable[..., object] | None = None,
        initargs: Iterable[Any] = (),
        max_tasks_per_child: int | None = None,
        *,
        mp_context: BaseContext | None = None,
        zygote: bool = True,
        task_timeout: float | None = None,
    ) -> None: ...
    def worker_pids(self) -> list[int]: ...
    @overload
    def submit(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> Future[_T]: ...
    @overload
    def submit(self, fn: str, /, *args: Any, **kwargs: Any) -> Future[Any]: ...
    # A function may also be named "package.module:qualname" (resolved in the worker): Any results.
    @overload
    def map(
        self, fn: Callable[..., _T], *iterables: Iterable[Any], timeout: float | None = None, chunksize: int = 1,
        progress: bool | dict[str, Any] = False,
    ) -> Iterator[_T]: ...
    @overload
    def map(
        self, fn: str, *iterables: Iterable[Any], timeout: float | None = None, chunksize: int = 1,
        progress: bool | dict[str, Any] = False,
    ) -> Iterator[Any]: ...
    @overload
    def starmap(
        self, fn: Callable[..., _T], iterable: Iterable[Iterable[Any]], timeout: float | None = None,
        chunksize: int = 1, progress: bool | dict[str, Any] = False,
    ) -> Iterator[_T]: ...
    @overload
    def starmap(
        self, fn: str, iterable: Iterable[Iterable[Any]], timeout: float | None = None, chunksize: int = 1,
        progress: bool | dict[str, Any] = False,
    ) -> Iterator[Any]: ...
    @overload
    def imap(
        self, fn: Callable[[Any], _T], iterable: Iterable[Any], chunksize: int = 1,
        progress: bool | dict[str, Any] = False, total: int | None = None,
    ) -> Iterator[_T]: ...
    @overload
    def imap(
        self, fn: str, iterable: Iterable[Any], chunksize: int = 1, progress: bool | dict[str, Any] = False,
        total: int | None = None,
    ) -> Iterator[Any]: ...
    @overload
    def imap_unordered(
        self, fn: Callable[[Any], _T], iterable: Iterable[Any], chunksize: int = 1, progress: bool | dict[str, Any] = False,
        total: int | None = None,
    ) -> Iterator[_T]: ...
    @overload
    def imap_unordered(
        self, fn: str, iterable: Iterable[Any], chunksize: int = 1, progress: bool | dict[str, Any] = False,
        total: int | None = None,
    ) -> Iterator[Any]: ...
    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None: ...

