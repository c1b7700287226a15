"""HostEnvPool with small Python envs, and JaxEnvAsHost against the jitted, vmapped pure-JAX env it adapts."""

import random
import threading
import time

import jax
import numpy as np
import pytest

from stepjax import rollout as rollout_lib
from stepjax.envs import host
from stepjax.tokenizers import ByteTokenizer

from helpers import CountEnv

TOK = ByteTokenizer()


class EchoEnv:
  """Answers `<name>:<action>` after a random short delay (so threads finish out of order); counts its calls."""

  def __init__(self, name, max_delay=0.02):
    self.name, self.max_delay = name, max_delay
    self.seed, self.steps, self.closed = None, 0, False

  def reset(self, seed):
    self.seed = seed
    return f"{self.name} starts with seed {seed}"

  def step(self, action_text, action_tokens):
    time.sleep(random.uniform(0, self.max_delay))
    self.steps += 1
    return host.HostStep(f"{self.name}:{action_text}", float(len(action_tokens)), terminated=False, truncated=False,
                         info={"success": False, "parsed": True})

  def close(self):
    self.closed = True


class BarrierEnv(EchoEnv):
  """Blocks in `step` until every env of the barrier is inside `step`: only a concurrent pool gets through."""

  def __init__(self, name, barrier):
    super().__init__(name, max_delay=0.0)
    self.barrier = barrier

  def step(self, action_text, action_tokens):
    self.barrier.wait()  # raises BrokenBarrierError after the barrier's timeout instead of hanging
    return super().step(action_text, action_tokens)


class FaultyEnv(EchoEnv):

  def step(self, action_text, action_tokens):
    if action_text == "boom":
      raise KeyError("no such thing")
    return super().step(action_text, action_tokens)


def _actions(texts):
  return [None if text is None else (text, np.asarray(TOK.encode(text), np.int32)) for text in texts]


def test_pool_results_come_back_in_env_order_and_idle_envs_are_untouched():
  envs = [EchoEnv(f"env{i}") for i in range(6)]
  with host.HostEnvPool(envs) as pool:
    assert len(pool) == 6
    assert pool.reset([10, 11, 12, 13, 14, 15]) == [f"env{i} starts with seed {10 + i}" for i in range(6)]
    assert [env.seed for env in envs] == [10, 11, 12, 13, 14, 15]
    for _ in range(3):
      results = pool.step(_actions(["a", None, "ccc", "dd", None, "e"]))
      assert results[1] is None and results[4] is None
      assert [r.observation for r in results if r is not None] == ["env0:a", "env2:ccc", "env3:dd", "env5:e"]
      assert [r.reward for r in results if r is not None] == [1.0, 3.0, 2.0, 1.0]
    assert [env.steps for env in envs] == [3, 0, 3, 3, 0, 3]
    with pytest.raises(ValueError, match="HostEnvPool.step: got 2 entries for 6 envs"):
      pool.step(_actions(["a", "b"]))
  assert all(env.closed for env in envs)  # the context manager closes every env


def test_pool_steps_envs_concurrently():
  n = 4
  barrier = threading.Barrier(n, timeout=10.0)
  with host.HostEnvPool([BarrierEnv(f"env{i}", barrier) for i in range(n)]) as pool:
    pool.reset(range(n))
    results = pool.step(_actions(["go"] * n))
  # Sequential stepping would break the barrier (BrokenBarrierError -> error steps) instead of passing it.
  assert [r.observation for r in results] == [f"env{i}:go" for i in range(n)]
  # The same check with one worker does fail, so the test above is not vacuous.
  barrier = threading.Barrier(n, timeout=0.2)
  with host.HostEnvPool([BarrierEnv(f"env{i}", barrier) for i in range(n)], max_workers=1) as pool:
    pool.reset(range(n))
    results = pool.step(_actions(["go"] * n))
  assert all(r.observation == "Environment error: BrokenBarrierError" for r in results)


def test_an_env_that_raises_becomes_an_error_step_and_the_others_are_fine():
  envs = [EchoEnv("env0"), FaultyEnv("env1"), EchoEnv("env2")]
  with host.HostEnvPool(envs, max_workers=2) as pool:
    pool.reset([0, 1, 2])
    results = pool.step(_actions(["x", "boom", "y"]))
    assert [results[0].observation, results[2].observation] == ["env0:x", "env2:y"]
    failed = results[1]
    assert failed.observation == "Environment error: KeyError"
    assert (failed.reward, failed.terminated, failed.truncated) == (0.0, False, True)
    assert failed.info == {"error": repr(KeyError("no such thing")), "env_error": True, "success": False,
                           "parsed": False}
    # The pool and the faulty env itself keep working.
    assert [r.observation for r in pool.step(_actions(["p", "q", None]))[:2]] == ["env0:p", "env1:q"]
  with pytest.raises(ValueError, match="max_workers must be >= 1"):
    host.HostEnvPool(envs, max_workers=0)


class HangingEnv(EchoEnv):
  """Never returns from `step("hang")` (until the test releases it), nor from `reset` of a seed in `hang_resets`."""

  def __init__(self, name, release, hang_resets=()):
    super().__init__(name, max_delay=0.0)
    self.release, self.hang_resets = release, set(hang_resets)

  def reset(self, seed):
    if seed in self.hang_resets:
      self.release.wait()
    return super().reset(seed)

  def step(self, action_text, action_tokens):
    if action_text == "hang":
      self.release.wait()
    return super().step(action_text, action_tokens)


def test_a_hung_step_times_out_and_a_fresh_env_takes_its_slot():
  release = threading.Event()
  made = []

  def make_env():
    made.append(EchoEnv(f"fresh{len(made)}", max_delay=0.0))
    return made[-1]

  envs = [EchoEnv("env0", max_delay=0.0), HangingEnv("env1", release)]
  try:
    with host.HostEnvPool(envs, timeout=0.3, make_env=make_env) as pool:
      pool.reset([0, 1])
      start = time.monotonic()
      results = pool.step(_actions(["x", "hang"]))
      assert time.monotonic() - start < 5.0  # the timeout, not the hung call, decides
      assert results[0].observation == "env0:x"
      hung = results[1]
      assert hung.observation == "Environment error: TimeoutError"
      assert (hung.reward, hung.terminated, hung.truncated) == (0.0, False, True)
      assert hung.info["env_error"] is True and "more than 0.3 s" in hung.info["error"]
      assert pool.timeouts == 1 and pool.envs[1] is made[0] and pool.envs[0] is envs[0]
      # The replacement plays on; the hung env is never called again (it is not closed either).
      assert pool.reset([5, 6]) == ["env0 starts with seed 5", "fresh0 starts with seed 6"]
      assert [r.observation for r in pool.step(_actions(["a", "b"]))] == ["env0:a", "fresh0:b"]
    assert envs[0].closed and made[0].closed and not envs[1].closed
  finally:
    release.set()  # lets the abandoned daemon thread end


def test_a_hung_reset_is_retried_once_on_a_fresh_env_then_raises():
  release = threading.Event()
  try:
    fresh = iter([EchoEnv("fresh0", max_delay=0.0), HangingEnv("fresh1", release, hang_resets={3}),
                  EchoEnv("fresh2", max_delay=0.0)])
    with host.HostEnvPool([HangingEnv("env0", release, hang_resets={1, 3})], timeout=0.2,
                          make_env=lambda: next(fresh)) as pool:
      assert pool.reset([1]) == ["fresh0 starts with seed 1"] and pool.timeouts == 1
      pool.envs[0] = HangingEnv("env0", release, hang_resets={3})
      with pytest.raises(TimeoutError, match=r"^HostEnvPool.reset: env 0 did not reset seed 3 within 0.2 s, twice"):
        pool.reset([3])
      assert pool.timeouts == 3 and pool.envs[0].name == "fresh2"  # the slot is usable again
  finally:
    release.set()
  with pytest.raises(ValueError, match="a timeout needs make_env"):
    host.HostEnvPool([EchoEnv("e")], timeout=1.0)
  with pytest.raises(ValueError, match="timeout must be > 0 seconds or None, got 0"):
    host.HostEnvPool([EchoEnv("e")], timeout=0, make_env=lambda: EchoEnv("e"))


# ---- JaxEnvAsHost ----


ENV = CountEnv(TOK)
PARAMS = ENV.default_params().replace(max_steps=5)


def _tokens(text):
  return np.asarray(TOK.encode(text) + [TOK.end_of_step_id], np.int32)


# Scripted actions per row: the expert (-> success), garbage (-> truncation), and a mix with an action longer than
# the env's 8-token view (cut, with its true length: never a command).
SCRIPTS = {
    1: ["hello", "next" * 4, "next", "next", "next"],
    3: ["next", "next", "next", "next", "done"],
    5: ["done"],
}


def _reference_episodes(keys, num_steps):
  """Observations / rewards / flags per row from the vmapped, jitted env, as the jitted rollout steps it."""
  reset = jax.jit(jax.vmap(ENV.reset, in_axes=(0, None)))
  step = jax.jit(jax.vmap(ENV.step, in_axes=(0, 0, 0, 0, None)))
  expert = jax.jit(jax.vmap(ENV.expert_action, in_axes=(0, 0, None)))
  b = keys.shape[0]
  state, obs, obs_len = reset(keys, PARAMS)
  episodes = [{"obs": [np.asarray(obs[i, :obs_len[i]])], "actions": [], "steps": []} for i in range(b)]
  done = np.zeros(b, bool)
  for t in range(num_steps):
    expert_tokens, expert_len = jax.device_get(expert(keys, state, PARAMS))
    actions = np.zeros((b, ENV.max_action_len), np.int32)
    lengths = np.zeros(b, np.int32)
    for i in range(b):
      if i in SCRIPTS:
        tokens = _tokens(SCRIPTS[i][t]) if t < len(SCRIPTS[i]) else _tokens("done")
      else:
        tokens = expert_tokens[i, :expert_len[i]]
      actions[i, :min(len(tokens), ENV.max_action_len)] = tokens[:ENV.max_action_len]
      lengths[i] = len(tokens)
      if not done[i]:
        episodes[i]["actions"].append(tokens)
    state, obs, obs_len, reward, term, trunc, info = jax.device_get(
        step(jax.random.split(jax.random.key(t), b), state, actions, lengths, PARAMS))
    for i in np.flatnonzero(~done):
      episodes[i]["obs"].append(obs[i, :obs_len[i]])
      episodes[i]["steps"].append((float(reward[i]), bool(term[i]), bool(trunc[i]), bool(info.success[i]),
                                   bool(info.parsed[i])))
    done |= term | trunc
  assert done.all()
  return episodes


def test_jax_env_as_host_replays_the_jitted_env_token_for_token():
  config = rollout_lib.RolloutConfig(num_tasks=6, episodes_per_task=1)
  keys, _ = rollout_lib.task_keys_and_groups(jax.random.key(3), config)
  episodes = _reference_episodes(keys, PARAMS.max_steps)
  envs = [host.JaxEnvAsHost(ENV, PARAMS, seed_to_key=lambda row: keys[row]) for _ in range(3)]
  with host.HostEnvPool(envs) as pool:
    for first in range(0, 6, 3):
      rows = list(range(first, first + 3))
      first_obs = pool.reset(rows)
      for row, obs in zip(rows, first_obs):
        assert obs.dtype == np.int32
        np.testing.assert_array_equal(obs, episodes[row]["obs"][0])
      for t in range(PARAMS.max_steps):
        actions = [(TOK.decode(episodes[row]["actions"][t], skip_special=True), episodes[row]["actions"][t])
                   if t < len(episodes[row]["actions"]) else None for row in rows]
        for row, action, result in zip(rows, actions, pool.step(actions)):
          if action is None:
            assert result is None
            continue
          assert "error" not in result.info, result.info
          np.testing.assert_array_equal(result.observation, episodes[row]["obs"][t + 1])
          reward, terminated, truncated, success, parsed = episodes[row]["steps"][t]
          assert result.reward == pytest.approx(reward)
          assert (result.terminated, result.truncated, result.info["success"], result.info["parsed"]) == (
              terminated, truncated, success, parsed)
  # The scripted rows cover success, invalid actions (the long one included) and truncation.
  outcomes = [episode["steps"][-1] for episode in episodes]
  assert outcomes[0][3] and outcomes[1][2] and not outcomes[1][3] and not any(s[4] for s in episodes[1]["steps"][:2])


def test_jax_env_as_host_default_keys_and_shared_compilation():
  adapter = host.JaxEnvAsHost(ENV, PARAMS)
  _, obs, obs_len = ENV.reset(jax.random.key(11), PARAMS)
  np.testing.assert_array_equal(adapter.reset(11), np.asarray(obs[:obs_len]))
  adapter.step("next", _tokens("next"))
  sizes = (host._jitted_reset._cache_size(), host._jitted_step._cache_size())  # pylint: disable=protected-access
  other = host.JaxEnvAsHost(ENV, PARAMS)
  other.reset(12)
  result = other.step("done", _tokens("done"))
  assert result.terminated and isinstance(result.observation, np.ndarray)
  assert (host._jitted_reset._cache_size(), host._jitted_step._cache_size()) == sizes  # no new compilation
  with pytest.raises(RuntimeError, match="before reset"):
    host.JaxEnvAsHost(ENV, PARAMS).step("next", _tokens("next"))
