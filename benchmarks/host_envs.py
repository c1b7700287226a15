"""Host env throughput, thread pool vs process pool (`HostEnvPool(isolation="thread" | "process")`): env steps/s of
the same batch of envs playing the same scripted episodes, and the cost of starting the pool.

TextWorld: `--games` small games generated offline (`textworld_env.make_games`: 3 rooms, 5 objects, quest length 3),
`--batch` envs, env i playing game i % games; each episode is "look", "inventory", then the game's walkthrough (5
steps, the last one wins). search_qa (`--search-qa`): the generated two-hop questions of `stepjax.testing`, BM25 over
their paragraphs, each episode the expert's two searches and its answer. One timed run = reset every env, then step
the batch until every episode has ended; env steps/s counts the steps over the wall seconds spent in `pool.step`, CPU
ms / env step the CPU time of this process and of the workers in `pool.step` over all timed runs. Median of
`--repeats` runs after a warm-up run, on one pool per isolation, the two pools' runs alternating; "start" is the
pool's creation plus its first reset (process mode: forking the workers and building their envs). Both pools have the
presets' 60 s step timeout (thread mode then runs each call on a thread of its own). The two pools' transcripts must
be identical.

    python -m benchmarks.host_envs [--batch 8] [--games 4] [--repeats 15] [--search-qa] [--markdown out.md]
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import arg_parser, emit  # noqa: E402
from stepjax.envs.host import HostEnvPool  # noqa: E402


def _cpu_seconds(pool: HostEnvPool) -> float:
  """CPU seconds used so far by this process (all its threads) and by the pool's worker processes (Linux /proc)."""
  total = time.process_time()
  for env in pool.envs:
    pid = getattr(env, "pid", None)
    if pid is not None:
      with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
      total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
  return total


def _episodes(pool: HostEnvPool, seeds, scripts) -> tuple[list, float, float, int]:
  """Resets every env and plays `scripts[i]` on env i until every episode has ended -> (transcripts, wall seconds and
  CPU seconds in `pool.step`, env steps)."""
  transcripts = [[obs] for obs in pool.reset(seeds)]
  done = [False] * len(pool)
  seconds, cpu, steps = 0.0, 0.0, 0
  for t in range(max(len(script) for script in scripts)):
    actions = [None if done[i] or t >= len(scripts[i]) else (scripts[i][t], None) for i in range(len(pool))]
    if all(action is None for action in actions):
      break
    cpu_start = _cpu_seconds(pool)
    start = time.perf_counter()
    results = pool.step(actions)
    seconds += time.perf_counter() - start
    cpu += _cpu_seconds(pool) - cpu_start
    for i, result in enumerate(results):
      if result is not None:
        steps += 1
        transcripts[i].append((result.observation, result.reward, result.terminated, result.truncated))
        done[i] = result.terminated or result.truncated
  return transcripts, seconds, cpu, steps


def measure(make_env, batch: int, seeds, scripts, repeats: int, preload=(), timeout=60.0) -> dict:
  """Per isolation: {"start_s", "steps_per_s" (median), "cpu_ms_per_step" (over all timed runs: this process and the
  workers), "steps"}, and "same": the transcripts agree. Both pools stay
  up and their runs alternate (thread first on even repeats, process first on odd ones), so a changing load on a
  shared machine hits both alike."""
  out, rates, cpu, transcripts = {}, {"thread": [], "process": []}, {"thread": [0.0, 0], "process": [0.0, 0]}, {}
  with contextlib.ExitStack() as stack:
    pools = {}
    for isolation in ("thread", "process"):
      start = time.perf_counter()
      pools[isolation] = stack.enter_context(HostEnvPool(num_envs=batch, make_env=make_env, isolation=isolation,
                                                         timeout=timeout, preload=preload))
      pools[isolation].reset(seeds)
      out[isolation] = {"start_s": time.perf_counter() - start}
    for repeat in range(repeats + 1):  # the first is the warm-up
      for isolation in (("thread", "process") if repeat % 2 == 0 else ("process", "thread")):
        transcripts[isolation], seconds, cpu_seconds, steps = _episodes(pools[isolation], seeds, scripts)
        out[isolation]["steps"] = steps
        if repeat:
          rates[isolation].append(steps / seconds)
          cpu[isolation][0] += cpu_seconds
          cpu[isolation][1] += steps
  for isolation, values in rates.items():
    out[isolation]["steps_per_s"] = statistics.median(values)
    out[isolation]["cpu_ms_per_step"] = 1e3 * cpu[isolation][0] / cpu[isolation][1]
  out["same"] = transcripts["thread"] == transcripts["process"]
  return out


def textworld(batch: int, games: int, repeats: int) -> dict:
  """TextWorld's figures (module docstring)."""
  from stepjax.envs import textworld_env  # pylint: disable=import-outside-toplevel

  with tempfile.TemporaryDirectory() as tmp:
    files = textworld_env.make_games(tmp, range(games), world_size=3, nb_objects=5, quest_length=3)
    walkthroughs = []
    for path in files:
      with open(path[:-3] + ".json", encoding="utf-8") as handle:
        walkthroughs.append(json.load(handle)["metadata"]["walkthrough"])
    seeds = [i % games for i in range(batch)]
    scripts = [["look", "inventory", *walkthroughs[seed]] for seed in seeds]
    make_env = functools.partial(textworld_env.TextWorldEnv, files, max_steps=8)
    return measure(make_env, batch, seeds, scripts, repeats, preload=textworld_env.PRELOAD)


def search_qa(batch: int, repeats: int) -> dict:
  """search_qa's figures (module docstring); imported here, since bm25s imports JAX."""
  from stepjax.data import load_records  # pylint: disable=import-outside-toplevel
  from stepjax.envs import search_qa as sq  # pylint: disable=import-outside-toplevel
  from stepjax.testing import write_multihop_questions  # pylint: disable=import-outside-toplevel

  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "questions.json")
    write_multihop_questions(path)
    questions = load_records(path, "hotpotqa").records
  index = sq.BM25Index(sq.passages_from_questions(questions))
  prototype = sq.SearchQAEnv(questions, sq.SearchQAConfig(top_k=2, passage_budget=160), index=index)
  seeds = list(range(batch))
  scripts = []
  for seed in seeds:
    env = copy.copy(prototype)
    env.reset(seed)
    script = []
    while (command := env.expert_command()) is not None:
      script.append(command)
      env.step(command, None)
    scripts.append(script)
  return measure(functools.partial(copy.copy, prototype), batch, seeds, scripts, repeats)


def _rows(name: str, result: dict) -> list[str]:
  thread, process = result["thread"], result["process"]
  return [
      (f"| {name} | thread | {thread['start_s']:.2f} | {thread['steps_per_s']:.0f} | 1.00x | "
       f"{thread['cpu_ms_per_step']:.2f} |"),
      (f"| {name} | process | {process['start_s']:.2f} | {process['steps_per_s']:.0f} | "
       f"{process['steps_per_s'] / thread['steps_per_s']:.2f}x | {process['cpu_ms_per_step']:.2f} |"),
  ]


def main(argv=None):
  parser = arg_parser(__doc__, repeats=15)
  parser.add_argument("--batch", type=int, default=8, help="envs in the pool (the same for both isolations)")
  parser.add_argument("--games", type=int, default=4, help="TextWorld games generated")
  parser.add_argument("--search-qa", action="store_true", help="also measure search_qa")
  args = parser.parse_args(argv)
  results = {"textworld": textworld(args.batch, args.games, args.repeats)}
  if args.search_qa:
    results["search_qa"] = search_qa(args.batch, args.repeats)
  steps = {name: result["thread"]["steps"] for name, result in results.items()}
  lines = [
      (f"Host envs, batch {args.batch}, thread pool vs process pool, median of {args.repeats} runs after a warm-up "
       f"(env steps per run: {', '.join(f'{name} {n}' for name, n in steps.items())}; {os.cpu_count()} CPUs)"),
      "",
      "| env | isolation | start s | env steps/s | vs thread | CPU ms / env step |",
      "|---|---|---:|---:|---:|---:|",
      *(row for name, result in results.items() for row in _rows(name, result)),
      "",
      ("Transcripts identical in both isolations: " + ", ".join(
          f"{name} {'yes' if result['same'] else 'NO'}" for name, result in results.items())),
  ]
  emit(lines, args.markdown)
  if not all(result["same"] for result in results.values()):
    raise SystemExit("thread and process pools disagree")


if __name__ == "__main__":
  main()
