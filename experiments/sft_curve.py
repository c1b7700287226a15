"""How good is the SFT start after N steps? Held-out success of the warm start at several SFT lengths, one run.

  python experiments/sft_curve.py --name=sft_curve --steps=100,200,400 --seeds=3

Runs `train.make_sft_run` once per seed (vmapped, as `sft.per_seed` does in the runner) for the largest length and
evaluates the policy held out (greedy and sampled, `train.eval_episodes` episodes on the tasks of `train.eval_seed`,
the tasks every study scores on) after each length in --steps. An RL study needs a start with room on both sides;
this is how to choose `sft.steps` (and `sft.lr`, the model size, ...) for it. Prints and writes
runs/<name>/sft_curve.md and sft_curve.json: per length, SFT nll and token accuracy (mean over the last chunk of
steps and seeds) and held-out success as mean ± 95% CI over seeds, with the per-seed values.

--set=field=value and --regime work as in experiments/ablation.py (the base config, experiments/configs/base.py).

--plain_steps=N (lookup_qa in the think format): a curriculum. Each seed first takes N SFT steps on the same
environment's plain-format expert episodes (bare commands, the same tokenizer with its think tokens), then the
--steps of the think format start from there; the lengths in --steps count the think-format steps only.
"""

import dataclasses
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: `experiments.*`

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments import configs, report, runner  # noqa: E402
from stepjax import rollout as rollout_lib  # noqa: E402
from stepjax import train  # noqa: E402
from stepjax.models import Transformer  # noqa: E402


FLAGS = flags.FLAGS
COLUMNS = ("steps", "nll", "token_accuracy", "success", "success_sampled", "invalid_rate", "episode_steps")


def parse_steps(values) -> list[int]:
  """--steps as increasing positive ints; one ValueError line naming the flag otherwise."""
  try:
    steps = [int(v) for v in values]
  except ValueError:
    raise ValueError(f"steps: expected comma-separated integers, got {','.join(values)!r}") from None
  if not steps or steps[0] < 1 or any(b <= a for a, b in zip(steps, steps[1:])):
    raise ValueError(f"steps: expected increasing positive integers, got {steps}")
  return steps


def check_plain_start(c) -> None:
  if c.env.name != "lookup_qa" or c.env.step_format != "think":
    raise ValueError(f"plain_steps: a plain-format start is for lookup_qa in the think format, not {c.env.name} in "
                     f"the {c.env.step_format} format")


def plain_start(setup: runner.Setup, num_steps: int) -> tuple[dict, dict]:
  """`num_steps` SFT steps per seed (vmapped) on the plain-format expert episodes of the setup's lookup_qa task, with
  its tokenizer. -> (policy params [seeds, ...], metrics {name: [seeds, num_steps]}). One ValueError line naming
  plain_steps where the setup is not lookup_qa in the think format."""
  check_plain_start(setup.config)
  plain = setup.config.copy_and_resolve_references()
  plain.env.step_format = "plain"
  env, env_params = runner._jax_env(plain, setup.tokenizer)
  run = train.make_sft_run(setup.model_config, setup.sft_optim_config, env, setup.sft_rollout_config,
                           chunk_size=min(num_steps, runner.SFT_CHUNK), token_weights=setup.sft_token_weights)
  return run(runner.sft_keys(setup), env_params, num_steps, setup.checkpoint_params)


def sft_curve(setup: runner.Setup, steps: list[int], show: int = 0, start: dict | None = None) -> list[dict]:
  """Held-out success of each seed's warm start after each length in `steps` (one SFT run per seed, vmapped), from
  `start` (policy params [seeds, ...], one per seed, e.g. `plain_start`'s) or else from model.checkpoint / random.

  Returns one row per length: {"steps", "nll", "token_accuracy" (means over the steps since the previous length and
  the seeds), per-seed lists "success", "success_sampled", "invalid_rate", "episode_steps", and with show > 0
  "episodes": the first seed's greedy episodes on `show` held-out tasks (from train.eval_seed) as text
  (`decode_episode`)}.
  """
  c = setup.config
  every = math.gcd(*steps)  # chunks end at every length: the largest divisor of the gcd up to the runner's chunk
  chunk = max(d for d in range(1, min(every, runner.SFT_CHUNK) + 1) if every % d == 0)
  run = train.make_sft_run(setup.model_config, setup.sft_optim_config, setup.env, setup.sft_rollout_config,
                           chunk_size=chunk, token_weights=setup.sft_token_weights)
  evaluate = runner._evaluate_program(setup)  # the studies' held-out evaluation, vmapped over seeds
  eval_key = jax.random.key(c.train.eval_seed)
  greedy = jax.jit(rollout_lib.make_rollout(
      Transformer(setup.model_config), setup.env,
      dataclasses.replace(setup.rollout_config, num_tasks=max(show, 1), episodes_per_task=1, greedy=True)))
  rows, previous = [], 0

  def on_chunk(done: int, metrics: dict, params: dict) -> None:
    nonlocal previous
    history.append(metrics)
    if done not in steps:
      return
    since = {k: np.concatenate([m[k] for m in history], axis=1)[:, previous - done:] for k in ("nll", "token_accuracy")}
    scores = jax.device_get(evaluate(params, setup.env_params, eval_key))
    rows.append({"steps": done, "nll": float(since["nll"].mean()),
                 "token_accuracy": float(since["token_accuracy"].mean()),
                 **{k: [float(v) for v in scores[k]] for k in COLUMNS[3:]}})
    if show:
      first = jax.tree.map(lambda x: x[0], params)
      batch, _ = greedy(first, setup.env_params, eval_key)  # held-out tasks: the eval key
      rows[-1]["episodes"] = [decode_episode(setup.tokenizer, batch, row) for row in range(show)]
    print(format_row(rows[-1]), flush=True)
    previous = done

  history: list[dict] = []
  if start is None:
    run(runner.sft_keys(setup), setup.env_params, steps[-1], setup.checkpoint_params, on_chunk)
  else:
    run(runner.sft_keys(setup), setup.env_params, steps[-1], start, on_chunk, stacked=True)
  return rows


def decode_episode(tokenizer, batch, row: int) -> str:
  """One episode of an EpisodeBatch as text, each action (the model's tokens) between [[ and ]]."""
  length = int(batch.seq_len[row])
  tokens, actions = np.asarray(batch.tokens[row, :length]), np.asarray(batch.action_mask[row, :length], bool)
  pieces, start = [], 0
  for end in range(1, length + 1):
    if end == length or actions[end] != actions[start]:
      text = tokenizer.decode(tokens[start:end])
      pieces.append(f"[[{text}]]" if actions[start] else text)
      start = end
  return "".join(pieces)


def format_row(row: dict) -> str:
  cells = [str(row["steps"]), f"{row['nll']:.3f}", f"{row['token_accuracy']:.3f}"]
  for key in COLUMNS[3:]:
    mean, ci = report.mean_ci(row[key])
    cells.append(f"{mean:.3f}" + ("" if math.isnan(ci) else f" ± {ci:.3f}"))
  cells.append(" ".join(f"{v:.3f}" for v in row["success"]))
  return "| " + " | ".join(cells) + " |"


def format_table(rows: list[dict]) -> str:
  header = ("| SFT steps | nll | token acc | held-out success (greedy) | (sampled) | invalid rate | steps / episode "
            "| greedy success per seed |")
  return "\n".join([header, "|" + " ---: |" * 8, *(format_row(row) for row in rows)])


def _define_flags() -> None:
  """Flags are defined when run as a script only (experiments.ablation, importable next to this, has the same)."""
  flags.DEFINE_string("name", "sft_curve", "Results go to <runs_dir>/<name>/.")
  flags.DEFINE_list("steps", ["100", "200", "400"], "SFT lengths to evaluate at (increasing).")
  flags.DEFINE_integer("seeds", 3, "Warm starts (seeds 0 ... seeds-1, as train.seeds in a study).")
  flags.DEFINE_multi_string("set", [], "field=value overrides of the base config.")
  flags.DEFINE_string("regime", None, "A named set of overrides (experiments/configs/presets.py REGIMES).")
  flags.DEFINE_string("runs_dir", "runs", "Root folder of all studies.")
  flags.DEFINE_integer("show", 0, "Decode the first seed's greedy episodes on this many held-out tasks at each length.")
  flags.DEFINE_integer("plain_steps", 0, "lookup_qa think format: SFT steps on plain-format episodes first (a "
                       "curriculum); --steps then count the think-format steps.")


def main(argv):
  del argv
  try:
    steps = parse_steps(FLAGS.steps)
    overrides = configs.study_overrides(FLAGS.regime, FLAGS.set)
    config = configs.method_config("steppo", overrides)  # the policy-side fields of every method's config
    config.train.seeds = FLAGS.seeds
    config.sft.steps = steps[-1]
    setup = runner.build(config)
    if FLAGS.plain_steps < 0:
      raise ValueError(f"plain_steps: expected an integer >= 0, got {FLAGS.plain_steps}")
    if FLAGS.plain_steps:
      check_plain_start(setup.config)
  except ValueError as error:
    sys.exit(str(error) if str(error).startswith(("steps", "set", "regime", "plain_steps")) else f"config.{error}")
  out_dir = os.path.join(FLAGS.runs_dir, FLAGS.name)
  os.makedirs(out_dir, exist_ok=True)
  start = time.perf_counter()
  start_params, plain_note = None, ""
  if FLAGS.plain_steps:
    start_params, metrics = plain_start(setup, FLAGS.plain_steps)
    accuracy = np.asarray(metrics["token_accuracy"])[:, -min(50, FLAGS.plain_steps):].mean(axis=1)
    plain_note = (f" Each seed first took {FLAGS.plain_steps} SFT steps on plain-format episodes (token accuracy over "
                  f"the last 50: {', '.join(f'{a:.3f}' for a in accuracy)}); the steps below are think-format steps.")
    print(plain_note.strip(), flush=True)
  print(format_table([]))
  rows = sft_curve(setup, steps, FLAGS.show, start_params)
  wall = time.perf_counter() - start
  c = setup.config
  command = "python experiments/sft_curve.py " + " ".join(sys.argv[1:])
  text = (f"# {FLAGS.name}: the SFT start's held-out success vs SFT steps\n\n`{command}`\n\n"
          f"{c.env.name} ({c.env.step_format} format), tokenizer {c.tokenizer!r}, model {c.model.num_layers} x "
          f"{c.model.hidden_size}, SFT lr {c.sft.lr}, {c.sft.num_tasks} expert episodes per step, seeds "
          f"{list(setup.seeds)}, {c.train.eval_episodes} held-out episodes per evaluation; wall time {wall:.0f} s "
          f"(compilation included).{plain_note}\n\n{format_table(rows)}\n")
  for row in rows:
    if row.get("episodes"):
      text += (f"\nGreedy held-out episodes of seed {setup.seeds[0]} after {row['steps']} SFT steps "
               "(actions in [[ ]]):\n")
      text += "".join(f"\n```\n{episode}\n```\n" for episode in row["episodes"])
  with open(os.path.join(out_dir, "sft_curve.md"), "w") as f:
    f.write(text)
  with open(os.path.join(out_dir, "sft_curve.json"), "w") as f:
    json.dump({"command": command, "wall_s": wall, "rows": rows}, f, indent=1)
  print(f"\nwall {wall:.0f} s; written: {out_dir}/sft_curve.md")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
