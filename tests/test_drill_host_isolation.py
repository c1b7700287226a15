"""HostEnvPool(isolation="process"): every env in a worker process of its own. The same results as the thread pool;
a segfault, an os._exit or a hang inside one env's step ends that episode only (error_step, counted, logged), its
worker is replaced by a fresh one, and every other episode is exactly what it is without the fault; workers end
with the pool, with its garbage collection and with the interpreter.

The envs are `drills.host_isolation.DrillEnv` (deterministic; fault words crash, hang or raise): a light module, so
workers start without JAX."""

import functools
import gc
import logging
import os
import subprocess
import sys
import textwrap
import time

import pytest

from drills.host_isolation import DrillEnv, drill, play
from stepjax.envs import host

SEEDS = [11, 12, 13]
SCRIPTS = [["a", "bb", "done"], ["ccc", "raise", "x"], ["d", "e", "f", "g", "h"]]


def _alive(pid):
  """The process exists and is not a zombie."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


def _wait_gone(pids, seconds=5.0):
  deadline = time.monotonic() + seconds
  while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
    time.sleep(0.05)
  return [pid for pid in pids if _alive(pid)]


def _pool(isolation="process", **kwargs):
  return host.HostEnvPool(num_envs=3, make_env=DrillEnv, isolation=isolation, **kwargs)


def test_process_pool_gives_the_thread_pools_results():
  results = {}
  for isolation in ("thread", "process"):
    with _pool(isolation) as pool:
      results[isolation] = [play(pool, SEEDS, SCRIPTS), play(pool, [21, 22, 23], [["q"], ["r", "s"], ["t"] * 6])]
      results[isolation].append([env.expert_command() for env in pool.envs])  # other methods run in the worker
      assert (pool.crashes, pool.timeouts) == (0, 0)
  assert results["process"] == results["thread"]
  first = results["process"][0]
  assert first[0][3][2] is True and first[2][4][3] is True  # "done" terminated, the step budget truncated
  raised = first[1][2]  # an ordinary exception of the env: the same error_step in both modes
  assert raised == ("Environment error: ValueError", 0.0, False, True,
                    {"error": repr(ValueError("the drill env was told to raise")), "env_error": True,
                     "success": False, "parsed": False})
  assert results["process"][2] == ["done", "done", "done"]


@pytest.mark.parametrize("word, exit_text", [("segfault", "killed by SIGSEGV"), ("null", "killed by SIGSEGV"),
                                             ("exit", "exit code 1")])
def test_a_crash_fails_only_its_episode_and_the_worker_restarts(word, exit_text, caplog):
  planted = [list(script) for script in SCRIPTS]
  planted[1][0] = word
  with _pool() as pool:
    clean = play(pool, SEEDS, SCRIPTS)
    pids = [env.pid for env in pool.envs]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="stepjax.envs.host"):
      crashed = play(pool, SEEDS, planted)
    logged = [record.getMessage() for record in caplog.records]
    after = play(pool, SEEDS, SCRIPTS)
    assert (pool.crashes, pool.timeouts) == (1, 0)
    new_pids = [env.pid for env in pool.envs]
  assert crashed[0] == clean[0] and crashed[2] == clean[2]  # the other episodes are unchanged
  assert crashed[1][0] == clean[1][0] and len(crashed[1]) == 2  # the same first observation; the crash ends it
  assert crashed[1][1] == ("Environment error: EnvCrash", 0.0, False, True,
                           {"error": repr(host.EnvCrash(f"host env worker died in step ({exit_text})")),
                            "env_error": True, "success": False, "parsed": False})
  assert after == clean  # the fresh worker of slot 1 plays on like the others
  assert new_pids[0] == pids[0] and new_pids[2] == pids[2] and new_pids[1] != pids[1] and not _alive(pids[1])
  assert logged == [
      f"host env 1: step: host env worker died in step ({exit_text}); a fresh worker takes its place"]


def test_a_hung_step_times_out_and_only_its_worker_is_replaced():
  planted = [list(script) for script in SCRIPTS]
  planted[0][0] = "hang"
  with _pool(timeout=0.5) as pool:
    clean = play(pool, SEEDS, SCRIPTS)
    pids = [env.pid for env in pool.envs]
    start = time.monotonic()
    hung = play(pool, SEEDS, planted)
    assert time.monotonic() - start < 5.0  # the timeout decides, not the hour-long sleep
    assert (pool.crashes, pool.timeouts) == (0, 1)
    assert play(pool, SEEDS, SCRIPTS) == clean
    new_pids = [env.pid for env in pool.envs]
  assert hung[1:] == clean[1:] and len(hung[0]) == 2
  assert hung[0][1] == ("Environment error: TimeoutError", 0.0, False, True,
                        {"error": repr(TimeoutError("host env step took more than 0.5 s")), "env_error": True,
                         "success": False, "parsed": False})
  assert new_pids[0] != pids[0] and new_pids[1:] == pids[1:]
  assert _wait_gone([pids[0]]) == []  # the hung worker was killed


def test_reset_faults_retry_once_then_raise_and_setup_errors_propagate():
  with _pool(timeout=0.3) as pool:
    with pytest.raises(host.EnvCrash, match=r"^HostEnvPool\.reset: env 1 crashed resetting seed -1, twice \(on a "
                                            r"fresh env too\): host env worker died in reset \(killed by SIGSEGV\)$"):
      pool.reset([0, -1, 2])
    with pytest.raises(TimeoutError, match=r"^HostEnvPool\.reset: env 2 did not reset seed -2 within 0\.3 s, twice"):
      pool.reset([0, 1, -2])
    assert (pool.crashes, pool.timeouts) == (2, 2)
    # The env's own error: no retry; raised in the parent with the worker's traceback as a note.
    with pytest.raises(ValueError, match="^the drill env was told to raise\nhost env worker traceback:\n"):
      pool.reset([-3, 1, 2])
    assert (pool.crashes, pool.timeouts) == (2, 2)
    assert pool.reset([0, 1, 2]) == [f"episode {i}: say words, then done\n> " for i in range(3)]
  with host.HostEnvPool(num_envs=2, make_env=functools.partial(DrillEnv, max_steps=0), isolation="process") as pool:
    with pytest.raises(ValueError, match="^DrillEnv: max_steps must be >= 1, got 0\nhost env worker traceback:\n"):
      pool.reset([0, 1])  # make_env failed in the worker: a setup error


@pytest.mark.parametrize("kwargs, message", [
    ({"num_envs": 2, "make_env": lambda: DrillEnv(), "isolation": "process"},
     (r"^HostEnvPool: isolation='process' needs a picklable make_env \(a module-level function or class, or a "
      r"functools\.partial of one\): Can't pickle")),
    ({"num_envs": 2, "make_env": DrillEnv, "isolation": "fork"},
     r"^HostEnvPool: isolation must be one of thread, process, got 'fork'$"),
    ({"envs": [DrillEnv()], "make_env": DrillEnv, "isolation": "process"},
     r"^HostEnvPool: isolation='process' builds each env in its worker: pass num_envs and make_env, not envs$"),
    ({"num_envs": 0, "make_env": DrillEnv}, r"^HostEnvPool: num_envs must be an int >= 1 with make_env, got 0$"),
])
def test_bad_pool_arguments_are_one_line(kwargs, message):
  with pytest.raises(ValueError, match=message) as error:
    host.HostEnvPool(**kwargs)
  assert "\n" not in str(error.value)


def test_workers_end_with_the_pool_its_collection_and_the_interpreter():
  with _pool() as pool:
    pool.reset(SEEDS)
    pids = [env.pid for env in pool.envs]
    assert all(_alive(pid) for pid in pids)
  assert _wait_gone(pids) == [] and [env.pid for env in pool.envs] == [None] * 3
  pool = _pool()
  pool.reset(SEEDS)
  pids = [env.pid for env in pool.envs]
  del pool
  gc.collect()
  assert _wait_gone(pids) == []
  # A program that never closes its pool (nor its workers) leaves no process behind when it exits.
  script = textwrap.dedent("""
      from drills.host_isolation import DrillEnv
      from stepjax.envs.host import HostEnvPool

      if __name__ == "__main__":
        pool = HostEnvPool(num_envs=2, make_env=DrillEnv, isolation="process")
        pool.reset([0, 1])
        print(*[env.pid for env in pool.envs])
  """)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=60,
                       check=True)
  pids = [int(pid) for pid in out.stdout.split()]
  assert len(pids) == 2 and _wait_gone(pids) == []


def test_the_drill_isolates_every_planted_fault():
  result = drill(num_envs=2, batches=4, steps=3, timeout=0.5)
  assert (result["episodes"], result["crashes"], result["hangs"]) == (8, 3, 1)


def test_host_runner_isolation_field_preset_and_process_pool(tmp_path):
  from experiments import host_runner, runner  # pylint: disable=import-outside-toplevel
  from experiments.configs import grpo, presets  # pylint: disable=import-outside-toplevel
  from stepjax.testing import write_multihop_questions  # pylint: disable=import-outside-toplevel

  assert presets.HOST_ENV_PRESETS["textworld"]["env"]["isolation"] == "process"
  assert presets.HOST_ENV_PRESETS["search_qa"]["env"]["isolation"] == "thread"
  data = tmp_path / "questions.json"
  write_multihop_questions(data)
  config = grpo.get_config()
  config.env.update(name="search_qa", data=str(data), isolation="fork")
  with pytest.raises(ValueError, match=r"^env\.isolation: unknown 'fork'; allowed: thread, process$"):
    runner.build(config)
  steps = {}
  for isolation in ("thread", "process"):
    config.env.isolation = isolation
    setup = runner.build(config)
    with host_runner.env_pool(setup, setup.host.train_items, 2) as pool:
      assert pool.isolation == isolation
      steps[isolation] = [pool.reset([0, 1])]
      for _ in range(3):
        actions = [(env.expert_command(), None) for env in pool.envs]
        steps[isolation].append([(r.observation, r.reward, r.terminated, r.info) for r in pool.step(actions)])
  assert steps["process"] == steps["thread"] and steps["process"][-1][0][2] is True
