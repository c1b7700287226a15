"""Host environments in the experiment runner: `runner.build` / `warm_start` / `run` hand over to this module when
`env.name` is a host environment (search_qa over the user's question file, textworld over compiled games: Python
objects behind `envs.host.HostEnv`, stepped by a `HostEnvPool` on threads or, with env.isolation="process", each in a
worker process of its own).

`run` does what `runner.run` does for the JAX environments, with the host loop:

  split   the questions (games) are split by `stepjax.data.held_out(id, env.held_out_fraction)` into training and
          held-out ones, never overlapping; every episode plays one of its split's items;
  chat    with chat.template (a Hugging Face model's format) every env is a `ChatEnv`: its observations are user
          turns plus the assistant header, as ids, the same for SFT, RL and evaluation;
  SFT     `sft.steps` AdamW steps (`train.make_sft_update`) on expert episodes (`rollout.make_host_rollout` with
          actor="expert": each env's `expert_command()` replayed as action tokens) of `sft.num_tasks` training
          questions each, in a Python loop;
  RL      the seeds one after another, each with its own pool of `rollout.num_tasks * episodes_per_task` envs;
          each iteration (`train.make_host_train_iteration`) draws num_tasks training questions from the state's key
          (the episodes of a group share a question and a group id);
  eval    `train.eval_episodes` held-out episodes (greedy and sampled, the rollout key from `train.eval_seed`) after
          the SFT start and every `train.eval_every` iterations; em / f1 / searches join the metrics when the env
          reports them;
  faults  an env's exception, a reset / step slower than env.step_timeout, or (env.isolation="process") a crash of the
          env's worker process (a segfault in an interpreter, os._exit) truncates that episode only (a hung or
          crashed env is replaced by a fresh one); env_error is the fraction of episodes that ended so, and
          env_crashes / env_timeouts count the iteration's faults;
  logs    as runner.run's, plus env_steps_per_s (agent steps over the seconds spent inside the envs) per iteration;
  ckpt    one orbax directory per seed (checkpoints/seed<k>); every seed's starting state is saved before the first
          iteration, so `resume=True` restores each seed where it stopped (finished seeds are skipped) and continues
          with the same results: the questions and the rollout keys come from the state's key.

On a device mesh (config.mesh sizes other than all 1): the envs are stepped by the host's threads (or workers), one
env per row, between jitted calls; what runs on the devices is laid out as for the JAX environments. Every TrainState
(RL: policy, critic, reference, Adam moments; SFT: policy, Adam moments) is made directly in its shardings by the
logical-axis rules (`_state_programs`: the same values as one device's init), the rollout's jitted act / observe
(policy forward, sampling, KV cache) run on those params under the rules with the host arrays of each step placed over
data x fsdp, the episode batch the loop assembles is placed over data x fsdp for the update (`make_update` /
`make_sft_update` on the mesh), and the evaluation runs the same way. Checkpoints hold the sharded state; a resume
restores into the shardings (`_state_programs`' abstract target). `runner.build` checks that every batch (rollout,
minibatch, evaluation, SFT) splits over data x fsdp, as for the JAX environments.

With several processes (`jax.distributed`, experiments/train.py) every process runs this same loop over the same
global arrays, and each steps only the envs of its share of every batch: the rows its devices hold
(`sharding.process_rows`), so its pools are that share's size and it draws the whole batch's questions (from the
state's key, the same in every process) and plays its rows' ones; its observations enter the programs through
`sharding.host_local_to_global` (`rollout.make_host_rollout`). Only process 0 writes logs and prints; every process
writes its shards of each checkpoint. The runs are the same as one process stepping every env (the drill in
tests/test_host_mesh.py: 2 processes x 4 devices against 1 x 8).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import glob
import os
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from experiments import runner
from stepjax import checks
from stepjax import rollout as rollout_lib
from stepjax import sharding as sharding_lib
from stepjax import train
from stepjax.envs.host import ISOLATIONS, HostEnvPool, make_chat_env
from stepjax.models.transformer import Transformer
from stepjax.train import checkpoint as checkpoint_lib
from stepjax.train import state as state_lib
from stepjax.train.state import default_sharding
from stepjax.train.loop import host_rollout_metrics


@dataclasses.dataclass(frozen=True)
class HostEnvs:
  """A host environment's two splits and how to make envs over one: `env_factory(items)` -> a picklable `make_env()`
  (a process-isolated pool builds its envs with it in the workers) whose envs' `reset(seed)` plays
  `items[seed % len(items)]` (items: question dicts for search_qa, game paths for textworld). chat: the config's chat
  format (`stepjax.chat.ChatFormat`), None for "none"; with one, every env is a `ChatEnv` whose observations are its
  turns. preload: the modules process-isolated workers need, imported once by the forkserver they are forked from
  (only fork-safe ones: nothing that starts threads at import)."""

  name: str
  train_items: tuple
  eval_items: tuple
  env_factory: Callable[[Sequence[Any]], Callable[[], Any]]
  chat: Any = None
  preload: tuple[str, ...] = ()

  def make_envs(self, items: Sequence[Any], count: int) -> list:
    """`count` envs over `items`, in this process."""
    make_env = self.env_factory(items)
    return [make_env() for _ in range(count)]


def host_envs(config, tokenizer) -> HostEnvs:
  """The host environment of a (resolved) config; a bad field is one ValueError line naming it."""
  timeout = config.env.step_timeout
  if timeout is not None:
    checks.check_number(timeout, "env.step_timeout", lambda v: v > 0, "> 0 seconds (or None: no limit)")
  checks.check_choice(config.env.isolation, "env.isolation", ISOLATIONS)
  host = _search_qa(config, tokenizer) if config.env.name == "search_qa" else _textworld(config)
  chat = runner.chat_format(config, tokenizer)
  if chat is None:
    return host
  max_obs_len = config.rollout.max_obs_len
  if max_obs_len <= chat.overhead:
    checks.fail("rollout.max_obs_len", f"{max_obs_len} cannot hold an observation with the chat template's "
                f"{chat.overhead} ids around it (turn headers and ends, the system turn); use more than "
                f"{chat.overhead} plus the longest observation")
  env_factory = host.env_factory

  def chat_env_factory(items):
    return functools.partial(make_chat_env, env_factory(items), chat, tokenizer)

  return dataclasses.replace(host, env_factory=chat_env_factory, chat=chat,
                             preload=host.preload + ("stepjax.chat", "stepjax.tokenizers"))


def split(items: list, ids: list[str], fraction: float, what: str) -> tuple[tuple, tuple]:
  """(training items, held-out items) by `stepjax.data.held_out(id, fraction)`; both must be non-empty."""
  from stepjax.data import held_out  # imports tensorflow_datasets (about a second): only for host environments

  held = [held_out(item_id, fraction) for item_id in ids]
  train_items = tuple(item for item, h in zip(items, held) if not h)
  eval_items = tuple(item for item, h in zip(items, held) if h)
  if not train_items or not eval_items:
    checks.fail("env.held_out_fraction", f"{fraction} leaves no {'held-out' if not eval_items else 'training'} "
                f"{what} of the {len(items)} (use a fraction that splits them)")
  return train_items, eval_items


def _search_qa(config, tokenizer) -> HostEnvs:
  """search_qa over env.data: questions parsed with `stepjax.data.load_records`, split by held_out, one BM25 index
  over every question's paragraphs (or env.corpus) shared by all envs, saved in env.index_dir (<data>.bm25)."""
  from stepjax.data import FORMATS, load_records
  from stepjax.envs import search_qa as sq

  e, r = config.env, config.rollout
  if e.data is None:
    checks.fail("env.data", "search_qa needs a question file (HotpotQA / 2WikiMultihopQA / MuSiQue layout)")
  if not isinstance(e.data, str) or not os.path.isfile(e.data):
    checks.fail("env.data", f"{e.data!r} is not a file")
  checks.check_choice(e.data_format, "env.data_format", FORMATS)
  fraction = checks.check_number(e.held_out_fraction, "env.held_out_fraction", lambda v: 0 < v < 1, "in (0, 1)")
  if e.corpus is not None and (not isinstance(e.corpus, str) or not os.path.isfile(e.corpus)):
    checks.fail("env.corpus", f"{e.corpus!r} is not a file (a JSONL of {{\"title\", \"text\"}} passages, or None)")
  if e.index_dir is not None and not isinstance(e.index_dir, str):
    checks.fail("env.index_dir", f"must be a directory path or None, got {e.index_dir!r}")
  with checks.section("env"):
    checks.check_choice(e.step_format, "step_format", sq.STEP_FORMATS)
    env_config = sq.SearchQAConfig(step_format=e.step_format, tool_format=e.tool_format, top_k=e.top_k,
                                   passage_budget=e.passage_budget, max_steps=r.max_steps,
                                   invalid_penalty=e.invalid_penalty)
  try:
    records = load_records(e.data, e.data_format).records
  except ValueError as error:
    raise ValueError(f"env.data: {error}") from None
  train_items, eval_items = split(records, [record["id"] for record in records], fraction, "questions")
  with checks.section("env.corpus", strip="corpus_file"):
    passages = sq.load_corpus_jsonl(e.corpus) if e.corpus is not None else sq.passages_from_questions(records)
  index = sq.BM25Index(passages, e.index_dir if e.index_dir is not None else e.data + ".bm25")
  decode = None
  if e.step_format == "think":
    # <think> / </think> are special tokens the loop's skip_special decoding drops: the env reads the ids instead.
    decode = functools.partial(_decode_without, tokenizer, (tokenizer.end_of_step_id, tokenizer.eos_id,
                                                            tokenizer.pad_id))

  def env_factory(items):
    # One env checks every question; its copies share the questions and the index (an episode lives in the copy). A
    # process-isolated worker gets the prototype pickled, index included. bm25s imports JAX and starts its backend's
    # threads at import, so search_qa is not preloaded (forking from a process with threads is unsafe).
    return functools.partial(copy.copy, sq.SearchQAEnv(items, env_config, index=index, decode=decode))

  return HostEnvs("search_qa", train_items, eval_items, env_factory)


def _decode_without(tokenizer, drop: Sequence[int], ids) -> str:
  """The text of `ids` without the tokens in `drop` (a picklable decode for search_qa's think format)."""
  return tokenizer.decode([int(i) for i in ids if int(i) not in drop])


def _textworld(config) -> HostEnvs:
  """textworld over the compiled games in env.games (file names split by held_out); one interpreter per env."""
  from stepjax.envs import textworld_env

  e, r = config.env, config.rollout
  if e.step_format != "plain":
    checks.fail("env.step_format", f"textworld reads one command line per step; use 'plain', not {e.step_format!r}")
  if not isinstance(e.games, str) or not os.path.isdir(e.games):
    checks.fail("env.games", f"{e.games!r} is not a directory of TextWorld games (textworld_env.make_games)")
  games = [path for path in sorted(glob.glob(os.path.join(e.games, "*.z8"))) if os.path.isfile(path[:-3] + ".json")]
  if not games:
    checks.fail("env.games", f"{e.games} holds no compiled game (.z8 with its .json; textworld_env.make_games)")
  fraction = checks.check_number(e.held_out_fraction, "env.held_out_fraction", lambda v: 0 < v < 1, "in (0, 1)")
  train_items, eval_items = split(games, [os.path.basename(path) for path in games], fraction, "games")

  def env_factory(items):
    return functools.partial(textworld_env.TextWorldEnv, list(items), max_steps=r.max_steps)

  return HostEnvs("textworld", train_items, eval_items, env_factory, preload=textworld_env.PRELOAD)


def env_pool(setup: runner.Setup, items, count: int) -> HostEnvPool:
  """`count` envs over `items`, on threads or each in a worker process of its own (env.isolation); a reset or step
  that takes longer than env.step_timeout seconds (None: no limit), or whose worker dies, truncates its episode and a
  fresh env takes the faulty one's place (`HostEnvPool`)."""
  host, e = setup.host, setup.config.env
  return HostEnvPool(num_envs=count, make_env=host.env_factory(items), timeout=e.step_timeout, isolation=e.isolation,
                     preload=host.preload)


TASK_DRAW = 0x7A5C  # folded into a state's key to draw an iteration's questions (the rollout key is its split)


def process_share(setup: runner.Setup, batch_size: int) -> slice:
  """The rows of a batch of `batch_size` whose envs this process steps (all of them without several processes)."""
  if setup.mesh is None or jax.process_count() == 1:
    return slice(0, batch_size)
  return slice(*sharding_lib.process_rows(batch_size, setup.mesh))


def draw_tasks(key, num_items: int, num_tasks: int) -> np.ndarray:
  """[num_tasks] item indices drawn with `key` (without replacement when there are enough items)."""
  return np.asarray(jax.random.choice(key, num_items, (num_tasks,), replace=num_items < num_tasks))


def host_rows(state, setup: runner.Setup) -> tuple[list[int], np.ndarray]:
  """The training rows of an iteration: (reset seed per row, group id per row). The num_tasks questions come from the
  state's key, so they are a function of the state (a restored state draws the same ones); the episodes_per_task
  rows of a task share its question and its group id."""
  rc = setup.rollout_config
  tasks = draw_tasks(jax.random.fold_in(state.key, TASK_DRAW), len(setup.host.train_items), rc.num_tasks)
  groups = np.repeat(np.arange(rc.num_tasks, dtype=np.int32), rc.episodes_per_task)
  return np.repeat(tasks, rc.episodes_per_task).tolist(), groups


def _state_programs(spec: state_lib.StateSpec, setup: runner.Setup) -> tuple[Callable, Callable]:
  """(init(key, policy_params or None) -> the TrainState `train.init_state(spec, key, policy_params)` makes,
  abstract(key) -> its ShapeDtypeStructs: a restore target). spec: without a mesh (the traced arithmetic).

  On setup.mesh the state is made directly in its shardings (`state_shardings` of spec on the mesh, under the rules)
  by one jitted `runner._fresh_state`, the same values as init_state's (whose own jits pin the state to the first
  device); policy_params are first placed in the trunk's shardings and the key replicated (`sharding.put_global`),
  and the abstract state carries the shardings, so a checkpoint restores into them."""
  mesh, rules = setup.mesh, setup.rules
  if mesh is None:
    def init(key, policy_params):
      return train.init_state(spec, key, policy_params)

    return init, lambda key: jax.eval_shape(init, key, None)
  shardings = state_lib.state_shardings(dataclasses.replace(spec, mesh=mesh, rules=rules))
  trunk = runner._trunk_shardings(spec.model, mesh, rules)
  replicated = sharding_lib.replicated(mesh)
  program = sharding_lib.jit_with_rules(
      lambda key_data, params: runner._fresh_state(spec, jax.random.wrap_key_data(key_data), params), mesh, rules,
      out_shardings=shardings)

  def init_on_mesh(key, policy_params):
    if policy_params is not None:
      policy_params = sharding_lib.put_global(policy_params, trunk)
    return program(sharding_lib.put_global(np.asarray(jax.random.key_data(key)), replicated), policy_params)

  def abstract(key):
    return runner._abstract(jax.eval_shape(lambda k: runner._fresh_state(spec, k, None), key), shardings)

  return init_on_mesh, abstract


def _programs(setup: runner.Setup) -> dict[str, Callable]:
  key = runner._setup_key(setup, "host")
  if key not in runner._PROGRAMS:
    mc, rc, tokenizer = setup.model_config, setup.rollout_config, setup.tokenizer
    uc, oc = setup.update_config, setup.optim_config
    mesh = {"mesh": setup.mesh, "rules": setup.rules}
    eval_config = dataclasses.replace(rc, num_tasks=setup.config.train.eval_episodes, episodes_per_task=1)
    model = Transformer(mc)
    init, abstract = _state_programs(state_lib.StateSpec.for_update(mc, uc, oc), setup)
    runner._PROGRAMS[key] = {
        "init": init,
        "abstract": abstract,
        "iteration": train.make_host_train_iteration(mc, rc, tokenizer, uc, oc, **mesh),
        "greedy": rollout_lib.make_host_rollout(model, dataclasses.replace(eval_config, greedy=True), tokenizer,
                                                **mesh),
        "sampled": rollout_lib.make_host_rollout(model, dataclasses.replace(eval_config, greedy=False), tokenizer,
                                                 **mesh),
    }
  return runner._PROGRAMS[key]


def warm_start(setup: runner.Setup, seed: int, *, progress: bool = True, log: Callable[[dict], None] | None = None):
  """The SFT start of a host environment for one seed: `sft.steps` AdamW steps (`train.make_sft_update`, lr sft.lr)
  from `model.checkpoint`'s params (or a random init), each on a fresh batch of expert episodes
  (`make_host_rollout(actor="expert")`) of `sft.num_tasks` training questions drawn from the seed. -> Transformer
  params. log(line) gets one line per step: the update's metrics and the expert's success rate. On a mesh the SFT
  state, the expert rollout and the update are sharded like the RL ones (module docstring)."""
  config, mc = setup.config, setup.model_config
  programs = runner._PROGRAMS.setdefault(runner._setup_key(setup, "host_sft"), {})
  if not programs:
    mesh = {"mesh": setup.mesh, "rules": setup.rules}
    programs["expert"] = rollout_lib.make_host_rollout(Transformer(mc), setup.sft_rollout_config, setup.tokenizer,
                                                       actor="expert", **mesh)
    programs["update"] = train.make_sft_update(mc, setup.sft_optim_config, **mesh)
    programs["init"], _ = _state_programs(state_lib.StateSpec.for_sft(mc, setup.sft_optim_config), setup)
  init_key, key = jax.random.split(jax.random.fold_in(jax.random.key(seed), 0))
  state = programs["init"](init_key, setup.checkpoint_params)
  host, num_tasks = setup.host, config.sft.num_tasks
  share = process_share(setup, num_tasks)
  if not sharding_lib.is_primary():
    progress, log = False, None
  if setup.mesh is not None:  # the rollout keys split off it: replicated, like the state's
    key = jax.random.wrap_key_data(sharding_lib.put_global(np.asarray(jax.random.key_data(key)),
                                                           sharding_lib.replicated(setup.mesh)))
  from tqdm import tqdm

  bar = tqdm(total=config.sft.steps, desc="sft", disable=not progress, dynamic_ncols=True, unit="step")
  with env_pool(setup, host.train_items, share.stop - share.start) as pool:
    for step in range(config.sft.steps):
      key, draw_key, rollout_key = jax.random.split(key, 3)
      rows = draw_tasks(draw_key, len(host.train_items), num_tasks)[share].tolist()
      batch, info = programs["expert"](state.params["policy"], pool, rows, rollout_key)
      state, metrics = programs["update"](state, batch)
      line = {"step": step + 1, **{name: float(value) for name, value in jax.device_get(metrics).items()},
              "expert_success": float(np.mean(info.success))}
      if config.sft.per_seed:
        line["seed"] = seed
      if log is not None:
        log(line)
      bar.update(1)
      bar.set_postfix(nll=f"{line['nll']:.3f}", acc=f"{line['token_accuracy']:.3f}")
  bar.close()
  return state.params["policy"]


def evaluate(programs: dict, state, setup: runner.Setup, pool: HostEnvPool, eval_key) -> dict:
  """Held-out episodes of a host env (`pool` over the held-out items, row i playing the eval_seed permutation's
  item i), greedy and sampled with the same rollout key: the metric names of `train.make_evaluate`, plus em / f1 /
  searches (greedy) and their `_sampled` values when the env reports them."""
  n = len(setup.host.eval_items)
  order = np.random.default_rng(setup.config.train.eval_seed).permutation(n)
  share = process_share(setup, setup.config.train.eval_episodes)
  rows = [int(order[i % n]) for i in range(share.start, share.stop)]
  params = train.policy_trunk(state.params["policy"])
  greedy = jax.device_get(host_rollout_metrics(*programs["greedy"](params, pool, rows, eval_key)))
  sampled = jax.device_get(host_rollout_metrics(*programs["sampled"](params, pool, rows, eval_key)))
  metrics = {"success": greedy["success_rate"], "success_sampled": sampled["success_rate"],
             "return": greedy["return_mean"], "return_sampled": sampled["return_mean"],
             "episode_steps": greedy["episode_steps"], "invalid_rate": greedy["invalid_rate"]}
  for name in rollout_lib.HOST_INFO_METRICS:
    if name in greedy:
      metrics[name], metrics[name + "_sampled"] = greedy[name], sampled[name]
  return {name: float(value) for name, value in metrics.items()}


def run(setup: runner.Setup, workdir: str, *, resume: bool, sft_params: Any, print_fn: Callable[[str], None]) -> dict:
  """`run` for a host environment (module docstring): seeds in turn, checkpoints per seed. Returns run's dict with
  "state": the final TrainState of each seed (a tuple, in seed order)."""
  config = setup.config
  t, name, seeds = config.train, config.name, setup.seeds
  # With several processes every process runs this function (each stepping its share of the envs); only process 0
  # writes logs and prints, and every process takes part in each checkpoint save and restore.
  primary = sharding_lib.is_primary()
  if not primary:
    print_fn = lambda _: None  # noqa: E731
  os.makedirs(workdir, exist_ok=True)
  checkpoint_dir = os.path.join(workdir, "checkpoints")
  seed_dirs = {seed: os.path.join(checkpoint_dir, f"seed{seed}") for seed in seeds}
  if resume:
    if not os.path.isdir(checkpoint_dir):
      raise FileNotFoundError(f"checkpoint.directory: {checkpoint_dir} does not exist (nothing to resume)")
    for seed in seeds:
      checkpoint_lib.checkpoint_steps(seed_dirs[seed])  # raises when a seed has no complete checkpoint
  elif primary:
    runner._start_over(workdir, checkpoint_dir)
  if primary:
    runner._write_text(os.path.join(workdir, "config.json"), config.to_json(indent=1))
  sharding_lib.sync_processes("stepjax.host_runner.start")  # the others open the checkpoints once they are started over
  programs = _programs(setup)
  keys = {seed: jax.random.fold_in(jax.random.key(seed), 1) for seed in seeds}
  # On the state's device (on a mesh: replicated over it), like the training rollout's key (split off the state's):
  # the sampled evaluation then reuses the training rollout's compiled sampler instead of compiling its own for an
  # uncommitted key.
  if setup.mesh is None:
    eval_key = jax.device_put(jax.random.key(t.eval_seed), default_sharding())
  else:
    eval_key = jax.random.wrap_key_data(sharding_lib.put_global(np.asarray(jax.random.key_data(
        jax.random.key(t.eval_seed))), sharding_lib.replicated(setup.mesh)))

  earlier_evals = []  # a resumed run's evaluations before it (the records of a process that writes no logs)
  if resume:
    # Each seed's newest usable checkpoint (a damaged newer one is named and set aside, so `_seed` restores this one).
    done = {seed: checkpoint_lib.restore_usable_checkpoint(
                      seed_dirs[seed], programs["abstract"](keys[seed]), print_fn=print_fn)[1]
            for seed in seeds}
    kept = lambda line: line["iteration"] <= done[line["seed"]]  # noqa: E731
    if primary:
      for log_name in ("metrics.jsonl", "eval.jsonl"):
        runner._cut_jsonl(os.path.join(workdir, log_name), kept)
    else:  # process 0 cuts the file (atomically); what lies beyond the checkpoints is left out either way
      earlier_evals = [line for line in runner._read_jsonl(os.path.join(workdir, "eval.jsonl"), torn_tail=True)
                       if kept(line)]
  else:
    if sft_params is None:
      sft_params = runner.warm_start(setup, progress=config.log.progress,
                                     log=lambda line: runner._append_jsonl(os.path.join(workdir, "sft.jsonl"), line))
    stacked = sft_params is not None and runner._is_stacked(sft_params, setup)
    # Every seed's starting state is checkpointed first: a resume can then start any seed without the warm start.
    for i, seed in enumerate(seeds):
      start = jax.tree.map(lambda x: x[i], sft_params) if stacked else sft_params
      manager = train.make_checkpoint_manager(seed_dirs[seed], max_to_keep=t.keep_checkpoints)
      train.save_checkpoint(manager, programs["init"](keys[seed], start), 0,
                            {"iteration": 0, "env_steps": 0, "name": name, "seed": seed})
      checkpoint_lib.finish_saves(manager)
    done = {seed: 0 for seed in seeds}

  logger = runner.Logger(workdir, seeds, t.iterations * len(seeds), sum(done.values()),
                         tensorboard=config.log.tensorboard, progress=config.log.progress, description=name,
                         write=primary)
  evaluated = {(line["seed"], line["iteration"]) for line in
               (runner._read_jsonl(os.path.join(workdir, "eval.jsonl")) if primary else earlier_evals)}
  states = []
  try:
    for seed in seeds:
      manager = train.make_checkpoint_manager(seed_dirs[seed], max_to_keep=t.keep_checkpoints)
      try:
        state = _seed(programs, setup, seed, keys[seed], eval_key, manager, logger, evaluated)
      finally:
        checkpoint_lib.finish_saves(manager)
      states.append(state)
  finally:
    logger.close()

  if primary:
    eval_lines = runner._read_jsonl(os.path.join(workdir, "eval.jsonl"))
  else:
    eval_lines = earlier_evals + logger.kept.get("eval.jsonl", [])
  records = runner.records_from_eval(name, eval_lines)
  table = runner._summary(name, records, eval_lines, print_fn)
  return {"records": records, "final": [line for line in eval_lines if line["iteration"] == t.iterations],
          "table": table, "state": tuple(states)}


def _fault_counts(pool: HostEnvPool) -> np.ndarray:
  """[crashes, timeouts] of `pool` so far, summed over the processes of a multi-process run (each has its own pool)."""
  counts = np.asarray([pool.crashes, pool.timeouts], np.int64)
  if jax.process_count() == 1:
    return counts
  from jax.experimental import multihost_utils  # noqa: PLC0415

  return np.asarray(multihost_utils.process_allgather(counts)).reshape(-1, 2).sum(axis=0)


def _seed(programs: dict, setup: runner.Setup, seed: int, key, eval_key, manager, logger: runner.Logger,
               evaluated: set) -> Any:
  """One seed of a host run, from its latest checkpoint to train.iterations. -> its final TrainState."""
  config, host, rc = setup.config, setup.host, setup.rollout_config
  t = config.train
  state, iteration = train.restore_checkpoint(manager, programs["abstract"](key))
  env_steps = int(train.checkpoint_metadata(manager)["env_steps"])
  share, eval_share = process_share(setup, rc.batch_size), process_share(setup, t.eval_episodes)
  with env_pool(setup, host.train_items, share.stop - share.start) as pool, \
       env_pool(setup, host.eval_items, eval_share.stop - eval_share.start) as eval_pool:

    def evaluate_and_log() -> dict:
      metrics = evaluate(programs, state, setup, eval_pool, eval_key)
      line = {"iteration": iteration, "seed": seed, "env_steps": env_steps, **metrics}
      logger.jsonl("eval.jsonl", [line])
      logger.scalars("eval", seed, iteration, {k: v for k, v in line.items() if k not in ("iteration", "seed")})
      return metrics

    evaluation = None
    if (seed, iteration) not in evaluated:  # the start's evaluation (a resumed seed has it already)
      evaluation = evaluate_and_log()
    evaluations = iteration // t.eval_every
    while iteration < t.iterations:
      rows, groups = host_rows(state, setup)
      rows, groups = rows[share], groups[share]
      faults = _fault_counts(pool)
      timings: dict[str, float] = {}
      start = time.perf_counter()
      state, metrics = programs["iteration"](state, pool, rows, groups, timings)
      elapsed = time.perf_counter() - start
      iteration += 1
      env_steps += int(metrics["agent_steps"])
      logger.jsonl("metrics.jsonl", [{
          "iteration": iteration, "seed": seed, "env_steps": env_steps, **metrics, "time_s": elapsed,
          "agent_steps_per_s": metrics["agent_steps"] / elapsed,
          "env_steps_per_s": metrics["agent_steps"] / max(timings.get("env", 0.0), 1e-9),
          "tokens_per_s": metrics["action_tokens"] / elapsed,
          **{name: int(now - before) for name, now, before in zip(("env_crashes", "env_timeouts"),
                                                                 _fault_counts(pool), faults)}}])
      logger.scalars("train", seed, iteration, metrics)
      if iteration % t.eval_every == 0:
        evaluation = evaluate_and_log()
        evaluations += 1
        if evaluations % t.checkpoint_every == 0 or iteration == t.iterations:
          train.save_checkpoint(manager, state, iteration, {"iteration": iteration, "env_steps": env_steps,
                                                            "name": config.name, "seed": seed})
      logger.bar.update(1)
      logger.bar.set_postfix(seed=seed, success=f"{metrics['success_rate']:.3f}", ret=f"{metrics['return_mean']:.3f}",
                             kl=f"{metrics['approx_kl']:.2e}", clip=f"{metrics['clip_frac']:.3f}",
                             eval=f"{evaluation['success']:.3f}" if evaluation else "-",
                             steps_s=f"{metrics['agent_steps'] / elapsed:.1f}")
  return state
