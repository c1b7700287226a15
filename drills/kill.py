"""Kill drill: SIGKILL a training run at random moments, resume it each time, and check that nothing changed.

    python -m drills.kill --kills 20

Runs `experiments/train.py` (StepPO on one-hop lookup_qa with a 1-layer 32-wide model, one seed, `ITERATIONS`
iterations, an evaluation and an orbax checkpoint after every iteration) once uninterrupted, then again in a second
workdir, killing it `--kills` times (SIGKILL, no chance to clean up) and rerunning it with `--resume` after each kill
until it completes. The moments (seeded) are of four kinds:

  before_checkpoint  the first kill, at a random moment before the first checkpoint exists (during start-up or just
                     after the iteration-0 evaluation). `--resume` must then say so in one line (no traceback, exit
                     status 1), and a plain rerun starts over.
  checkpoint         shortly (0-30 ms) after the 2nd or 3rd new `<step>.orbax-checkpoint-tmp` directory appears:
                     often while orbax is still writing it (a tmp directory is left behind).
  log                0-10 ms after the 2nd-4th append to metrics.jsonl; half of these also leave a torn last line
                     (half a line, no newline) in metrics.jsonl or eval.jsonl, as a kill or a full disk in the middle
                     of a write would. (A SIGKILL cannot split one small write(2) of a regular file, so the drill
                     writes the torn piece itself.)
  random             a uniform moment within the wall time of the last run that completed (the uninterrupted one
                     at first).

A run that completes while kills remain is started over without `--resume` (its old checkpoints and logs in place).
At the end metrics.jsonl (without `runner.TIMING_KEYS`), eval.jsonl, sft.jsonl and the final checkpoint's whole
TrainState (params, optimizer state, rng, counters; restored from both workdirs) must be equal bit for bit to the
uninterrupted run's. Prints "kill drill: 20/20 kills survived, logs and params equal to the uninterrupted run".

The subprocesses share a persistent JAX compilation cache and compile with cheap XLA flags (`FAST_XLA_FLAGS`): every
start then costs the imports and tracing, not a compilation. Both runs use the same flags, so bit-identity holds.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO, "experiments", "train.py")
ITERATIONS = 8
CONFIG_FILE = "experiments/configs/steppo.py"
# The tiny config (tests/test_experiments.py `small`, one seed, no SFT): a start costs seconds, an iteration ~0.1 s.
OVERRIDES = {
    "env.step_format": "plain", "env.hops": 1, "env.max_hops": 1, "env.num_entities": 16,
    "rollout.max_steps": 4, "rollout.max_len": 128, "rollout.max_action_len": 6, "rollout.num_tasks": 2,
    "rollout.episodes_per_task": 2,
    "model.max_position_embeddings": 512, "model.attention_block": 0, "model.hidden_size": 32,
    "model.intermediate_size": 64, "model.num_layers": 1, "model.num_heads": 2, "model.num_kv_heads": 1,
    "model.head_dim": 16,
    "algo.minibatches": 2, "sft.steps": 0, "sft.num_tasks": 4,
    "train.eval_every": 1, "train.checkpoint_every": 1, "train.keep_checkpoints": 3, "train.eval_episodes": 4,
    "train.seeds": 1, "log.progress": False, "log.tensorboard": False,
}
FAST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
KINDS = ("checkpoint", "log", "random")
NOTHING_TO_RESUME = re.compile(r"^checkpoint\.directory: \S+ (does not exist \(nothing to resume\)|holds no complete "
                               r"checkpoint)$")
POLL_S = 0.002


def _flag(value) -> str:
  return str(value).lower() if isinstance(value, bool) else str(value)


def train_command(workdir: str, *, iterations: int = ITERATIONS, resume: bool = False) -> list[str]:
  """The experiments/train.py command line of the drill's config."""
  flags = [f"--config.{name}={_flag(value)}" for name, value in OVERRIDES.items()]
  return [sys.executable, TRAIN, f"--config={CONFIG_FILE}", f"--workdir={workdir}",
          f"--config.train.iterations={iterations}", *flags] + (["--resume"] if resume else [])


def make_config(iterations: int = ITERATIONS):
  """The same config in-process (to restore and compare the checkpoints)."""
  from experiments.configs import steppo  # noqa: PLC0415 (jax is imported only when comparing)

  config = steppo.get_config()
  for name, value in {**OVERRIDES, "train.iterations": iterations}.items():
    section, field = name.split(".")
    config[section][field] = value
  return config


def train_env(cache_dir: str) -> dict[str, str]:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + FAST_XLA_FLAGS).strip()
  env.setdefault("JAX_PLATFORMS", "cpu")
  env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env


@dataclasses.dataclass
class Kill:
  kind: str
  at_s: float  # seconds after the start of the attempt it killed
  resumed: bool  # the killed attempt was a resume
  tmp_left: bool  # an orbax tmp directory was there right after the kill (killed mid-write)
  torn: str  # the log left with a torn last line ("" when none)


@dataclasses.dataclass
class Result:
  kills: list[Kill]
  attempts: int
  restarts: int  # runs started over without --resume (after the kill before the first checkpoint, or a finish)
  nothing_to_resume: list[str]  # what --resume printed when no checkpoint existed (one line each)
  problems: list[str]
  seconds: float

  @property
  def ok(self) -> bool:
    return not self.problems

  def line(self) -> str:
    survived = len(self.kills) if self.ok else 0
    if self.ok:
      return (f"kill drill: {survived}/{len(self.kills)} kills survived, logs and params equal to the uninterrupted "
              "run")
    return f"kill drill: FAILED after {len(self.kills)} kills: {self.problems[0]}"

  def details(self) -> list[str]:
    counts = {kind: sum(k.kind == kind for k in self.kills) for kind in ("before_checkpoint",) + KINDS}
    return [", ".join(f"{n} {kind}" for kind, n in counts.items()) + f"; {sum(k.tmp_left for k in self.kills)} "
            f"left an orbax tmp directory, {sum(bool(k.torn) for k in self.kills)} a torn log line",
            f"{self.attempts} attempts ({sum(k.resumed for k in self.kills)} killed resumes, {self.restarts} "
            f"restarts), {self.seconds:.0f} s",
            *(f"--resume before any checkpoint: {line}" for line in self.nothing_to_resume[:1]),
            *self.problems]


class _Attempt:
  """One train.py process with its stdout/stderr files."""

  def __init__(self, workdir: str, logs: str, number: int, env: dict, iterations: int, resume: bool):
    self.resume, self.out_path = resume, os.path.join(logs, f"attempt{number:02d}.out")
    self.err_path = os.path.join(logs, f"attempt{number:02d}.err")
    with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
      self.start = time.monotonic()
      self.wall_start = time.time()
      self.proc = subprocess.Popen(train_command(workdir, iterations=iterations, resume=resume), cwd=REPO, env=env,
                                   stdout=out, stderr=err)

  def elapsed(self) -> float:
    return time.monotonic() - self.start

  def kill(self) -> float:
    at = self.elapsed()
    self.proc.send_signal(signal.SIGKILL)
    self.proc.wait()
    return at

  def stderr(self) -> str:
    with open(self.err_path) as f:
      return f.read()


def _note_new_tmp_dirs(checkpoint_dir: str, since: float, seen: set[str]) -> int:
  """Adds the orbax tmp directories created after `since` to `seen` (one exists at a time); returns how many."""
  try:
    entries = list(os.scandir(checkpoint_dir))
  except FileNotFoundError:
    return len(seen)
  for entry in entries:
    if ".orbax-checkpoint-tmp" in entry.name and entry.name not in seen:
      try:
        if entry.stat().st_mtime >= since:
          seen.add(entry.name)
      except FileNotFoundError:  # renamed (finalized) meanwhile: it was new
        seen.add(entry.name)
  return len(seen)


def _has_steps(checkpoint_dir: str) -> bool:
  return os.path.isdir(checkpoint_dir) and any(name.isdigit() for name in os.listdir(checkpoint_dir))


def _has_tmp(checkpoint_dir: str, since: float) -> bool:
  """An orbax tmp directory created after `since` is there (a save the kill cut short)."""
  return _note_new_tmp_dirs(checkpoint_dir, since, set()) > 0


def _wait_and_kill(attempt: _Attempt, kind: str, rng: random.Random, workdir: str, typical_s: float,
                   first_eval_s: float) -> float | None:
  """Kills the attempt at a moment of `kind`; None when it exited first."""
  checkpoint_dir = os.path.join(workdir, "checkpoints")
  metrics = os.path.join(workdir, "metrics.jsonl")
  if kind == "before_checkpoint":
    deadline, eval_log = rng.uniform(0.3, 1.0) * first_eval_s, os.path.join(workdir, "eval.jsonl")
    condition = lambda: attempt.elapsed() >= deadline or (os.path.exists(eval_log) and os.path.getsize(eval_log))
    delay = 0.0
  elif kind == "checkpoint":
    nth, seen_tmp = rng.randint(2, 3), set()
    condition = lambda: _note_new_tmp_dirs(checkpoint_dir, attempt.wall_start, seen_tmp) >= nth
    delay = rng.uniform(0.0, 0.03)
  elif kind == "log":
    nth, seen = rng.randint(2, 4), {"file": None, "appends": 0}

    def condition():
      try:
        stat = os.stat(metrics)
      except FileNotFoundError:
        return False
      if stat.st_mtime < attempt.wall_start:
        return False
      now = (stat.st_ino, stat.st_size)
      if seen["file"] is not None and now[0] == seen["file"][0] and now[1] > seen["file"][1]:
        seen["appends"] += 1
      seen["file"] = now
      return seen["appends"] >= nth

    delay = rng.uniform(0.0, 0.01)
  else:
    deadline = rng.uniform(0.0, typical_s)
    condition, delay = (lambda: attempt.elapsed() >= deadline), 0.0
  while not condition():
    if attempt.proc.poll() is not None:
      return None
    time.sleep(POLL_S)
  time.sleep(delay)
  if attempt.proc.poll() is not None:
    return None
  return attempt.kill()


def _tear(workdir: str, rng: random.Random) -> str:
  """Appends half of a log's last line, without its newline: what a write cut short leaves."""
  name = rng.choice(("metrics.jsonl", "eval.jsonl"))
  path = os.path.join(workdir, name)
  if not os.path.exists(path):
    return ""
  with open(path) as f:
    lines = [line for line in f.read().split("\n") if line.strip()]
  if not lines:
    return ""
  with open(path, "a") as f:
    f.write(lines[-1][:max(1, len(lines[-1]) // 2)])
  return name


def _one_line_error(text: str) -> str | None:
  """The error line of a train.py that failed cleanly (no traceback, one line besides absl/JAX warnings)."""
  lines = [line for line in text.splitlines() if line.strip() and not re.match(r"^[WI]\d{4} |^WARNING:", line)]
  if "Traceback" in text or len(lines) != 1:
    return None
  return lines[0]


def _compare_logs(reference: str, drilled: str) -> list[str]:
  from experiments import runner  # noqa: PLC0415

  problems = []
  for name in ("metrics.jsonl", "eval.jsonl", "sft.jsonl"):
    a, b = (runner._read_jsonl(os.path.join(d, name)) for d in (reference, drilled))
    a, b = ([{k: v for k, v in line.items() if k not in runner.TIMING_KEYS} for line in x] for x in (a, b))
    if a != b:
      first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
      problems.append(f"{name}: {len(b)} lines vs {len(a)} uninterrupted, first difference at line {first + 1}")
  return problems


def _compare_states(reference: str, drilled: str, iterations: int) -> list[str]:
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from experiments import runner  # noqa: PLC0415
  from stepjax import train  # noqa: PLC0415

  setup = runner.build(make_config(iterations))
  keys = jnp.stack([jax.random.key(seed) for seed in setup.seeds])
  abstract = jax.eval_shape(runner._programs(setup, False)["init"], keys, None)
  states = []
  for workdir in (reference, drilled):
    state, step = train.restore_checkpoint(os.path.join(workdir, "checkpoints"), abstract)
    if step != iterations:
      return [f"{workdir}: the last checkpoint is step {step}, not {iterations}"]
    states.append(state)

  def raw(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(x)

  paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(states[0])]
  for path, a, b in zip(paths, jax.tree.leaves(states[0]), jax.tree.leaves(states[1])):
    a, b = raw(a), raw(b)
    if a.shape != b.shape or a.dtype != b.dtype or a.tobytes() != b.tobytes():
      return [f"final state differs at {path}"]
  return []


def run_drill(kills: int, *, seed: int = 0, iterations: int = ITERATIONS, kinds: Sequence[str] | None = None,
              tear: float = 0.5, root: str | None = None, cache_dir: str | None = None,
              print_fn: Callable[[str], None] | None = None) -> Result:
  """The drill (module docstring) in `root` (a temporary directory by default, removed afterwards).

  kinds: the kind of every kill (default: "before_checkpoint", then drawn from KINDS); tear: the probability that a
  "log" kill also leaves a torn line; cache_dir: the subprocesses' JAX compilation cache (default: under root).
  """
  if not isinstance(kills, int) or kills < 1:
    raise ValueError(f"kills: must be an int >= 1, got {kills!r}")
  if kinds is not None and (len(kinds) != kills or any(k not in ("before_checkpoint",) + KINDS for k in kinds)
                            or "before_checkpoint" in kinds[1:]):
    raise ValueError(f"kinds: must be {kills} of {('before_checkpoint',) + KINDS} (before_checkpoint only first), "
                     f"got {kinds!r}")
  start = time.monotonic()
  owned = root is None
  root = tempfile.mkdtemp(prefix="kill_drill_") if owned else root
  log = print_fn or (lambda _: None)
  try:
    logs = os.path.join(root, "logs")
    os.makedirs(logs, exist_ok=True)
    env = train_env(cache_dir or os.path.join(root, "jax_cache"))
    reference, drilled = os.path.join(root, "uninterrupted"), os.path.join(root, "killed")
    number = 0

    # The uninterrupted run: the reference, and the times the random kills are drawn from.
    ref = _Attempt(reference, logs, number, env, iterations, resume=False)
    first_eval_s = None
    while ref.proc.poll() is None:
      path = os.path.join(reference, "eval.jsonl")
      if first_eval_s is None and os.path.exists(path) and os.path.getsize(path):
        first_eval_s = ref.elapsed()
      time.sleep(0.01)
    reference_s = ref.elapsed()
    if ref.proc.returncode != 0:
      return Result([], 1, 0, [], [f"the uninterrupted run failed: {ref.stderr().strip()[-500:]}"],
                    time.monotonic() - start)
    log(f"uninterrupted run: {reference_s:.1f} s (first evaluation after {first_eval_s:.1f} s)")

    rng = random.Random(seed)
    plan = list(kinds) if kinds else ["before_checkpoint"] + [rng.choice(KINDS) for _ in range(kills - 1)]
    done: list[Kill] = []
    nothing_to_resume, problems = [], []
    restarts, resume, typical_s = 0, False, reference_s
    while True:
      number += 1
      if number > 3 * kills + 10:
        problems.append(f"{number - 1} attempts and only {len(done)} kills: a kill of kind {plan[len(done)]!r} never "
                        "happened")
        break
      attempt = _Attempt(drilled, logs, number, env, iterations, resume)
      kind = plan[len(done)] if len(done) < kills else None
      at = _wait_and_kill(attempt, kind, rng, drilled, typical_s, first_eval_s) if kind else None
      if at is None:
        attempt.proc.wait()
      if at is not None:
        checkpoint_dir = os.path.join(drilled, "checkpoints")
        if kind == "before_checkpoint" and _has_steps(checkpoint_dir):
          problems.append(f"attempt {number}: a checkpoint existed before the first kill; the drill is mistimed")
          break
        torn = _tear(drilled, rng) if kind == "log" and rng.random() < tear else ""
        done.append(Kill(kind, at, resume, _has_tmp(checkpoint_dir, attempt.wall_start), torn))
        log(f"kill {len(done)}/{kills}: {kind} after {at:.2f} s{' (resumed)' if resume else ''}"
            f"{', orbax tmp left' if done[-1].tmp_left else ''}{', torn ' + torn if torn else ''}")
        resume = True
        continue
      code, err = attempt.proc.returncode, attempt.stderr()
      if code == 0:
        typical_s = attempt.elapsed()  # a warm start (cached compilation): where the random kills are drawn
        if len(done) == kills:
          break
        log(f"attempt {number} completed with {kills - len(done)} kills left: starting over")
        restarts, resume = restarts + 1, False
        continue
      line = _one_line_error(err)
      if resume and line is not None and NOTHING_TO_RESUME.match(line):
        nothing_to_resume.append(line)
        log(f"--resume: {line}; starting over")
        restarts, resume = restarts + 1, False
        continue
      problems.append(f"attempt {number} ({'--resume' if resume else 'fresh'}) exited {code}: "
                      + (line if line is not None else f"not one line: {err.strip()[-800:]}"))
      break
    if not problems:
      if done[0].kind == "before_checkpoint" and not nothing_to_resume:
        problems.append("--resume after the kill before the first checkpoint did not say 'nothing to resume'")
      problems += _compare_logs(reference, drilled)
      problems += _compare_states(reference, drilled, iterations)
    return Result(done, number + 1, restarts, nothing_to_resume, problems, time.monotonic() - start)
  finally:
    if owned:
      shutil.rmtree(root, ignore_errors=True)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--kills", type=int, default=20, help="how many SIGKILLs (the first before any checkpoint)")
  parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
  parser.add_argument("--iterations", type=int, default=ITERATIONS)
  parser.add_argument("--root", default=None, help="keep the workdirs and attempt logs here (default: a temp dir)")
  parser.add_argument("--verbose", action="store_true", help="print every kill as it happens")
  args = parser.parse_args(argv)
  result = run_drill(args.kills, seed=args.seed, iterations=args.iterations, root=args.root,
                     print_fn=print if args.verbose else None)
  print(result.line())
  for line in result.details():
    print(f"  {line}")
  return 0 if result.ok else 1


if __name__ == "__main__":
  sys.exit(main())
