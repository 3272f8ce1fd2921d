"""Python's cyclic garbage collector, run less often in every test process (the pytest
workers, the doc runner, the distributed ranks): tracing a model allocates millions of small
objects, and at the default threshold (700) the collector ran often enough to take ~10% of a
compile-heavy test file's time (test_families.py, 2026-12-06). Garbage is still collected; a
test that needs a collection at a point calls gc.collect() itself."""
import gc

THRESHOLD = (50_000, 20, 20)


def collect_less_often() -> None:
    gc.set_threshold(*THRESHOLD)
