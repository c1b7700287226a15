"""Host (Python) environments: the protocol the host loop drives, a pool that steps a batch of them (on threads, or
each in its own worker process), and an adapter that runs a pure-JAX token environment behind the same protocol.

A host environment is an ordinary stateful Python object (a game interpreter, a sandbox, a web page, ...):

    observation = env.reset(seed)                     # text, or token ids
    step = env.step(action_text, action_tokens)       # -> HostStep

`action_tokens` are the ids the model generated for the step, exactly as generated (end-of-step token included);
`action_text` is their decoded text WITHOUT special tokens (the loop decodes with `skip_special=True`). Text
environments read the text; token environments (`JaxEnvAsHost`) read the ids. Observations may be text, which the
loop encodes once with the run's tokenizer, or int32 token ids, which it uses as they are (token-space consistency,
see docs/design.md).

`ChatEnv` wraps a host environment so that its observations come as a chat model's turns (`stepjax.chat`), as ids.

`HostEnvPool` steps many independent environments concurrently. With isolation="thread" (the default) the envs are
objects of this process, called on threads: host environments spend their time in native code (interpreters, XLA,
sockets) that releases the GIL, so threads overlap the waits without pickling anything. With isolation="process"
every env lives in a worker process of its own, built there by a picklable `make_env` and called over a pipe (the
pool's threads then only wait on pipes): a native crash of one env (a segfault in an interpreter, an `os._exit`)
kills its worker, not the trainer. A fault in one environment never takes down the batch: its step becomes a
truncation with a fixed feedback observation (`error_step`), and every other environment's result is kept. With a
`timeout`, a step that hangs is a fault too. A hung or crashed env is replaced by a fresh one from `make_env` (a hung
thread-mode env is abandoned to its thread; a process-mode worker is killed and started again), so the run goes on.

This module imports no JAX at load time (only `JaxEnvAsHost` needs it, and imports it when used): a process-mode
worker imports it, and a worker's start should cost an interpreter and its env, not an ML framework.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
import traceback
import weakref
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np

if TYPE_CHECKING:
  from stepjax.envs.base import Environment

Observation = str | np.ndarray
Action = tuple[str, np.ndarray]

logger = logging.getLogger(__name__)

ERROR_FEEDBACK = "Environment error: {}"
ISOLATIONS = ("thread", "process")
# Seconds a fresh worker may take to start (interpreter fork, imports, make_env) before its first call is a timeout
# fault; the per-call timeout counts from the moment the worker is ready.
WORKER_START_TIMEOUT = 120.0
# Seconds a closing worker gets to close its env and exit before it is killed.
WORKER_CLOSE_GRACE = 5.0


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


class EnvCrash(RuntimeError):
  """An env's worker process died during a call (a native crash, `os._exit`, a kill): the error its step records."""


class EnvFault(RuntimeError):
  """A call into a process-isolated env failed for the process, not the env: its worker died (`kind` "crash",
  `error` an EnvCrash) or the call outlived the pool's timeout (`kind` "timeout", `error` a TimeoutError). The worker
  has already been replaced by a fresh one when this is raised."""

  def __init__(self, kind: str, error: BaseException):
    super().__init__(f"{kind}: {error}")
    self.kind = kind
    self.error = error


# ---------------------------------------------------------------------------------------------------------------
# Process isolation: one worker process per env.

def _exit_with_parent(parent_pid: int) -> None:
  """A worker's watchdog: ends the worker once its parent is gone (a worker stuck in its env never reads the EOF
  that a dead parent leaves on its pipe)."""
  while True:
    time.sleep(1.0)
    if os.getppid() != parent_pid:
      os._exit(0)


def _with_remote_traceback(error: Exception) -> Exception:
  """`error` with the worker's traceback as a note (notes travel with the pickled exception; repr ignores them)."""
  note = "host env worker traceback:\n" + "".join(traceback.format_exception(error)).rstrip()
  if note not in getattr(error, "__notes__", ()):
    error.add_note(note)
  return error


def _serve(conn, make_env: Callable[[], HostEnv]) -> None:
  """A worker process: builds its env with `make_env`, says ("ready", None), then answers each (method, args)
  request with ("ok", result) or ("error", exception) until ("close", ()) or the end of the pipe. An exception of
  `make_env` is the answer to every request (a reset then raises it: a setup error)."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it closes the workers
  threading.Thread(target=_exit_with_parent, args=(os.getppid(),), name="host-env-watchdog", daemon=True).start()
  env, setup_error = None, None
  try:
    env = make_env()
  except Exception as error:  # pylint: disable=broad-except  -- reported to the parent at its first call
    setup_error = _with_remote_traceback(error)
  conn.send(("ready", None))
  while True:
    try:
      method, args = conn.recv()
    except (EOFError, OSError):
      break  # the parent is gone
    if method == "close":
      close = getattr(env, "close", None)
      try:
        if callable(close):
          close()
      finally:
        conn.send(("ok", None))
      break
    try:
      if setup_error is not None:
        raise setup_error
      reply = ("ok", getattr(env, method)(*args))
    except Exception as error:  # pylint: disable=broad-except  -- the parent raises it as the env's own error
      reply = ("error", _with_remote_traceback(error))
    try:
      conn.send(reply)
    except Exception as error:  # pylint: disable=broad-except  -- an answer that does not pickle
      conn.send(("error", RuntimeError(f"host env worker could not send the answer to {method}: {error!r}")))


def _exit_text(exitcode: int | None) -> str:
  if exitcode is None:
    return "still running, killed"
  if exitcode < 0:
    try:
      return f"killed by {signal.Signals(-exitcode).name}"
    except ValueError:
      return f"killed by signal {-exitcode}"
  return f"exit code {exitcode}"


_PRELOAD: set[str] = {"__main__", __name__}  # what the forkserver is told to import (the main script and this module)
_PRELOAD_SENT: set[str] = set()
_PRELOAD_LOCK = threading.Lock()


def _process_context(preload: Sequence[str]):
  """The multiprocessing context of process-mode workers: "forkserver" (POSIX) or "spawn", never "fork" (the parent
  runs JAX's and the pool's threads). The forkserver imports `preload` (with this module and the main script) once
  and forks every worker from there, so a worker starts with them loaded and shares their memory; only modules named
  before the forkserver first starts are preloaded (a later pool's are imported by each of its workers instead).
  As with any non-fork start method, a main script must keep its entry point under `if __name__ == "__main__":` (a
  script run by path is preloaded as "__main__"; a module run with `python -m` is imported again by every worker,
  multiprocessing's rule for unpickling what it defines, so keep its imports light), and no preloaded module may
  start threads at import (the forkserver forks)."""
  if "forkserver" not in multiprocessing.get_all_start_methods():
    return multiprocessing.get_context("spawn")
  context = multiprocessing.get_context("forkserver")
  with _PRELOAD_LOCK:
    _PRELOAD.update(preload)
    if _PRELOAD != _PRELOAD_SENT:
      context.set_forkserver_preload(["__main__", *sorted(_PRELOAD - {"__main__"})])
      _PRELOAD_SENT.update(_PRELOAD)
  return context


@dataclasses.dataclass
class _Worker:
  process: Any
  conn: Any
  ready: bool = False


def _stop_worker(worker: _Worker, grace: float) -> None:
  """Asks the worker to close its env and exit; kills it after `grace` seconds (or at once when its pipe is gone)."""
  try:
    if worker.process.is_alive():
      worker.conn.send(("close", ()))
      if worker.conn.poll(grace):
        worker.conn.recv()
  except (EOFError, OSError):
    pass
  worker.process.join(grace if worker.process.is_alive() else None)
  if worker.process.is_alive():
    worker.process.kill()
    worker.process.join()
  worker.conn.close()


def _stop_box(box: list) -> None:
  """The finalizer of a `ProcessEnv` (at garbage collection or interpreter exit): stops the worker it holds."""
  if box:
    _stop_worker(box.pop(), grace=1.0)


class ProcessEnv:
  """One env in a worker process of its own (built there by `make_env`), behind the `HostEnv` protocol: every call
  (`reset`, `step`, or any other env method by name, e.g. `expert_command()`) travels over a pipe, and its result or
  exception comes back (exceptions keep their type; the worker's traceback is a note).

  When the worker dies during a call, or the call outlives `timeout` seconds (None: wait forever; a fresh worker's
  start does not count, it has WORKER_START_TIMEOUT), the worker is killed and a fresh one from `make_env` takes its
  place, and the call raises `EnvFault` (`HostEnvPool` turns it into `error_step` of the fault's error). `close`
  closes the env and ends the worker; the worker is also ended when this object is collected or the interpreter
  exits, and it ends itself when its parent dies.
  """

  def __init__(self, make_env: Callable[[], HostEnv], *, timeout: float | None = None, context: Any = None,
               name: str = "host-env"):
    self.make_env = make_env
    self.timeout = timeout
    self.name = name
    self._context = context if context is not None else _process_context(())
    self._box: list[_Worker] = []
    self._finalizer = weakref.finalize(self, _stop_box, self._box)
    self._start()

  def _start(self) -> None:
    parent_conn, child_conn = self._context.Pipe()
    process = self._context.Process(target=_serve, args=(child_conn, self.make_env), name=self.name, daemon=True)
    process.start()
    child_conn.close()  # the worker holds the only other end: its death is an EOF here
    self._box.append(_Worker(process, parent_conn))

  @property
  def pid(self) -> int | None:
    """The current worker's process id (None once closed)."""
    return self._box[0].process.pid if self._box else None

  def _restart(self, kind: str, error: BaseException) -> EnvFault:
    """Replaces the worker (killed if alive) by a fresh one; -> the EnvFault to raise."""
    worker = self._box.pop()
    worker.process.kill()
    worker.process.join()
    worker.conn.close()
    self._start()
    return EnvFault(kind, error)

  def _exchange(self, worker: _Worker, method: str, args: tuple) -> tuple[str, Any]:
    """One request -> ("ok", result) or ("error", exception) from the worker, or ("timeout", TimeoutError) /
    ("crash", EnvCrash) when it did not answer in time / died."""
    try:
      if not worker.ready:
        if not worker.conn.poll(WORKER_START_TIMEOUT):
          return "timeout", TimeoutError(f"host env worker did not start within {WORKER_START_TIMEOUT} s")
        worker.conn.recv()  # ("ready", None)
        worker.ready = True
      worker.conn.send((method, args))
      if self.timeout is not None and not worker.conn.poll(self.timeout):
        return "timeout", TimeoutError(f"host env {method} took more than {self.timeout} s")
      return worker.conn.recv()
    except (EOFError, OSError):  # the worker died: its pipe ended (EOFError) or broke (BrokenPipeError, ...)
      worker.process.join(WORKER_CLOSE_GRACE)
      return "crash", EnvCrash(f"host env worker died in {method} ({_exit_text(worker.process.exitcode)})")

  def call(self, method: str, *args) -> Any:
    """`env.<method>(*args)` in the worker; raises the env's exception, or EnvFault (see the class docstring)."""
    if not self._box:
      raise RuntimeError(f"ProcessEnv.{method}: the env is closed")
    status, value = self._exchange(self._box[0], method, args)
    if status in ("timeout", "crash"):
      raise self._restart(status, value)
    if status == "error":
      raise value
    return value

  def reset(self, seed: int) -> Observation:
    return self.call("reset", seed)

  def step(self, action_text: str, action_tokens: np.ndarray) -> HostStep:
    return self.call("step", action_text, action_tokens)

  def close(self) -> None:
    """Closes the env in the worker and ends the worker (idempotent)."""
    if self._box:
      _stop_worker(self._box.pop(), grace=WORKER_CLOSE_GRACE)
    self._finalizer.detach()

  def __getattr__(self, name: str) -> Any:
    # Only reached for attributes this class lacks: the env's other methods, called in the worker.
    if name.startswith("_"):
      raise AttributeError(name)
    return functools.partial(self.call, name)


# ---------------------------------------------------------------------------------------------------------------
# The pool.

class HostEnvPool:
  """A batch of host envs stepped concurrently (envs are independent objects), on threads or each in its own worker
  process (`isolation`).

  Results always come back in the order of the envs. `step` takes one `(action_text, action_tokens)` per env, or
  None for an env that is idle this step (its episode has ended); idle envs are not called and get None back.
  An exception inside one env's `step` becomes `error_step(exception)` for that env only. An exception in `reset`
  propagates (after every other env has finished resetting): a batch that cannot start is a setup error.

  Envs: `envs` (thread mode), or `num_envs` envs built by `make_env()`: in this process (thread mode) or in each
  worker (process mode: `make_env` must pickle, e.g. a module-level class or a functools.partial of one; `envs[i]`
  are then `ProcessEnv`s, whose other methods, such as `expert_command()`, run in the worker too).

  Faults: `timeout` (seconds, None: wait forever) bounds every `reset` and `step` call. A step still running after it
  becomes `error_step(TimeoutError)`, and a step whose worker died (process mode: a segfault, `os._exit`, a kill)
  becomes `error_step(EnvCrash)`; the env is replaced by a fresh one from `make_env` (thread mode: the hung env is
  abandoned, never called or closed again, and `make_env()` builds the one that takes its slot; process mode: the
  worker is killed and a fresh worker takes its slot). A reset that faults is retried once on a fresh env; a second
  fault raises (TimeoutError or EnvCrash). Timed thread-mode calls run on daemon threads, so an abandoned call cannot
  keep the process alive. `timeouts` and `crashes` count the calls that faulted so; every fault is logged.

  `preload`: modules process-mode workers need (e.g. the env's library), imported once by the forkserver the workers
  are forked from (`_process_context`); thread mode ignores it.
  """

  def __init__(self, envs: Sequence[HostEnv] | None = None, max_workers: int | None = None, *,
               timeout: float | None = None, make_env: Callable[[], HostEnv] | None = None,
               isolation: str = "thread", num_envs: int | None = None, preload: Sequence[str] = ()):
    """`max_workers` threads (default: one per env, since envs mostly wait on native code or on their worker);
    the rest as in the class docstring (a timeout needs `make_env`, and so does process isolation)."""
    envs = None if envs is None else list(envs)
    if isolation not in ISOLATIONS:
      raise ValueError(f"HostEnvPool: isolation must be one of {', '.join(ISOLATIONS)}, got {isolation!r}")
    if (envs is None) == (num_envs is None):
      raise ValueError("HostEnvPool: pass either envs or num_envs (with make_env)")
    if num_envs is not None and (make_env is None or not isinstance(num_envs, int) or num_envs < 1):
      raise ValueError(f"HostEnvPool: num_envs must be an int >= 1 with make_env, got {num_envs!r}")
    if isolation == "process" and envs is not None:
      raise ValueError("HostEnvPool: isolation='process' builds each env in its worker: pass num_envs and make_env, "
                       "not envs")
    if envs is not None and not envs:
      raise ValueError("HostEnvPool: envs must hold at least one environment")
    if max_workers is not None and max_workers < 1:
      raise ValueError(f"HostEnvPool: max_workers must be >= 1 or None, got {max_workers}")
    if timeout is not None and not timeout > 0:
      raise ValueError(f"HostEnvPool: timeout must be > 0 seconds or None, got {timeout}")
    if timeout is not None and make_env is None:
      raise ValueError("HostEnvPool: a timeout needs make_env, to replace an environment that hangs")
    self.isolation = isolation
    self.timeout = timeout
    self.timeouts = 0
    self.crashes = 0
    self._make_env = make_env
    self._count_lock = threading.Lock()
    if isolation == "process":
      try:
        pickle.dumps(make_env)
      except Exception as error:  # pylint: disable=broad-except  -- any pickling failure is the same setup error
        raise ValueError(f"HostEnvPool: isolation='process' needs a picklable make_env (a module-level function or "
                         f"class, or a functools.partial of one): {error}") from None
      context = _process_context(preload)
      self.envs: list = []
      try:
        for index in range(num_envs):
          self.envs.append(ProcessEnv(make_env, timeout=timeout, context=context, name=f"host-env-{index}"))
      except BaseException:
        for env in self.envs:
          env.close()
        raise
    else:
      self.envs = envs if envs is not None else [make_env() for _ in range(num_envs)]
    # Thread mode bounds calls by waiting at most `timeout` for them; process mode's envs bound their own calls.
    self._wait_timeout = timeout if isolation == "thread" else None
    self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=max_workers or len(self.envs),
                                                           thread_name_prefix="host-env")

  def _submit(self, fn: Callable, *args) -> concurrent.futures.Future:
    """`fn(*args)` on the pool, or, with a thread-mode timeout, on a daemon thread of its own (the executor's threads
    are joined at interpreter exit, so a call that never returns would keep the process alive)."""
    if self._wait_timeout is None:
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
    """Until every future is done, or the thread-mode timeout has passed since the calls started (they run
    concurrently)."""
    concurrent.futures.wait([f for f in futures if f is not None], timeout=self._wait_timeout)

  def _record(self, index: int, kind: str, message: str) -> None:
    with self._count_lock:
      if kind == "crash":
        self.crashes += 1
      else:
        self.timeouts += 1
    logger.warning("host env %d: %s", index, message)

  def _fault(self, index: int, future: concurrent.futures.Future, method: str, what: str) -> BaseException | None:
    """The error a faulted call ends with, or None when it did not fault. A fault is a thread-mode call still running
    after the timeout (its env is abandoned and replaced here) or a process-mode call that raised EnvFault (its worker
    already replaced); either is counted and logged."""
    if not future.done():
      self._record(index, "timeout", f"{what} did not return within {self.timeout} s; the env is abandoned and "
                                     f"replaced")
      self.envs[index] = self._make_env()
      return TimeoutError(f"host env {method} took more than {self.timeout} s")
    fault = future.exception()
    if isinstance(fault, EnvFault):
      self._record(index, fault.kind, f"{what}: {fault.error}; a fresh worker takes its place")
      return fault.error
    return None

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
      what = f"reset({int(seed)})"
      if self._fault(index, futures[index], "reset", what) is None:
        continue
      futures[index] = self._submit(self.envs[index].reset, int(seed))  # one retry, on the fresh env
      self._wait([futures[index]])
      fault = self._fault(index, futures[index], "reset", what)
      if isinstance(fault, TimeoutError):
        raise TimeoutError(f"HostEnvPool.reset: env {index} did not reset seed {int(seed)} within {self.timeout} s, "
                           f"twice (on a fresh env too)")
      if fault is not None:
        raise EnvCrash(f"HostEnvPool.reset: env {index} crashed resetting seed {int(seed)}, twice (on a fresh env "
                       f"too): {fault}")
    return [future.result() for future in futures]

  def _guarded_step(self, index: int, env: HostEnv, action_text: str, action_tokens: np.ndarray) -> HostStep:
    try:
      return env.step(action_text, action_tokens)
    except EnvFault:
      raise  # the pool counts and logs it (`_fault`)
    except Exception as error:  # pylint: disable=broad-except  -- one env's bug must not end the batch
      logger.warning("host env %d raised in step; its episode ends as truncated", index, exc_info=True)
      return error_step(error)

  def step(self, actions: Sequence[Action | None]) -> list[HostStep | None]:
    """One step of every non-idle env, concurrently; None in, None out."""
    self._check_batch("step", actions)
    futures = [None if action is None else self._submit(self._guarded_step, index, env, action[0], action[1])
               for index, (env, action) in enumerate(zip(self.envs, actions))]
    self._wait(futures)
    steps: list[HostStep | None] = []
    for index, future in enumerate(futures):
      fault = None if future is None else self._fault(index, future, "step", "step")
      if fault is not None:
        steps.append(error_step(fault))
      else:
        steps.append(None if future is None else future.result())
    return steps

  def close(self) -> None:
    """Stops the threads and closes every env that has a `close` method (process mode: closes the env in its worker
    and ends the worker; idempotent)."""
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


def make_chat_env(make_env: Callable[[], HostEnv], chat: Any, tokenizer: Any) -> ChatEnv:
  """`ChatEnv(make_env(), chat, tokenizer)`; `functools.partial(make_chat_env, make_env, chat, tokenizer)` is a
  picklable `make_env` of chat envs when `make_env`, `chat` and `tokenizer` pickle (process isolation)."""
  return ChatEnv(make_env(), chat, tokenizer)


def _reset_episode(env: Environment, key, params):
  return env.reset(key, params)


def _step_episode(env: Environment, reset_key, step_index, state, action, action_len, params):
  import jax  # pylint: disable=import-outside-toplevel  -- the module stays free of JAX (see its docstring)

  # A per-step key derived from the episode's own key, so that a host episode depends on its seed alone.
  return env.step(jax.random.fold_in(reset_key, step_index), state, action, action_len, params)


_JIT_LOCK = threading.Lock()


def _jitted() -> tuple[Callable, Callable]:
  """(jitted reset, jitted step), made on first use. The env object is a static argument (hashed by identity, like
  gymnax envs under jit): each env compiles once, and every adapter of that env shares the compiled functions through
  jit's own cache."""
  with _JIT_LOCK:
    if "_jitted_reset" not in globals():
      import jax  # pylint: disable=import-outside-toplevel

      globals()["_jitted_reset"] = jax.jit(_reset_episode, static_argnums=0)
      globals()["_jitted_step"] = jax.jit(_step_episode, static_argnums=0)
  return globals()["_jitted_reset"], globals()["_jitted_step"]


def __getattr__(name: str) -> Any:
  # `host._jitted_reset` / `host._jitted_step` without importing JAX with this module.
  if name in ("_jitted_reset", "_jitted_step"):
    return _jitted()[name == "_jitted_step"]
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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

  def __init__(self, env: Environment, params: Any, seed_to_key: Callable[[int], Any] | None = None,
               pad_id: int = 0):
    """`seed_to_key` None: `jax.random.key`."""
    import jax  # pylint: disable=import-outside-toplevel  -- the module stays free of JAX (see its docstring)

    self.env = env
    self.params = params
    self.seed_to_key = jax.random.key if seed_to_key is None else seed_to_key
    self.pad_id = pad_id
    self._key = None
    self._state = None
    self._num_steps = 0

  def reset(self, seed: int) -> np.ndarray:
    import jax  # pylint: disable=import-outside-toplevel

    self._key = self.seed_to_key(seed)
    self._state, obs, obs_len = _jitted()[0](self.env, self._key, self.params)
    self._num_steps = 0
    obs, obs_len = jax.device_get((obs, obs_len))
    return np.asarray(obs[:int(obs_len)], np.int32)

  def step(self, action_text: str, action_tokens: np.ndarray) -> HostStep:
    import jax  # pylint: disable=import-outside-toplevel

    del action_text  # a token environment parses ids, never text
    if self._state is None:
      raise RuntimeError("JaxEnvAsHost.step called before reset")
    action_tokens = np.asarray(action_tokens, np.int32).reshape(-1)
    width = self.env.max_action_len
    action = np.full((width,), self.pad_id, np.int32)
    action[:min(width, action_tokens.size)] = action_tokens[:width]
    self._state, obs, obs_len, reward, terminated, truncated, info = _jitted()[1](
        self.env, self._key, self._num_steps, self._state, action, np.int32(action_tokens.size), self.params)
    self._num_steps += 1
    # One transfer for everything the host needs; the state stays on the device.
    obs, obs_len, reward, terminated, truncated, parsed, success = jax.device_get(
        (obs, obs_len, reward, terminated, truncated, info.parsed, info.success))
    return HostStep(observation=np.asarray(obs[:int(obs_len)], np.int32), reward=float(reward),
                    terminated=bool(terminated), truncated=bool(truncated),
                    info={"success": bool(success), "parsed": bool(parsed)})
