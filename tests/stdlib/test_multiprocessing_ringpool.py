"""CPython's own multiprocessing test suite (Debian's libpython3.11-testsuite) under the
"ringpool" start method, as CPython runs it for fork, spawn and forkserver.

Run by tests/python/test_stdlib_suite.py with the python of a venv where ringpool is installed
(the suite starts fresh interpreters in isolated mode that must find the "ringpool" start method).
"""
import unittest

import test._test_multiprocessing

# Where ringpool deliberately differs from the stdlib. Each is listed, with its reason, in the
# deviations header of bindings/ringpool/context.py and in docs/design/spawner.md.
DEVIATIONS = {
    "WithProcessesTestPoolWorkerErrors.test_unpickleable_result":
        "ringpool's queues pickle lambdas and other functions a worker cannot import by value "
        "(cloudpickle), so a Pool task returning a lambda succeeds instead of raising "
        "MaybeEncodingError",
    "TestStartMethod.test_get_all":
        "where ringpool is installed, multiprocessing.get_all_start_methods() also lists 'ringpool' "
        "(torch's DataLoader accepts a start method given as a string only if that list names it)",
}

test._test_multiprocessing.install_tests_in_module_dict(globals(), "ringpool")

for _name, _reason in DEVIATIONS.items():
    _cls, _test = _name.split(".")
    setattr(globals()[_cls], _test, unittest.skip(f"ringpool deviation: {_reason}")(getattr(globals()[_cls], _test)))

if __name__ == "__main__":
    unittest.main()
