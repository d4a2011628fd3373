// ringpool._core.task: the task records' kinds, field positions and limits, read from
// proto/include/ringpool/proto/task.hpp so that ringpool.executor never copies them by hand.
#include "bindings.h"
#include "ringpool/proto/task.hpp"

namespace py = pybind11;

namespace ringpool::py_bindings {

namespace {

template <class E>
py::int_ value_of(E e) {
  return py::int_(static_cast<std::int64_t>(e));
}

template <std::size_t N>
py::tuple names_of(const std::string_view (&names)[N]) {
  py::tuple t(N);
  for (std::size_t i = 0; i < N; ++i) t[i] = py::str(names[i].data(), names[i].size());
  return t;
}

}  // namespace

void init_task(py::module_& m) {
  namespace task = proto::task;
  py::module_ t = m.def_submodule("task", "Task records shared by ringpool.Executor, ringpool::Pool and their "
                                          "workers (proto/include/ringpool/proto/task.hpp).");
  // Call record ops.
  t.attr("CALL") = value_of(task::Op::CALL);
  t.attr("CHUNK") = value_of(task::Op::CHUNK);
  t.attr("PING") = value_of(task::Op::PING);
  t.attr("STOP") = value_of(task::Op::STOP);
  t.attr("RUN") = value_of(task::Op::RUN);
  t.attr("SINGLE") = task::kSingle;
  t.attr("CALL_FIELDS") = names_of(task::call::kNames);
  t.attr("CALL_OP") = task::call::kOp;
  t.attr("CALL_TID") = task::call::kTid;
  t.attr("CALL_FN") = task::call::kFn;
  t.attr("CALL_ARGS") = task::call::kArgs;
  t.attr("CALL_KWARGS") = task::call::kKwargs;
  // Result record statuses.
  t.attr("OK") = value_of(task::Status::OK);
  t.attr("ERR") = value_of(task::Status::ERR);
  t.attr("STARTED") = value_of(task::Status::STARTED);
  t.attr("PONG") = value_of(task::Status::PONG);
  t.attr("INIT_FAILED") = value_of(task::Status::INIT_FAILED);
  t.attr("DIED") = value_of(task::Status::DIED);
  t.attr("RESULT_FIELDS") = names_of(task::result::kNames);
  t.attr("RESULT_WID") = task::result::kWid;
  t.attr("RESULT_TID") = task::result::kTid;
  t.attr("RESULT_STATUS") = task::result::kStatus;
  t.attr("RESULT_VALUE") = task::result::kValue;
  t.attr("RESULT_ELAPSED") = task::result::kElapsed;
  t.attr("ERROR_TYPE") = task::error::kType;
  t.attr("ERROR_MESSAGE") = task::error::kMessage;
  t.attr("ERROR_TRACEBACK") = task::error::kTraceback;
  t.attr("ERROR_FIELDS") = task::error::kFields;
  // Limits and the tuning both pools share.
  t.attr("MAX_RUN_CALLS") = task::kMaxRunCalls;
  t.attr("MAX_RUN_BYTES") = task::kMaxRunBytes;
  t.attr("WORKER_TAKE") = task::kWorkerTake;
  t.attr("CALL_CAPACITY") = task::kCallCapacity;
  t.attr("RESULT_CAPACITY") = task::kResultCapacity;
  t.attr("MIN_DEPTH") = task::kMinDepth;
  t.attr("MAX_DEPTH") = task::kMaxDepth;
  t.attr("QUEUED_WORK") = task::kQueuedWork;
  t.attr("RESULT_COST") = task::kResultCost;
  t.attr("INITIAL_TASK_TIME") = task::kInitialTaskTime;
  t.attr("TASK_TIME_WEIGHT") = task::kTaskTimeWeight;
  t.attr("RESULT_BATCH") = task::kResultBatch;
  t.attr("STOP_GRACE") = task::kStopGrace;
  t.def("depth_for", &task::depth_for, py::arg("average_task_time"),
        "Unanswered calls a worker may have, given the average task time in seconds.");
}

}  // namespace ringpool::py_bindings
