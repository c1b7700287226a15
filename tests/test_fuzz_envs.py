"""The fuzz drill (drills/fuzz.py) in the suite: hypothesis draws the seed and the mix of action kinds for a few
hundred random action sequences per JAX environment, and the checker catches a deliberately broken environment.

Compile budget: one fuzz function per environment (fixed batch and step count, compiled without XLA's backend
optimisation: these runs are small), reused by every example; the broken env is the tiny counting env."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drills import fuzz
from drills.fuzz import ENV_CHECKS, GENERIC_CHECKS, KINDS, EnvSpec, fuzz_env
from stepjax.tokenizers import ByteTokenizer

from helpers import CountEnv

BATCH = 64
# One configuration per environment, the richest cheap one: think format with hops 1-4 (drawn per sequence),
# plain moves on grids of every size with and without key, and the largest textworld_lite with the admissible list.
NAMES = ("lookup_qa/think", "grid_nav/plain", "textworld_lite/think/admissible/largest")
BUILDERS = fuzz.drill_envs()
ENVS = {name: BUILDERS[name]() for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1),
       weights=st.lists(st.integers(0, 3), min_size=len(KINDS), max_size=len(KINDS)).filter(any),
       jitter=st.sampled_from([0.0, 0.0, 0.5]))
def test_random_action_sequences_break_no_invariant(name, seed, weights, jitter):
  env = ENVS[name]
  report = fuzz_env(env, env.default_params(), jax.random.key(seed), BATCH, batch_size=BATCH, weights=weights,
                    jitter=jitter, optimize=False)
  assert report.violations == 0, report.messages
  spec = fuzz.SPECS[env.name]
  assert report.sequences == BATCH and report.steps == BATCH * spec.num_steps
  # Every generic check and every one documented for this env ran, and nothing undocumented.
  own = {check for check in ENV_CHECKS if check.startswith(env.name + ".")}
  assert len(own) >= 6 and set(report.checks) == set(GENERIC_CHECKS) | own
  assert sum(report.stats["kinds"].values()) == report.steps
  if jitter == 0.0:  # the drawn mix is the mix used
    assert all(report.stats["kinds"][kind] == 0 for kind, w in zip(KINDS, weights) if w == 0)


@pytest.mark.parametrize("name", NAMES)
def test_the_default_mix_reaches_every_outcome(name):
  env = ENVS[name]
  report = fuzz_env(env, env.default_params(), jax.random.key(1), 4 * BATCH, batch_size=BATCH, optimize=False)
  assert report.violations == 0, report.messages
  stats = report.stats
  assert min(stats["kinds"].values()) > 0
  for outcome in ("parsed", "success", "terminated", "truncated", "after_done"):
    assert 0 < stats[outcome] < report.steps, outcome
  assert stats["parsed"] < report.steps - stats["after_done"]  # some running steps are not understood


def test_action_pool_mixes_valid_commands_and_near_misses():
  env = ENVS["lookup_qa/think"]
  ids, lengths = fuzz.action_pool(env, ("Quara", "mentor"))
  assert ids.shape == (fuzz.POOL_SIZE, env.max_action_len) and lengths.max() <= env.max_action_len
  assert not np.any(ids[np.arange(env.max_action_len)[None, :] >= lengths[:, None]])
  texts = [env.tokenizer.decode(row[:n]) for row, n in zip(ids, lengths)]
  canonical = [t for t in texts if t.startswith("<think>") and t.split("</think>")[-1].removesuffix("<|end_of_step|>")
               in env.commands.commands]
  assert 0.1 < len(canonical) / len(texts) < 0.5
  assert any(t.startswith("search ") for t in texts) and any("Quara" in t for t in texts)


class Broken:
  """An env wrapper that breaks one invariant at each of its first running steps, and un-finishes an episode."""

  def __init__(self, env, tokenizer):
    self.env, self.tokenizer = env, tokenizer

  def __getattr__(self, name):
    return getattr(self.env, name)

  def step(self, key, state, action, action_len, params):
    next_state, obs, obs_len, reward, terminated, truncated, info = self.env.step(key, state, action, action_len,
                                                                                  params)
    t, running = state.step_count, ~state.done
    obs = obs.at[0].set(jnp.where(running & (t == 0), self.tokenizer.vocab_size, obs[0]))
    reward = jnp.where(running & (t == 1), reward + 5.0, reward)
    reward = jnp.where(running & (t == 2), jnp.nan, reward)
    obs_len = jnp.where(running & (t == 3), self.env.max_obs_len + 1, obs_len)
    next_state = next_state.replace(done=next_state.done & running)  # done flips back on the step after the end
    return next_state, obs, obs_len, reward, terminated, truncated, info


# The counting env's documented rewards: 1 for the right count, invalid_penalty for an unparsed action, else 0.
COUNT_SPEC = EnvSpec(reward_range=lambda p: (jnp.minimum(0.0, p.invalid_penalty), jnp.float32(1.0)),
                     vary_params=lambda env, bits, p, n: p.replace(max_steps=1 + (bits[0] % 6).astype(jnp.int32)),
                     num_steps=8)


def test_the_checker_reports_a_broken_env():
  tokenizer = ByteTokenizer()
  env = CountEnv(tokenizer)
  env.tokenizer = tokenizer
  report = fuzz_env(Broken(env, tokenizer), env.default_params(), jax.random.key(0), 32, batch_size=32,
                    spec=COUNT_SPEC, optimize=False)
  for check in ("obs_vocab", "reward_range", "finite", "obs_len", "done_monotone"):
    assert report.failures.get(check, (0,))[0] > 0, (check, report.messages)
  assert report.violations == sum(count for count, _ in report.failures.values())
  assert len(report.messages) == len(report.failures)
  count, first = report.failures["obs_vocab"]
  assert count == 32 and first.startswith("sequence 0, step 1: every observation id in [0, vocab_size)")
  assert "(value nan)" in report.failures["finite"][1]
  # Every sequence runs past its budget (at most 6 of 8 steps), so every one un-finishes its episode.
  assert report.failures["done_monotone"][0] >= 32
