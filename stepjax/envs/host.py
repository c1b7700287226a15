"""Host (Python) environments: the protocol the host loop drives, a thread pool that steps a batch of them, and an
adapter that runs a pure-JAX token environment behind the same protocol.

A host environment is an ordinary stateful Python object (a game interpreter, a sandbox, a web page, ...):

    observation = env.reset(seed)                     # text, or token ids
    step = env.step(action_text, action_tokens)       # -> HostStep

`action_tokens` are the ids the model generated for the step, exactly as generated (end-of-step token included);
`action_text` is their decoded text WITHOUT special tokens (the loop decodes with `skip_special=True`). Text
environments read the text; token environments (`JaxEnvAsHost`) read the ids. Observations may be text, which the
loop encodes once with the run's tokenizer, or int32 token ids, which it uses as they are (token-space consistency,
see docs/design.md).

`ChatEnv` wraps a host environment so that its observations come as a chat model's turns (`stepjax.chat`), as ids.

`HostEnvPool` steps many independent environments concurrently on threads: host environments spend their time in
native code (interpreters, XLA, sockets) that releases the GIL, so threads overlap the waits without pickling
anything across processes. A fault in one environment never takes down the batch: its step becomes a truncation
with a fixed feedback observation, and every other environment's result is kept. With a `timeout`, a step that hangs
is a fault too: its episode is truncated the same way (info "error" names the TimeoutError), the hung environment is
abandoned to its thread and a fresh one from `make_env` takes its slot, so the run goes on.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import jax
import numpy as np

from stepjax.envs.base import Environment

Observation = str | np.ndarray
Action = tuple[str, np.ndarray]

logger = logging.getLogger(__name__)

ERROR_FEEDBACK = "Environment error: {}"


@dataclasses.dataclass
class HostStep:
  """One environment step as the host loop sees it.

  observation: text (encoded once by the loop) or int32 token ids (used as is).
  reward: the step's reward.
  terminated: the real end of the task (no bootstrap).
  truncated: the environment's own step limit or a fault (bootstrap from the state after the step).
  info: at least "success" (bool, the task was solved) and "parsed" (bool, the action was understood).
  """

  observation: Observation
  reward: float
  terminated: bool
  truncated: bool
  info: dict


@runtime_checkable
class HostEnv(Protocol):
  """A stateful host environment holding one episode at a time."""

  def reset(self, seed: int) -> Observation:
    """Starts an episode chosen by `seed` (same seed, same episode) and returns its first observation."""
    ...

  def step(self, action_text: str, action_tokens: np.ndarray) -> HostStep:
    """Applies one action: its text without special tokens, and its token ids as generated."""
    ...


def error_step(error: BaseException) -> HostStep:
  """The step an environment's exception turns into: fixed feedback, no reward, truncated (the episode cannot go on,
  but it did not reach an end of task, so its value still bootstraps)."""
  return HostStep(observation=ERROR_FEEDBACK.format(type(error).__name__), reward=0.0, terminated=False,
                  truncated=True, info={"error": repr(error), "env_error": True, "success": False, "parsed": False})


def _guarded_step(index: int, env: HostEnv, action_text: str, action_tokens: np.ndarray) -> HostStep:
  try:
    return env.step(action_text, action_tokens)
  except Exception as error:  # pylint: disable=broad-except  -- one env's bug must not end the batch
    logger.warning("host env %d raised in step; its episode ends as truncated", index, exc_info=True)
    return error_step(error)


class HostEnvPool:
  """A batch of host envs stepped concurrently on a thread pool (envs are independent objects).

  Results always come back in the order of `envs`. `step` takes one `(action_text, action_tokens)` per env, or
  None for an env that is idle this step (its episode has ended); idle envs are not called and get None back.
  An exception inside one env's `step` becomes `error_step(exception)` for that env only. An exception in `reset`
  propagates (after every other env has finished resetting): a batch that cannot start is a setup error.

  `timeout` (seconds, None: wait forever) bounds every `reset` and `step` call. A step still running after it
  becomes `error_step(TimeoutError)`; the env is abandoned (never called or closed again: it may be stuck for good)
  and `make_env()` builds the one that takes its slot. A reset that times out is retried once on a fresh env; a
  second timeout raises. Timed calls run on daemon threads, so an abandoned call cannot keep the process alive.
  `timeouts` counts the calls that timed out.
  """

  def __init__(self, envs: Sequence[HostEnv], max_workers: int | None = None, *, timeout: float | None = None,
               make_env: Callable[[], HostEnv] | None = None):
    """`max_workers` threads (default: one per env, since envs mostly wait on native code); `timeout` and
    `make_env` as in the class docstring (a timeout needs `make_env`)."""
    self.envs = list(envs)
    if not self.envs:
      raise ValueError("HostEnvPool: envs must hold at least one environment")
    if max_workers is not None and max_workers < 1:
      raise ValueError(f"HostEnvPool: max_workers must be >= 1 or None, got {max_workers}")
    if timeout is not None and not timeout > 0:
      raise ValueError(f"HostEnvPool: timeout must be > 0 seconds or None, got {timeout}")
    if timeout is not None and make_env is None:
      raise ValueError("HostEnvPool: a timeout needs make_env, to replace an environment that hangs")
    self.timeout = timeout
    self.timeouts = 0
    self._make_env = make_env
    self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=max_workers or len(self.envs),
                                                           thread_name_prefix="host-env")

  def _submit(self, fn: Callable, *args) -> concurrent.futures.Future:
    """`fn(*args)` on the pool, or, with a timeout, on a daemon thread of its own (the executor's threads are joined
    at interpreter exit, so a call that never returns would keep the process alive)."""
    if self.timeout is None:
      return self._executor.submit(fn, *args)
    future: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
      future.set_running_or_notify_cancel()
      try:
        future.set_result(fn(*args))
      except BaseException as error:  # pylint: disable=broad-except  -- handed to the caller through the future
        future.set_exception(error)

    threading.Thread(target=run, name="host-env-timed", daemon=True).start()
    return future

  def _wait(self, futures: Sequence[concurrent.futures.Future | None]) -> None:
    """Until every future is done, or the timeout has passed since the calls started (they run concurrently)."""
    concurrent.futures.wait([f for f in futures if f is not None], timeout=self.timeout)

  def _abandon(self, index: int, what: str) -> None:
    self.timeouts += 1
    logger.warning("host env %d: %s did not return within %s s; the env is abandoned and replaced", index, what,
                   self.timeout)
    self.envs[index] = self._make_env()

  def __len__(self) -> int:
    return len(self.envs)

  def __enter__(self) -> "HostEnvPool":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def _check_batch(self, name: str, values: Sequence[Any]) -> None:
    if len(values) != len(self.envs):
      raise ValueError(f"HostEnvPool.{name}: got {len(values)} entries for {len(self.envs)} envs")

  def reset(self, seeds: Sequence[int]) -> list[Observation]:
    """First observation of each env, reset with its seed."""
    self._check_batch("reset", seeds)
    futures = [self._submit(env.reset, int(seed)) for env, seed in zip(self.envs, seeds)]
    self._wait(futures)  # every env is settled before any error surfaces
    for index, seed in enumerate(seeds):
      if not futures[index].done():  # only with a timeout: one retry on a fresh env
        self._abandon(index, f"reset({int(seed)})")
        futures[index] = self._submit(self.envs[index].reset, int(seed))
        self._wait([futures[index]])
        if not futures[index].done():
          self._abandon(index, f"reset({int(seed)})")
          raise TimeoutError(f"HostEnvPool.reset: env {index} did not reset seed {int(seed)} within {self.timeout} s, "
                             f"twice (on a fresh env too)")
    return [future.result() for future in futures]

  def step(self, actions: Sequence[Action | None]) -> list[HostStep | None]:
    """One step of every non-idle env, concurrently; None in, None out."""
    self._check_batch("step", actions)
    futures = [None if action is None else self._submit(_guarded_step, index, env, action[0], action[1])
               for index, (env, action) in enumerate(zip(self.envs, actions))]
    self._wait(futures)
    steps: list[HostStep | None] = []
    for index, future in enumerate(futures):
      if future is not None and not future.done():
        self._abandon(index, "step")
        steps.append(error_step(TimeoutError(f"host env step took more than {self.timeout} s")))
      else:
        steps.append(None if future is None else future.result())
    return steps

  def close(self) -> None:
    """Stops the threads and closes every env that has a `close` method (idempotent)."""
    self._executor.shutdown(wait=True)
    for env in self.envs:
      close = getattr(env, "close", None)
      if callable(close):
        close()


class ChatEnv:
  """A host env whose observations come as turns of a chat format (`stepjax.chat.ChatFormat`): int32 ids, the
  observation (text encoded once with `tokenizer`, or ids as given) wrapped as a user turn followed by the assistant
  header, the first one of an episode after the format's begin token and system turn.

  The actions are the inner env's as they are (the host loop decodes them without special tokens, so the turn-end
  token never reaches the env's text). Every observation goes through here, the expert's episodes (SFT) and the
  model's (RL, evaluation) alike, so both see the same token layout. An exception in the inner env's `step` becomes
  `error_step` here, wrapped like any observation. `expert_command`, `close` and any other attribute are the inner
  env's.
  """

  def __init__(self, env: HostEnv, chat: Any, tokenizer: Any):
    self.env = env
    self.chat = chat
    self.tokenizer = tokenizer

  def _ids(self, observation: Observation) -> np.ndarray:
    if isinstance(observation, str):
      return np.asarray(self.tokenizer.encode(observation), np.int32)
    return np.asarray(observation, np.int32).reshape(-1)

  def reset(self, seed: int) -> np.ndarray:
    return self.chat.wrap(self._ids(self.env.reset(seed)), first=True)

  def step(self, action_text: str, action_tokens: np.ndarray) -> HostStep:
    try:
      step = self.env.step(action_text, action_tokens)
    except Exception as error:  # pylint: disable=broad-except  -- as HostEnvPool does, but wrapped like the rest
      logger.warning("host env raised in step; its episode ends as truncated", exc_info=True)
      step = error_step(error)
    return dataclasses.replace(step, observation=self.chat.wrap(self._ids(step.observation), first=False))

  def expert_command(self) -> str | None:
    return self.env.expert_command()

  def close(self) -> None:
    close = getattr(self.env, "close", None)
    if callable(close):
      close()

  def __getattr__(self, name: str) -> Any:
    # Only reached for attributes this wrapper lacks; "env" itself is excluded so a half-built copy cannot recurse.
    if name == "env":
      raise AttributeError(name)
    return getattr(self.env, name)


def _reset_episode(env: Environment, key, params):
  return env.reset(key, params)


def _step_episode(env: Environment, reset_key, step_index, state, action, action_len, params):
  # A per-step key derived from the episode's own key, so that a host episode depends on its seed alone.
  return env.step(jax.random.fold_in(reset_key, step_index), state, action, action_len, params)


# The env object is a static argument (hashed by identity, like gymnax envs under jit): each env compiles once, and
# every adapter of that env shares the compiled functions through jit's own cache.
_jitted_reset = jax.jit(_reset_episode, static_argnums=0)
_jitted_step = jax.jit(_step_episode, static_argnums=0)


class JaxEnvAsHost:
  """A pure-JAX token environment (`stepjax.envs.base.Environment`) behind the `HostEnv` protocol.

  `reset(seed)` resets with key `seed_to_key(seed)`: the same episode the jitted rollout plays for that reset key
  (e.g. `seed_to_key=lambda row: keys[row]` with the rollout's `task_keys_and_groups` keys). Observations are int32
  token-id arrays of length obs_len (the env's buffer cut to its length). `step` reads `action_tokens` only: they are
  padded with `pad_id` or cut to `env.max_action_len`, and the env gets their true length, as in the jitted rollout.
  Step keys are `fold_in(reset_key, step_index)`; the jitted rollout draws its step keys from the rollout key
  instead, so environments whose transitions use the key match the rollout only in distribution (the shipped ones
  are deterministic given the reset key). reset and step are compiled once per env object and shared by every
  adapter of that env; the episode state stays on the device between steps.
  """

  def __init__(self, env: Environment, params: Any, seed_to_key: Callable[[int], Any] = jax.random.key,
               pad_id: int = 0):
    self.env = env
    self.params = params
    self.seed_to_key = seed_to_key
    self.pad_id = pad_id
    self._key = None
    self._state = None
    self._num_steps = 0

  def reset(self, seed: int) -> np.ndarray:
    self._key = self.seed_to_key(seed)
    self._state, obs, obs_len = _jitted_reset(self.env, self._key, self.params)
    self._num_steps = 0
    obs, obs_len = jax.device_get((obs, obs_len))
    return np.asarray(obs[:int(obs_len)], np.int32)

  def step(self, action_text: str, action_tokens: np.ndarray) -> HostStep:
    del action_text  # a token environment parses ids, never text
    if self._state is None:
      raise RuntimeError("JaxEnvAsHost.step called before reset")
    action_tokens = np.asarray(action_tokens, np.int32).reshape(-1)
    width = self.env.max_action_len
    action = np.full((width,), self.pad_id, np.int32)
    action[:min(width, action_tokens.size)] = action_tokens[:width]
    self._state, obs, obs_len, reward, terminated, truncated, info = _jitted_step(
        self.env, self._key, self._num_steps, self._state, action, np.int32(action_tokens.size), self.params)
    self._num_steps += 1
    # One transfer for everything the host needs; the state stays on the device.
    obs, obs_len, reward, terminated, truncated, parsed, success = jax.device_get(
        (obs, obs_len, reward, terminated, truncated, info.parsed, info.success))
    return HostStep(observation=np.asarray(obs[:int(obs_len)], np.int32), reward=float(reward),
                    terminated=bool(terminated), truncated=bool(truncated),
                    info={"success": bool(success), "parsed": bool(parsed)})
