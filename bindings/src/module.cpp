#include <sys/resource.h>

#include "bindings.h"
#include "ringpool/error.hpp"
#include "ringpool/ring.hpp"
#include "ringpool/proto/frame.hpp"

namespace py = pybind11;

namespace ringpool::py_bindings {

void init_errors(py::module_& m) {
  static py::exception<ProtocolError> protocol_error(m, "ProtocolError", PyExc_RuntimeError);
  protocol_error.attr("__doc__") =
      "A frame, record or shared-memory block that breaks the wire format (docs/design/protocol.md):\n"
      "the peer is corrupt or hostile. The message names what is wrong.";
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const ProtocolError& e) {
      PyErr_SetString(protocol_error.ptr(), e.what());
    } catch (const SysError& e) {
      // OSError with errno, so Python code can match on e.errno.
      PyErr_SetObject(PyExc_OSError, py::make_tuple(e.code().value(), e.what()).ptr());
    }
  });
}

}  // namespace ringpool::py_bindings

PYBIND11_MODULE(_core, m) {
  m.doc() = "ringpool's native core: shared-memory rings, handle passing, out-of-band blocks.";
  ringpool::py_bindings::init_errors(m);
  ringpool::py_bindings::init_channel(m);
  ringpool::py_bindings::init_codec(m);
  ringpool::py_bindings::init_process(m);
  ringpool::py_bindings::init_pickle(m);
  ringpool::py_bindings::init_task(m);
  ringpool::py_bindings::init_scheduler(m);
  ringpool::py_bindings::init_kernel(m);
  ringpool::py_bindings::init_log(m);
  m.attr("PROTOCOL_VERSION") = ringpool::proto::kProtocolVersion;
  m.attr("HEADER_SIZE") = ringpool::proto::kHeaderSize;
  m.attr("FLAG_OUT_OF_BAND") = ringpool::proto::flag::kOutOfBand;
  m.attr("FLAG_BUFFERS") = ringpool::proto::flag::kBuffers;
  m.attr("FLAG_RAW") = ringpool::proto::flag::kRaw;
  m.attr("COUNT_ITEM") = ringpool::Ring::kCountItem;
  m.attr("COUNT_TASK") = ringpool::Ring::kCountTask;
  // Handles in flight over SCM_RIGHTS count against RLIMIT_NOFILE; a queue holding a few thousand
  // tensors would hit the usual soft limit of 1024. Raise the soft limit to the hard one, as
  // torch.multiprocessing users end up doing by hand.
  rlimit rl{};
  if (::getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    ::setrlimit(RLIMIT_NOFILE, &rl);
  }
}
