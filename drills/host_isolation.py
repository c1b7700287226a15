"""Host isolation drill: native crashes and hangs inside process-isolated host envs (`HostEnvPool(...,
isolation="process")`) end only their own episode, and every other episode plays exactly as in a run without them.

    python -m drills.host_isolation [--envs 3] [--batches 6] [--steps 4] [--timeout 1.0]

`DrillEnv` is a deterministic text env whose action words can kill its process: "segfault" (SIGSEGV sent to itself),
"null" (reads address 0 through ctypes: a real segfault), "exit" (`os._exit(1)`), "hang" (sleeps for an hour), and
"raise" (an ordinary ValueError). The drill plays `batches` batches of `envs` episodes twice: clean, and with one
crash or hang planted in each batch (cycling through `PLANTED`, at a different env and step each time). It checks
that the clean run equals the same run on threads (isolation="thread"), that each planted episode ended at its fault
as `error_step` (EnvCrash or TimeoutError), that the pool counted every fault, and that every other episode
(including the next episodes of a restarted slot) is identical to the clean run.
Prints one line: "host isolation drill: K crashes and H hangs isolated in N episodes; other episodes unchanged".
Imports no JAX: its workers start light.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
import time
from typing import Sequence

import numpy as np

from stepjax.envs.host import HostEnvPool, HostStep

FAULT_WORDS = ("segfault", "null", "exit", "hang", "raise")
PLANTED = ("segfault", "exit", "hang", "null")  # the faults the drill plants, in turn
RESET_FAULTS = {-1: "segfault", -2: "hang", -3: "raise"}  # seeds whose reset faults


def _fault(word: str) -> None:
  if word == "segfault":
    os.kill(os.getpid(), signal.SIGSEGV)
  elif word == "null":
    ctypes.string_at(0)
  elif word == "exit":
    os._exit(1)
  elif word == "hang":
    time.sleep(3600)
  elif word == "raise":
    raise ValueError("the drill env was told to raise")


class DrillEnv:
  """A deterministic text env (observation, reward and flags are functions of the seed and the actions so far) whose
  fault words (`FAULT_WORDS`) crash, hang or raise in `step`, and in `reset` the seeds of `RESET_FAULTS`; "done"
  terminates, `max_steps` truncates."""

  def __init__(self, max_steps: int = 4):
    if max_steps < 1:
      raise ValueError(f"DrillEnv: max_steps must be >= 1, got {max_steps}")
    self.max_steps = max_steps
    self.seed, self.t, self.closed = None, 0, False

  def reset(self, seed: int) -> str:
    if seed in RESET_FAULTS:
      _fault(RESET_FAULTS[seed])
    self.seed, self.t = int(seed), 0
    return f"episode {self.seed}: say words, then done\n> "

  def step(self, action_text: str, action_tokens: np.ndarray) -> HostStep:
    if action_text in FAULT_WORDS:
      _fault(action_text)
    self.t += 1
    terminated = action_text == "done"
    truncated = not terminated and self.t >= self.max_steps
    reward = float((self.seed * 31 + self.t * 7 + len(action_text)) % 5) / 4
    return HostStep(f"{self.seed}/{self.t}: heard {action_text!r} ({len(action_tokens)} tokens)\n> ", reward,
                    terminated=terminated, truncated=truncated,
                    info={"success": terminated and reward >= 0.5, "parsed": bool(action_text.strip())})

  def expert_command(self) -> str:
    return "done" if self.t >= 1 else f"word{self.seed}"

  def close(self) -> None:
    self.closed = True


def tokens(text: str) -> np.ndarray:
  return np.frombuffer(text.encode(), np.uint8).astype(np.int32)


def play(pool: HostEnvPool, seeds: Sequence[int], scripts: Sequence[Sequence[str]]) -> list[list[tuple]]:
  """Plays one episode per env (env i: `seeds[i]`, actions `scripts[i]`, one per step until the episode ends) ->
  per env its transcript: the first observation, then (observation, reward, terminated, truncated, info) per step."""
  transcripts = [[obs] for obs in pool.reset(seeds)]
  done = [False] * len(pool)
  for t in range(max(len(script) for script in scripts)):
    actions = [None if done[i] or t >= len(scripts[i]) else (scripts[i][t], tokens(scripts[i][t]))
               for i in range(len(pool))]
    if all(action is None for action in actions):
      break
    for i, result in enumerate(pool.step(actions)):
      if result is not None:
        transcripts[i].append((result.observation, result.reward, result.terminated, result.truncated,
                               result.info))
        done[i] = result.terminated or result.truncated
  return transcripts


def drill(num_envs: int = 3, batches: int = 6, steps: int = 4, timeout: float = 1.0) -> dict:
  """Runs the drill (module docstring) -> {"episodes", "crashes", "hangs", "wall_s"}; raises AssertionError when a
  fault leaked into another episode or was not recorded."""
  start = time.perf_counter()
  clean_scripts, planted_scripts, plants = [], [], []
  for b in range(batches):
    clean = [[f"w{b}{i}{t}" for t in range(steps)] for i in range(num_envs)]
    planted = [list(script) for script in clean]
    env, t, word = b % num_envs, (b * 2 + 1) % steps, PLANTED[b % len(PLANTED)]
    planted[env][t] = word
    clean_scripts.append(clean)
    planted_scripts.append(planted)
    plants.append((env, t, word))
  seeds = [[100 * b + i for i in range(num_envs)] for b in range(batches)]
  runs = {}
  for name, isolation, scripts in (("thread", "thread", clean_scripts), ("clean", "process", clean_scripts),
                                   ("planted", "process", planted_scripts)):
    with HostEnvPool(num_envs=num_envs, make_env=DrillEnv, isolation=isolation, timeout=timeout) as pool:
      runs[name] = [play(pool, seeds[b], scripts[b]) for b in range(batches)]
      counts = {"crashes": pool.crashes, "timeouts": pool.timeouts}
  assert runs["clean"] == runs["thread"]  # process isolation changes nothing of a clean run
  hangs = sum(word == "hang" for _, _, word in plants)
  assert counts == {"crashes": batches - hangs, "timeouts": hangs}, counts
  for b, (env, t, word) in enumerate(plants):
    for i in range(num_envs):
      clean, planted = runs["clean"][b][i], runs["planted"][b][i]
      if i != env:
        assert planted == clean, (b, i, planted, clean)  # every other episode: exactly the clean one
        continue
      assert planted[:t + 1] == clean[:t + 1], (b, i)  # the faulted episode: the same until its fault,
      observation, reward, terminated, truncated, info = planted[t + 1]
      expected = "Environment error: " + ("TimeoutError" if word == "hang" else "EnvCrash")
      assert (observation, reward, terminated, truncated, info["env_error"]) == (expected, 0.0, False, True, True)
      assert len(planted) == t + 2, (b, i)  # then it ends there
  return {"episodes": batches * num_envs, "crashes": batches - hangs, "hangs": hangs,
          "wall_s": time.perf_counter() - start}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--envs", type=int, default=3)
  parser.add_argument("--batches", type=int, default=6)
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--timeout", type=float, default=1.0, help="seconds a step may take (the hang's bound)")
  args = parser.parse_args(argv)
  result = drill(args.envs, args.batches, args.steps, args.timeout)
  print(f"host isolation drill: {result['crashes']} crashes and {result['hangs']} hangs isolated in "
        f"{result['episodes']} episodes; other episodes unchanged ({result['wall_s']:.1f} s)")


if __name__ == "__main__":
  sys.exit(main())
