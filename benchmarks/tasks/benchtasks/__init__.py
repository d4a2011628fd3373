"""Task functions for the pool benchmarks (shipped to the C++ Pool's workers as a package)."""


def noop(x=None):
    return x
