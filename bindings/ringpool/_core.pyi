"""Type stubs for ringpool._core, the native core (bindings/src/*.cpp).

tests/python/test_core_stub.py holds this file to the extension: every public name (of the
module, of its classes, of ``task``) here with its kind, and nothing here the extension lacks
(but the private type helpers ``_Item`` and ``_TaskModule``).
"""
import types
from typing import Any, Callable, Sequence

PROTOCOL_VERSION: int
HEADER_SIZE: int
FLAG_OUT_OF_BAND: int
FLAG_BUFFERS: int
FLAG_RAW: int
COUNT_ITEM: int
COUNT_TASK: int
NO_BACKPRESSURE: int

class _TaskModule(types.ModuleType):
    """The submodule ``_core.task``: proto/include/ringpool/proto/task.hpp's records and limits."""
    # call record ops
    CALL: int
    CHUNK: int
    PING: int
    STOP: int
    RUN: int
    # result record statuses
    OK: int
    ERR: int
    STARTED: int
    PONG: int
    INIT_FAILED: int
    DIED: int
    # field positions
    CALL_OP: int
    CALL_TID: int
    CALL_FN: int
    CALL_ARGS: int
    CALL_KWARGS: int
    CALL_FIELDS: tuple[str, ...]
    RESULT_WID: int
    RESULT_TID: int
    RESULT_STATUS: int
    RESULT_VALUE: int
    RESULT_ELAPSED: int
    RESULT_FIELDS: tuple[str, ...]
    ERROR_TYPE: int
    ERROR_MESSAGE: int
    ERROR_TRACEBACK: int
    ERROR_FIELDS: int
    # a RUN or CHUNK whose kwargs is SINGLE carries bare arguments
    SINGLE: int
    # limits
    MAX_RUN_CALLS: int
    MAX_RUN_BYTES: int
    WORKER_TAKE: int
    CALL_CAPACITY: int
    RESULT_CAPACITY: int
    MIN_DEPTH: int
    MAX_DEPTH: int
    QUEUED_WORK: float
    RESULT_COST: float
    INITIAL_TASK_TIME: float
    TASK_TIME_WEIGHT: float
    RESULT_BATCH: int
    STOP_GRACE: float
    def depth_for(self, average_task_time: float) -> int:
        """Unanswered calls a worker may have, given the average task time in seconds."""

task: _TaskModule

class ProtocolError(RuntimeError): ...

class Pending:
    """A frame accepted while the ring was full; publish it later."""
    @property
    def record_bytes(self) -> int: ...
    @property
    def published(self) -> bool: ...

class OobBuffer:
    """Bytes of an out-of-band frame in shared memory (buffer protocol, writable)."""
    def __len__(self) -> int: ...

_Item = bytes | tuple[int, Any, list[int]]

class Channel:
    @staticmethod
    def create(capacity: int = ..., inline_max: int = 0, count_items: bool = False) -> Channel: ...
    @staticmethod
    def attach(memfd: int, tx: int, rx: int, event: int) -> Channel: ...
    @staticmethod
    def record_size(payload_len: int) -> int: ...
    def handles(self) -> tuple[int, int, int, int]: ...
    # raw frames
    def put(self, payload: bytes | Sequence[Any], flags: int = 0, fds: list[int] | None = None,
            accounting: int = ...) -> Pending | None: ...
    def stage(self, payload: bytes | Sequence[Any], flags: int = 0, fds: list[int] | None = None,
              accounting: int = ...) -> Pending: ...
    def publish(self, pending: Pending) -> bool: ...
    def put_payload(self, payload: bytes | Sequence[Any], flags: int = 0, fds: list[int] | None = None,
                    accounting: int = ...) -> Pending | None: ...
    def get(self, timeout: float | None = None) -> _Item | None: ...
    def get_many(self, max: int, timeout: float = -1.0) -> list[_Item]: ...
    # objects (pickled in C)
    def put_obj(self, obj: Any, accounting: int = ...) -> Pending | None: ...
    def put_objs(self, objs: Sequence[Any], start: int = 0, accounting: int = ...) -> int: ...
    def get_obj(self, timeout: float | None = None) -> Any: ...
    def get_objs(self, max: int, timeout: float | None = None) -> list[Any]: ...
    # waiting and state
    def poll(self, timeout: float | None = 0.0) -> bool: ...
    def readable(self) -> bool: ...
    def wait_writable(self, record_bytes: int, timeout: float) -> bool: ...
    def acquire_item(self, maxsize: int, timeout: float = -1.0) -> bool: ...
    def task_done(self) -> bool: ...
    def join(self, timeout: float = -1.0) -> bool: ...
    def fileno(self) -> int: ...
    @property
    def items(self) -> int: ...
    @property
    def unfinished(self) -> int: ...
    @property
    def capacity(self) -> int: ...
    @property
    def inline_max(self) -> int: ...
    @property
    def committed(self) -> int: ...
    @property
    def consumed(self) -> int: ...

def dumps(obj: Any) -> tuple[bytes | list[Any], int, list[int] | None]: ...
def _plain_dumps(obj: Any) -> bytes | None: ...
def _plain_loads(data: bytes) -> tuple[bool, Any]: ...
def block_pool_bytes() -> int: ...
def set_block_pool_limit(n: int) -> None: ...
BLOCK_MAGIC: int
BLOCK_VERSION: int
def create_memfd(name: str, size: int) -> int:
    """A new memfd of size bytes (close-on-exec), sealed against shrinking and growing; the caller owns it."""
def check_received_memfd(fd: int, min_size: int, max_size: int, what: str = "segment") -> int:
    """Its size, if fd is a memfd sealed against shrinking and growing, of min_size..max_size bytes;
    else ProtocolError naming what is wrong. Call before mapping a memfd from another process."""
def retain_heap(nbytes: int) -> bool:
    """Keep up to nbytes of freed heap memory for reuse (glibc mallopt); False where not applied."""
def kernel_features() -> list[tuple[str, str, str, bool, int, str]]:
    """[(name, since Linux version, what ringpool uses it for, required, errno or 0, strerror)],
    required features first; probes without side effects (runtime/kernel.hpp)."""
def _pickle_roundtrip(data: bytes, protocol: int = 5) -> bytes:
    """Decode with the C++ plain-data pickle codec, re-encode; ValueError if refused."""

class ChildProcess:
    """A child started with exactly the descriptors it is given, watched through a pidfd."""
    @staticmethod
    def launch(executable: str, argv: list[str], env: list[str], fds: list[tuple[int, int]] = ...,
               cwd: str = "", parent_death_signal: int = 0, new_session: bool = False) -> ChildProcess: ...
    @property
    def pid(self) -> int: ...
    @property
    def sentinel(self) -> int: ...
    def poll(self) -> int | None: ...
    def wait(self) -> int: ...
    def send_signal(self, sig: int) -> bool: ...

class Supervisor:
    """Starts and watches a context's workers from one C++ thread (runtime/supervisor.hpp)."""
    @staticmethod
    def exec_mode() -> Supervisor: ...
    @staticmethod
    def zygote_mode(executable: str, argv: list[str], env: list[str], cwd: str, config: bytes,
                    ready_timeout: float = 300.0, fork_timeout: float = 30.0, spares: int = 4) -> Supervisor: ...
    def spawn(self, fds: list[int], stdio: list[int] = ..., executable: str = "", argv: list[str] = ...,
              env: list[str] = ..., cwd: str = "") -> ChildProcess: ...
    def start(self) -> None: ...
    def start_async(self) -> None: ...
    def stop(self) -> None: ...
    def live_workers(self) -> list[int]: ...
    def exit_code(self, pid: int, /) -> int | None: ...
    def log_to_python(self, tag: int) -> None:
        """Queue this supervisor's zygote events for log_take(), marked with tag (ringpool._runtime_log)."""
    @property
    def mode(self) -> str: ...
    @property
    def zygote_pid(self) -> int: ...
    @property
    def zygote_note(self) -> str: ...
    @property
    def zygote_exits(self) -> int: ...

def log_fd() -> int:
    """An eventfd that becomes readable when runtime log records are queued."""
def log_take() -> tuple[list[tuple[int, str, int, str, int, int, int]], int]:
    """Queued runtime log records (tag, event, level, message, pid, exit_code, worker) and the number dropped."""
def log_reset_after_fork() -> None: ...

def zygote_receive_config(control: int, timeout: float = -1.0) -> bytes: ...
def zygote_send_ready(control: int, ok: bool, message: str = "") -> None: ...
def zygote_serve(control: int) -> tuple[int, int] | None:
    """The zygote's fork loop: None in the zygote when told to stop; (fd_base, nfds) in each worker."""
def zygote_use_huge_pages() -> int: ...
def die_with(root: int) -> None:
    """A nested worker: outlive the parent and die with root (ProcessLookupError if root is gone)."""
def thread_count() -> int: ...
def set_modules_channel(chan: Channel | None, install: Callable[[], None] | None = None) -> None:
    """A worker's code-shipping hook: object-level gets call install() when chan has a frame."""
