"""The timing helper the bench scripts share: the best of a few runs of a warmed-up function."""

import time


def best_of(fn, repeats: int) -> float:
  """Seconds of the fastest of `repeats` calls of `fn()`, after one call that compiles / warms up
  (`fn` blocks until its result is ready)."""
  fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return min(times)
