"""Test helpers shared by several test files: a tiny counting environment and a jitted runner for pure-JAX
environments that plays the expert, random commands, random tokens or given actions."""

import jax
import jax.numpy as jnp
from flax import struct

from stepjax.envs.base import CommandTable, Environment, Fragments, StepInfo


@struct.dataclass
class CountParams:
  max_steps: int = 8
  invalid_penalty: float = -0.1


@struct.dataclass
class CountState:
  target: jax.Array
  count: jax.Array
  step_count: jax.Array
  done: jax.Array


class CountEnv(Environment):
  """'Count to n': say `next` n times, then `done` (reward 1 if the count is right). The step budget and the no-op
  after the end come from `Environment.step`."""

  name = "count"
  max_action_len = 8

  def __init__(self, tokenizer):
    self.fragments = Fragments(tokenizer, ["Count to ", "1", "2", "3", ". Say next or done.\n> ", "ok\n> ",
                                           "Invalid.\n> ", "Right!", "Wrong."])
    self.commands = CommandTable(tokenizer, ["next", "done"])
    self.end_of_step = tokenizer.end_of_step_id
    self.max_obs_len = self.fragments.max_len_of([0, 1, 4])

  def default_params(self):
    return CountParams()

  def reset(self, key, params):
    target = jax.random.randint(key, (), 1, 4)
    obs, n = self.fragments.compose(jnp.array([0, target, 4]), self.max_obs_len)
    return CountState(target, jnp.int32(0), jnp.int32(0), jnp.bool_(False)), obs, n

  def step_env(self, key, state, action, action_len, params):
    cmd = self.commands.match(action, action_len)
    is_next, is_done, invalid = cmd == 0, cmd == 1, cmd < 0
    right = state.count == state.target
    frag = jnp.select([invalid, is_next, right], [6, 5, 7], 8)
    obs, n = self.fragments.compose(frag[None], self.max_obs_len)
    reward = jnp.where(is_done & right, 1.0, 0.0) + jnp.where(invalid, params.invalid_penalty, 0.0)
    return (state.replace(count=state.count + is_next), obs, n, reward, is_done,
            StepInfo(parsed=~invalid, success=is_done & right))

  def expert_action(self, key, state, params):
    return self.commands.encode(jnp.where(state.count < state.target, 0, 1), self.max_action_len, self.end_of_step)

  def render(self, state):
    return f"target {int(state.target)}, count {int(state.count)}"


def make_env_runner(env, num_steps):
  """One jitted episode loop, vmapped over keys, for every policy: the policy is a traced `mode`, so each env
  compiles it once. (keys [B], params, mode, given_actions [B, T, A], given_lens [B, T]) -> dict of arrays."""
  action_len_max, vocab_size = env.max_action_len, env.tokenizer.vocab_size
  # Every command as an action, laid out on the host (a gather from a constant compiles faster than `encode`).
  command_actions = [env.tokenizer.encode(text) + [env.tokenizer.end_of_step_id] for text in env.commands.commands]
  command_lens = jnp.asarray([len(ids) for ids in command_actions], jnp.int32)
  command_actions = jnp.asarray([ids + [0] * (action_len_max - len(ids)) for ids in command_actions], jnp.int32)

  def episode(key, params, mode, given_actions, given_lens):
    reset_key, policy_key, env_key = jax.random.split(key, 3)
    state, obs, obs_len = env.reset(reset_key, params)
    # All the random policies' draws at once (each jax.random call is seconds of compile on a loaded CPU).
    draws = (jax.random.bits(policy_key, (num_steps, action_len_max + 2), jnp.uint32) >> 1).astype(jnp.int32)

    def body(state, inputs):
      step_draws, given_action, given_len = inputs
      expert_action, expert_len = env.expert_action(policy_key, state, params)
      command = step_draws[0] % command_lens.shape[0]
      command_action, command_len = command_actions[command], command_lens[command]
      random_len = step_draws[1] % (action_len_max + 1)
      random_action = jnp.where(jnp.arange(action_len_max) < random_len, step_draws[2:] % vocab_size, 0)
      action = jnp.stack([expert_action, command_action, random_action, given_action])[mode]
      action_len = jnp.stack([expert_len, command_len, random_len, given_len])[mode]
      state, obs, obs_len, reward, terminated, truncated, info = env.step(env_key, state, action, action_len, params)
      return state, dict(obs=obs, obs_len=obs_len, reward=reward, terminated=terminated, truncated=truncated,
                         parsed=info.parsed, success=info.success, action=action, action_len=action_len)

    final_state, steps = jax.lax.scan(body, state, (draws, given_actions, given_lens))
    return dict(initial_state=state, initial_obs=obs, initial_len=obs_len, final_state=final_state, **steps)

  jitted = jax.jit(jax.vmap(episode, in_axes=(0, None, None, 0, 0)))

  def run(keys, params, mode, given_actions=None, given_lens=None):
    if given_actions is None:
      given_actions = jnp.zeros((keys.shape[0], num_steps, action_len_max), jnp.int32)
      given_lens = jnp.zeros((keys.shape[0], num_steps), jnp.int32)
    return jax.device_get(jitted(keys, params, jnp.int32(mode), given_actions, given_lens))

  return run
