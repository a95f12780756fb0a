"""Reusable pieces of the CPU benchmarks, shared by ``scripts/bench_*.py`` (thin command lines), the notebooks and
the tests, so that they work after a plain ``pip install .``."""
