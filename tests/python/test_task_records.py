"""Task records (proto/include/ringpool/proto/task.hpp): the Python side against the golden records
in proto/golden/task (written by generate.py there; tests/cpp/test_task.cpp holds the C++ pool to
the same files). _core.task must say what task.hpp says, the worker must decode every record as
the manifest reads it, ringpool's encoder must write every record byte for byte as the golden
file has it, and the worker loop must answer the golden calls with records of the documented
shape."""
import ast
import importlib
import pathlib
import pickle
import re

import pytest

from ringpool import _core, _pool_worker
from ringpool import _executor_tasks as executor

ROOT = pathlib.Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "proto" / "golden" / "task"
TASK_HPP = ROOT / "proto" / "include" / "ringpool" / "proto" / "task.hpp"
T = _core.task


def _manifest():
    out = []
    for line in (GOLDEN / "manifest.tsv").read_text(encoding="utf-8").splitlines():
        name, record, writer, *fields = line.split("\t")
        assert len(fields) == 5, line[:80]
        out.append({"name": name, "record": record, "writer": writer, "fields": fields,
                    "data": (GOLDEN / f"{name}.pkl").read_bytes()})
    return out


MANIFEST = _manifest()
IDS = [e["name"] for e in MANIFEST]


def fields_of(entry):
    """The record the manifest line names, with the op or status looked up in _core.task."""
    kind_at = T.CALL_OP if entry["record"] == "call" else T.RESULT_STATUS
    return tuple(getattr(T, text) if i == kind_at else ast.literal_eval(text)
                 for i, text in enumerate(entry["fields"]))


def _resolve(spec):
    mod, _, qual = spec.partition(":")
    return getattr(importlib.import_module(mod), qual)


# --- _core.task is task.hpp ----------------------------------------------------------------------

def test_core_task_matches_task_hpp():
    src = TASK_HPP.read_text()

    def enum(name):
        body = src.split(f"enum class {name}")[1].split("};")[0]
        return {k: int(v) for k, v in re.findall(r"^\s*([A-Z_]+) = (\d+),", body, re.M)}

    def const(name):
        m = re.search(r"\b" + name + r" = ([^;]+);", src)
        assert m, name
        return eval(re.sub(r"std::size_t\{(\d+)\}", r"\1", m.group(1)))  # "std::size_t{4} << 20"

    def names(space):
        body = src.split(f"namespace {space} {{")[1].split("}  // namespace")[0]
        return tuple(re.findall(r'"(\w+)"', body.split("kNames")[1]))

    ops, statuses = enum("Op"), enum("Status")
    assert ops == {k: getattr(T, k) for k in ("CALL", "CHUNK", "PING", "STOP", "RUN")}
    assert statuses == {k: getattr(T, k) for k in ("OK", "ERR", "STARTED", "PONG", "INIT_FAILED", "DIED")}
    assert max(ops.values()) == const("kMaxOp") and max(statuses.values()) == const("kMaxStatus")
    assert T.CALL_FIELDS == names("call") == ("op", "tid", "fn", "args", "kwargs")
    assert T.RESULT_FIELDS == names("result") == ("wid", "tid", "status", "value", "elapsed")
    assert [getattr(T, "CALL_" + f.upper()) for f in T.CALL_FIELDS] == list(range(5))
    assert [getattr(T, "RESULT_" + f.upper()) for f in T.RESULT_FIELDS] == list(range(5))
    assert (T.ERROR_TYPE, T.ERROR_MESSAGE, T.ERROR_TRACEBACK, T.ERROR_FIELDS) == (0, 1, 2, 3)
    for py, cpp in [("SINGLE", "kSingle"), ("MAX_RUN_CALLS", "kMaxRunCalls"), ("MAX_RUN_BYTES", "kMaxRunBytes"),
                    ("WORKER_TAKE", "kWorkerTake"), ("CALL_CAPACITY", "kCallCapacity"),
                    ("RESULT_CAPACITY", "kResultCapacity"), ("MIN_DEPTH", "kMinDepth"), ("MAX_DEPTH", "kMaxDepth"),
                    ("QUEUED_WORK", "kQueuedWork"), ("RESULT_COST", "kResultCost"),
                    ("INITIAL_TASK_TIME", "kInitialTaskTime"), ("TASK_TIME_WEIGHT", "kTaskTimeWeight"),
                    ("RESULT_BATCH", "kResultBatch"), ("STOP_GRACE", "kStopGrace")]:
        assert getattr(T, py) == const(cpp), py
    # The depth bound: one formula, task.hpp's depth_for, which the scheduler of both pools computes.
    for avg in (0.0, 1e-6, T.INITIAL_TASK_TIME, 1e-3, 10.0):
        assert T.depth_for(avg) == max(T.MIN_DEPTH, min(T.MAX_DEPTH, int(T.QUEUED_WORK / (avg + T.RESULT_COST))))


def test_executor_uses_core_task():
    # The executor's names (their home: _executor_tasks) are _core.task's values (no copy that could drift).
    assert (executor._CALL, executor._CHUNK, executor._PING, executor._STOP, executor._RUN) == \
        (T.CALL, T.CHUNK, T.PING, T.STOP, T.RUN)
    assert (executor._OK, executor._ERR, executor._STARTED, executor._PONG, executor._INIT_FAILED,
            executor._DIED) == (T.OK, T.ERR, T.STARTED, T.PONG, T.INIT_FAILED, T.DIED)
    assert executor._SINGLE == T.SINGLE
    assert (executor._MIN_DEPTH, executor._MAX_DEPTH) == (T.MIN_DEPTH, T.MAX_DEPTH)
    # The rest of the tuning (depth_for, the moving average) is the scheduler's, in C++.
    assert _core.Scheduler(1).depth == T.MIN_DEPTH


# --- the golden records ----------------------------------------------------------------------------

def test_manifest_covers_every_file_op_and_status():
    assert len(IDS) == len(set(IDS))
    assert {p.stem for p in GOLDEN.glob("*.pkl")} == set(IDS)
    kinds = {e["fields"][T.CALL_OP if e["record"] == "call" else T.RESULT_STATUS] for e in MANIFEST}
    assert kinds == {"CALL", "CHUNK", "PING", "STOP", "RUN", "OK", "ERR", "STARTED", "PONG", "INIT_FAILED", "DIED"}


@pytest.mark.parametrize("entry", MANIFEST, ids=IDS)
def test_worker_decodes_golden_record(entry):
    """The worker's loader (the plain-data decoder, else pickle) reads the manifest's fields."""
    expected = fields_of(entry)
    assert pickle.loads(entry["data"]) == expected
    accepted, value = _core._plain_loads(entry["data"])
    assert accepted or entry["name"] == "ok_deep"  # (nested past the fast path's depth)
    if accepted:
        assert value == expected
        assert [type(v) for v in value] == [type(v) for v in expected]  # a tuple stays a tuple


@pytest.mark.parametrize("entry", [e for e in MANIFEST if e["writer"] != "pool"],
                         ids=[e["name"] for e in MANIFEST if e["writer"] != "pool"])
def test_python_encoder_writes_golden_record(entry):
    """What put_obj/put_objs publish for a record the Python side writes (a worker's results, an
    Executor's own records) is the golden file byte for byte: the C++ pool's reader is tested on
    exactly these bytes. (Records the C++ pool writes batch one-item lists and dicts as CPython
    does; the worker's decoding of those is test_worker_decodes_golden_record.)"""
    payload, flags, fds = _core.dumps(fields_of(entry))
    assert (flags, fds) == (0, None)
    assert payload == entry["data"]


def _answers(entry):
    """The result records (less elapsed) a worker owes for a golden call record, computed here."""
    op, tid, fn, args, kwargs = fields_of(entry)
    if op == T.PING:
        return [(7, tid, T.PONG, None)]
    f = _resolve(fn)
    if op == T.CALL:
        return [(7, tid, T.OK, f(*args, **(kwargs or {})))]
    call = f if kwargs == T.SINGLE else (lambda a: f(*a))
    if op == T.RUN:
        return [(7, tid + k, T.OK, call(a)) for k, a in enumerate(args)]
    assert op == T.CHUNK
    return [(7, tid, T.OK, [call(a) for a in args])]


def test_worker_loop_answers_golden_calls():
    """The C++ pool's worker loop (plain mode) takes the golden calls as the pool writes them and
    answers each in order, in the result record shape the pool's fast reader expects."""
    calls = [e for e in MANIFEST if e["record"] == "call" and e["fields"][T.CALL_OP] != "STOP"]
    stop = next(e for e in MANIFEST if e["fields"][T.CALL_OP] == "STOP")
    call_ring, result_ring = _core.Channel.create(1 << 16), _core.Channel.create(1 << 16)
    for e in calls + [stop]:
        assert call_ring.put(e["data"]) is None
    _pool_worker.serve(7, call_ring, result_ring, None, (), None, False, True)  # returns at STOP
    expected = [a for e in calls for a in _answers(e)]
    got = []
    while len(got) < len(expected):
        more = result_ring.get_many(64, 5.0)
        assert more, f"{len(got)} of {len(expected)} answers"
        got += more
    assert not result_ring.poll(0.0)
    records = []
    for raw in got:
        assert type(raw) is bytes
        # PROTO 5, MARK, <wid> <tid> <status> <value>, BINFLOAT <elapsed>, TUPLE, STOP: no FRAME,
        # no MEMOIZE (docs/design/protocol.md, "Task records").
        assert raw[:3] == b"\x80\x05(" and raw[-11:-10] == b"G" and raw[-2:] == b"t.", raw
        rec = pickle.loads(raw)
        assert type(rec[T.RESULT_ELAPSED]) is float and rec[T.RESULT_ELAPSED] >= 0.0
        records.append(rec[:T.RESULT_ELAPSED])
    assert records == expected
