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

