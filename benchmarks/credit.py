"""step_gae / token_gae: jitted JAX (reverse lax.scan with several unrolls, lax.associative_scan) against the
straightforward loops of the reference PyTorch implementation, vectorised across the batch — once in numpy, once
in PyTorch (CPU) — on one packed batch (default B=256 episodes, S=16 steps, L=2048 tokens).

  python -m benchmarks.credit [--repeats 20] [--markdown PATH]
  python benchmarks/credit.py  [--repeats 20] [--markdown PATH]

All implementations are checked to agree (assert_allclose) before anything is timed. Times are medians over
`--repeats` round-robin runs after two warm-up runs (which include JAX's compilation); JAX runs end in
block_until_ready.
"""

from __future__ import annotations

import functools
import os
import platform
import statistics
import sys
import time
from typing import Callable

if __package__ in (None, ""):  # run as a script: make the repository root importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import arg_parser  # noqa: E402
from stepjax import credit  # noqa: E402
from stepjax.testing import random_episode_batch  # noqa: E402

GAMMA, LAM = 0.99, 0.95
SCAN_UNROLLS = (1, 4, 16)


# ------------------------------------------------------------------------------------------------------
# Reference-style loops: `for t in reversed(range(T))`, masks as floats, vectorised over the batch.
# ------------------------------------------------------------------------------------------------------


def numpy_gae(rewards, values, mask, next_after_last, gamma, lam):
  """rewards, values, mask [B, T] float32; next_after_last [B] -> (advantages, returns) [B, T]."""
  next_values = next_after_last.copy()
  last_gae = np.zeros_like(next_after_last)
  advantages = np.zeros_like(rewards)
  for t in reversed(range(rewards.shape[1])):
    m = mask[:, t]
    delta = rewards[:, t] + gamma * next_values - values[:, t]
    candidate = delta + gamma * lam * last_gae
    next_values = values[:, t] * m + (1 - m) * next_values
    last_gae = candidate * m + (1 - m) * last_gae
    advantages[:, t] = last_gae
  advantages *= mask
  return advantages, (advantages + values) * mask


def torch_gae(rewards, values, mask, next_after_last, gamma, lam):
  """Same loop in PyTorch (CPU tensors)."""
  next_values = next_after_last.clone()
  last_gae = torch.zeros_like(next_after_last)
  reversed_advantages = []
  for t in reversed(range(rewards.shape[1])):
    m = mask[:, t]
    delta = rewards[:, t] + gamma * next_values - values[:, t]
    candidate = delta + gamma * lam * last_gae
    next_values = values[:, t] * m + (1 - m) * next_values
    last_gae = candidate * m + (1 - m) * last_gae
    reversed_advantages.append(last_gae)
  advantages = torch.stack(reversed_advantages[::-1], dim=1) * mask
  return advantages, (advantages + values) * mask


# ------------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------------


def make_inputs(batch_size: int, max_steps: int, max_len: int, seed: int = 0):
  """One packed batch, read out at step level and at token level (numpy float32 / bool).

  Segment lengths scale with max_len (at L=2048: prompts ≤ 256, actions ≤ 160, observations ≤ 64 tokens), so
  rows are long (at the defaults about 91% of the positions hold real tokens, 61% action tokens).
  """
  batch = random_episode_batch(seed, batch_size, max_len, max_steps, fill=True, max_prompt=max(1, max_len // 8),
                               max_action=max(1, max_len * 5 // 64), max_obs=max_len // 32, vocab_size=32000)
  position_values = jnp.asarray(np.random.default_rng(seed).normal(size=(batch_size, max_len)).astype(np.float32))
  bootstrap = np.asarray(batch.bootstrap_values(position_values))
  common = dict(bootstrap_values=bootstrap, truncated=np.asarray(batch.truncated))
  step = dict(rewards=np.asarray(batch.step_rewards), values=np.asarray(batch.step_values(position_values)),
              mask=np.asarray(batch.step_mask), **common)
  token = dict(rewards=np.asarray(batch.token_rewards()), values=np.asarray(batch.token_values(position_values)),
               mask=np.asarray(batch.action_mask), **common)
  return batch, step, token


def reference_args(inputs, lib):
  """Float masks and the value after each episode's last slot, as the reference loops take them."""
  next_after_last = np.where(inputs["truncated"], inputs["bootstrap_values"], 0.0).astype(np.float32)
  arrays = (inputs["rewards"], inputs["values"], inputs["mask"].astype(np.float32), next_after_last)
  if lib == "torch":
    arrays = tuple(torch.from_numpy(np.array(a, copy=True)) for a in arrays)  # writable, contiguous copies
  return arrays


def jax_gae(level: str, method: str, unroll: int) -> Callable:
  fn = credit.step_gae if level == "step" else credit.token_gae

  @jax.jit
  def run(rewards, values, mask, bootstrap_values, truncated):
    return fn(rewards, values, mask, gamma=GAMMA, lam=LAM, bootstrap_values=bootstrap_values, truncated=truncated,
              method=method, unroll=unroll)

  return lambda inputs: run(inputs["rewards"], inputs["values"], inputs["mask"], inputs["bootstrap_values"],
                            inputs["truncated"])


# ------------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------------


def median_ms(runners: dict[str, Callable[[], object]], repeats: int,
              warmup: int = 2) -> dict[str, tuple[float, float]]:
  """(median wall ms, median CPU ms) of each runner. CPU = this process's CPU time over all its threads, which
  stays meaningful when other processes share the cores. Runs are interleaved round-robin so that load from
  other processes falls on every implementation alike."""
  for run in runners.values():
    for _ in range(warmup):
      jax.block_until_ready(run())
  wall = {name: [] for name in runners}
  cpu = {name: [] for name in runners}
  for _ in range(repeats):
    for name, run in runners.items():
      start_wall, start_cpu = time.perf_counter(), time.process_time()
      jax.block_until_ready(run())  # a no-op on numpy / torch outputs
      wall[name].append(time.perf_counter() - start_wall)
      cpu[name].append(time.process_time() - start_cpu)
  return {name: (1e3 * statistics.median(wall[name]), 1e3 * statistics.median(cpu[name])) for name in runners}


def check_agree(name: str, got, want) -> None:
  for label, a, b in zip(("advantages", "returns"), got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4,
                               err_msg=f"{name}: {label} disagree with the numpy loop")


def benchmark(repeats: int, batch_size: int, max_steps: int, max_len: int) -> tuple[list[dict], str]:
  batch, step_inputs, token_inputs = make_inputs(batch_size, max_steps, max_len)
  rows = []
  for level, inputs in (("step_gae", step_inputs), ("token_gae", token_inputs)):
    np_args = reference_args(inputs, "numpy")
    torch_args = reference_args(inputs, "torch")
    want = numpy_gae(*np_args, GAMMA, LAM)
    check_agree(f"{level} torch loop", [t.numpy() for t in torch_gae(*torch_args, GAMMA, LAM)], want)
    runners = {"numpy loop": lambda: numpy_gae(*np_args, GAMMA, LAM)}
    variants = [("scan", u) for u in SCAN_UNROLLS] + [("associative", 1)]
    for method, unroll in variants:
      run = jax_gae("step" if level == "step_gae" else "token", method, unroll)
      name = f"jax {method}" + (f" (unroll={unroll})" if method == "scan" else "")
      check_agree(f"{level} {name}", run(inputs), want)
      runners[name] = functools.partial(run, inputs)
    runners["torch loop"] = lambda: torch_gae(*torch_args, GAMMA, LAM)  # last: its thread pool may linger
    timings = median_ms(runners, repeats)
    (numpy_wall, numpy_cpu), (torch_wall, torch_cpu) = timings["numpy loop"], timings["torch loop"]
    for name, (ms, cpu_ms) in timings.items():
      rows.append(dict(level=level, implementation=name, ms=ms, cpu_ms=cpu_ms, vs_numpy=numpy_wall / ms,
                       vs_torch=torch_wall / ms, cpu_vs_numpy=numpy_cpu / cpu_ms, cpu_vs_torch=torch_cpu / cpu_ms))
  tokens = int(np.asarray(batch.action_mask).sum())
  context = (f"B={batch_size} episodes, S={max_steps} steps, L={max_len} tokens ({tokens} action tokens, "
             f"{int(np.asarray(batch.seq_len).sum())} real tokens); gamma={GAMMA}, lam={LAM}; median of {repeats} "
             "runs (interleaved) after warm-up; CPU = process time over all threads. "
             f"jax {jax.__version__} on {jax.default_backend()}, numpy {np.__version__}, torch {torch.__version__} "
             f"(torch threads: {torch.get_num_threads()}), {os.cpu_count()} CPUs, "
             f"{platform.processor() or platform.machine()}.")
  return rows, context


def markdown_table(rows: list[dict], context: str) -> str:
  header = ("| estimator | implementation | median wall ms | median CPU ms | speed-up vs numpy (wall / CPU) "
            "| speed-up vs torch (wall / CPU) |")
  lines = [context, "", header, "|---|---|---:|---:|---:|---:|"]
  order = ("numpy loop", "torch loop")
  rows = sorted(rows, key=lambda r: (r["level"], r["implementation"] not in order,
                                     order.index(r["implementation"]) if r["implementation"] in order else 0))
  for r in rows:
    lines.append(f"| {r['level']} | {r['implementation']} | {r['ms']:.2f} | {r['cpu_ms']:.2f} | "
                 f"{r['vs_numpy']:.1f}x / {r['cpu_vs_numpy']:.1f}x | {r['vs_torch']:.1f}x / {r['cpu_vs_torch']:.1f}x |")
  lines.append("")
  for level in ("step_gae", "token_gae"):
    jax_rows = [r for r in rows if r["level"] == level and r["implementation"].startswith("jax")]
    best = min(jax_rows, key=lambda r: r["ms"])
    lines.append(f"Fastest JAX {level} (wall): {best['implementation']} ({best['ms']:.2f} ms, "
                 f"{best['vs_numpy']:.1f}x numpy, {best['vs_torch']:.1f}x torch).")
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
  parser = arg_parser(__doc__, repeats=20)
  parser.add_argument("--batch-size", type=int, default=256)
  parser.add_argument("--max-steps", type=int, default=16)
  parser.add_argument("--max-len", type=int, default=2048)
  parser.add_argument("--torch-threads", type=int, default=1, help="torch.set_num_threads for the torch loop")
  args = parser.parse_args(argv)
  if args.repeats < 1:
    parser.error("--repeats: expected a positive int")
  # The loop's per-slot ops touch B floats, far below torch's intra-op parallel grain: extra threads only spin
  # (and steal a core from whatever runs next).
  torch.set_num_threads(args.torch_threads)
  rows, context = benchmark(args.repeats, args.batch_size, args.max_steps, args.max_len)
  table = markdown_table(rows, context)
  print(table)
  if args.markdown:
    with open(args.markdown, "w", encoding="utf-8") as f:
      f.write(table)
  return table


if __name__ == "__main__":
  main()
