"""Shared timing and reporting helpers for the benchmark scripts."""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
  """Runs `fn` `warmup` times, then `repeats` timed times; returns (median seconds, all timings).
  `fn` must block until its result is ready (e.g. `jax.block_until_ready`)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), times


def interleaved_seconds(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
  """Times several blocking functions in rounds: each runs `warmup` times first, then every round times each once,
  in an order rotated by one per round. -> {name: [seconds per round]}. Round k's timings of two functions were taken
  within seconds of each other, so their ratio is a paired comparison that the machine's drift (other tenants, clock
  changes) affects far less than timings taken one function after another."""
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  names = list(fns)
  times: dict[str, list[float]] = {name: [] for name in names}
  for k in range(repeats):
    for name in names[k % len(names):] + names[:k % len(names)]:
      start = time.perf_counter()
      fns[name]()
      times[name].append(time.perf_counter() - start)
  return times


def _spin() -> None:
  while True:
    pass


class BusyCores:
  """`with BusyCores(n):` keeps n CPU cores busy with spinning processes (a reproducible stand-in for other jobs on the
  machine), stopped on exit; n = 0 does nothing."""

  def __init__(self, n: int):
    self.n, self.procs = n, []

  def __enter__(self):
    import multiprocessing  # noqa: PLC0415

    context = multiprocessing.get_context("spawn")
    self.procs = [context.Process(target=_spin, daemon=True) for _ in range(self.n)]
    for proc in self.procs:
      proc.start()
    return self

  def __exit__(self, *exc):
    for proc in self.procs:
      proc.terminate()
      proc.join()


def emit(lines: list[str], markdown_path: str | None) -> str:
  """Prints the table and, if asked, writes it to `markdown_path`."""
  table = "\n".join(lines)
  print(table)
  if markdown_path:
    with open(markdown_path, "w") as f:
      f.write(table + "\n")
  return table


def arg_parser(doc: str, repeats: int) -> argparse.ArgumentParser:
  """The flags every benchmark script has: --repeats (timed runs, median reported) and --markdown (also write the
  table there); the script adds its own."""
  parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=repeats, help="timed runs after a warm-up (median reported)")
  parser.add_argument("--markdown", default=None, help="also write the table(s) to this file")
  return parser

