"""The machine description every benchmark report names (imported by the bench_*.py scripts):
ringpool.bench's, one definition for the scripts and ``python -m ringpool bench``."""
from ringpool.bench import machine_info

__all__ = ["machine_info"]
