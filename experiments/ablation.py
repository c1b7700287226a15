"""A grid of methods x seeds on one environment, reported with 95% CIs over seeds.

  python experiments/ablation.py --name=demo --methods=steppo,token_ppo,grpo --seeds=3 --regime=one_hop
  python experiments/ablation.py --name=steps --methods=steppo,steppo_exact,token_ppo,token_ppo_lam95,grpo \
      --seeds=5 --set=sft.per_seed=true
  python experiments/ablation.py --name=paper --preset=paper

Each method is a config file in experiments/configs/ (`--set=algo.gamma=0.99` overrides a field of every method's
config; repeatable). The SFT warm start (one for all seeds, or one per seed with sft.per_seed) is computed once and
shared by every method: same start, same held-out tasks, a paired comparison. Seeds are vmapped in one program per
method. Writes runs/<name>/<method>/ (logs, checkpoints) and runs/<name>/results.md, results.csv, curves.png and
records.json; with --baseline (default steppo, when it runs) also paired.csv and the paired table, and results.md
ends with the training diagnostics (critic explained variance at steps vs tokens, advantages per step index, clip
fraction, KL, entropy, tokens per step). --regime applies a named set of overrides (configs/presets.py REGIMES).
A method is a config file or a variant of presets.VARIANTS (e.g. steppo_head). --preset runs a grid of such studies
(presets.GRIDS) and writes runs/<name>/results.md over all of them.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: `experiments.*`

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from experiments import configs, report, runner  # noqa: E402
from experiments.configs import presets  # noqa: E402

_NAME = flags.DEFINE_string("name", "demo", "Study name: results go to <runs_dir>/<name>/.")
_METHODS = flags.DEFINE_list("methods", ["steppo", "token_ppo", "grpo"], "Config names in experiments/configs/.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds per method (>= 3 for a confidence interval worth reading).")
_ITERATIONS = flags.DEFINE_integer("iterations", None, "Override train.iterations.")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", None, "Override train.eval_every.")
_SFT_STEPS = flags.DEFINE_integer("sft_steps", None, "Override sft.steps.")
_SET = flags.DEFINE_multi_string("set", [], "field=value overrides applied to every method's config.")
_RUNS_DIR = flags.DEFINE_string("runs_dir", "runs", "Root folder of all studies.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars.")
_REGIME = flags.DEFINE_string("regime", None, "A named set of overrides from experiments/configs/presets.py REGIMES "
                              "(e.g. one_hop); --set wins over it.")
_PRESET = flags.DEFINE_string("preset", None, "A grid of studies from experiments/configs/presets.py GRIDS (e.g. "
                              "paper): every study in turn, then <runs_dir>/<name>/results.md over all of them; "
                              "--methods, --seeds, --iterations, --eval_every, --sft_steps and --regime come from "
                              "the grid, --set applies to every study.")
_KEEP_DONE = flags.DEFINE_bool("keep_done", False, "With --preset: keep the studies a stopped run of the grid finished "
                                "(their results.md exists) and run the rest.")
_BASELINE = flags.DEFINE_string("baseline", "steppo", "Method the others are compared with, paired over seeds (none: "
                                "no paired table; skipped when it is not among --methods).")

# Fields every method of a study must share: the SFT start is computed once from them.
SHARED_SECTIONS = ("env", "tokenizer", "model", "rollout", "sft", "train")


def study_configs(methods, seeds: int, overrides: dict) -> list:
  """Every method's `runner.Setup`, built (every field checked) before anything compiles."""
  setups = []
  for method in methods:
    config = configs.method_config(method, overrides)
    config.train.seeds = seeds
    setups.append(runner.build(config))
  first = setups[0].config
  for config in (setup.config for setup in setups[1:]):
    for section in SHARED_SECTIONS:
      if str(config[section]) != str(first[section]):
        raise ValueError(f"methods: {config.name!r} and {first.name!r} differ in {section!r}; the methods of a study "
                         "share environment, model, rollout, SFT and training settings")
  return setups


def run_study(name: str, setups: list, runs_dir: str = "runs", *, baseline: str | None = None,
              print_fn=print) -> dict:
  """Runs every method's setup (SFT start shared), writes the results files (with the paired comparison against
  `baseline` and the training diagnostics); returns report.write_results' paths + rows."""
  methods = [setup.config.name for setup in setups]
  if baseline is not None and baseline not in methods:
    raise ValueError(f"baseline: {baseline!r} is not among the methods {methods}")
  out_dir = os.path.join(runs_dir, name)
  os.makedirs(out_dir, exist_ok=True)
  start = time.perf_counter()
  configs = [setup.config for setup in setups]
  sft_params = runner.warm_start(setups[0], progress=configs[0].log.progress,
                                 log=lambda line: runner._append_jsonl(os.path.join(out_dir, "sft.jsonl"), line))
  records, diagnostics = [], {}
  for setup in setups:
    config = setup.config
    workdir = os.path.join(out_dir, config.name)
    result = runner.run(config, workdir, sft_params=sft_params, setup=setup, print_fn=print_fn)
    records.extend(result["records"])
    diagnostics[config.name] = runner._read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  c = configs[0]
  env_notes = {"lookup_qa": f"hops={c.env.hops}, {c.env.num_entities} entities", "textworld_lite":
               f"{c.env.num_rooms} rooms", "grid_nav": f"size {c.env.size}"}.get(c.env.name, "")
  notes = (f"Environment {c.env.name} ({env_notes}, step format {c.env.step_format!r}, max_steps "
           f"{c.rollout.max_steps}, max_len {c.rollout.max_len}), tokenizer "
           f"{c.tokenizer!r}, model {c.model.preset} overridden to {c.model.num_layers} layers x "
           f"{c.model.hidden_size}; SFT warm start {c.sft.steps} steps on scripted-expert episodes (shared by all "
           f"methods{', per seed' if c.sft.per_seed else ', one for all seeds'}); then {c.train.iterations} RL "
           f"iterations of {c.rollout.num_tasks} tasks x {c.rollout.episodes_per_task} episodes; held-out evaluation "
           f"on {c.train.eval_episodes} episodes every {c.train.eval_every} iterations; {c.train.seeds} seeds. "
           f"Wall time {time.perf_counter() - start:.0f} s.")
  paths = report.write_results(out_dir, records, title=f"{name}: held-out success on {c.env.name}", notes=notes,
                               baseline=baseline, diagnostics=diagnostics)
  rows = report.summarize(records)
  print_fn("\n" + report.format_table(rows) + "\n")
  print_fn(f"results: {paths['md']}  {paths['csv']}\nplot: {paths['png']}")
  return {"paths": paths, "rows": rows, "records": records}


def grid_studies(preset: str, sets: list[str], progress: bool = True) -> list[tuple[dict, list]]:
  """(study, its method setups) for every study of grid `preset`, all built (every field of every study checked)
  before the first one compiles."""
  if preset not in presets.GRIDS:
    raise ValueError(f"preset: unknown {preset!r}; allowed: {', '.join(presets.GRIDS)}")
  studies = []
  for study in presets.GRIDS[preset]:
    overrides = configs.study_overrides(study.get("regime"), [f"{k}={v}" for k, v in study["sets"].items()] + sets)
    overrides["log.progress"] = progress
    studies.append((study, study_configs(study["methods"], study["seeds"], overrides)))
  return studies


def run_grid(name: str, preset: str, studies: list, runs_dir: str = "runs", *, command: str = "",
             keep_done: bool = False, print_fn=print) -> str:
  """Runs every study of a grid under <runs_dir>/<name>/<study>/ and writes <runs_dir>/<name>/results.md: the
  command, each study's settings and wall time, and each study's tables as its results.md has them. keep_done: a
  study whose results.md is already there (a grid stopped part-way) is kept, not rerun.

  The compiled programs of a study are dropped before the next one: a grid compiles dozens of programs, and keeping
  them all once ran this 24 GiB machine out of memory in the third study."""
  out_dir = os.path.join(runs_dir, name)
  os.makedirs(out_dir, exist_ok=True)
  start, sections = time.perf_counter(), []
  for study, setups in studies:
    study_start = time.perf_counter()
    results = os.path.join(out_dir, study["name"], "results.md")
    done = keep_done and os.path.exists(results)
    if not done:
      baseline = study.get("baseline", "steppo")
      run_study(study["name"], setups, out_dir, baseline=baseline if baseline in study["methods"] else None,
                print_fn=print_fn)
      runner._PROGRAMS.clear()
      jax.clear_caches()
    with open(results) as f:
      body = f.read().replace("\n# ", "\n### ").replace("\n## ", "\n### ")
    body = body[2:] if body.startswith("# ") else body
    wall = ("kept from an earlier run of the grid (its wall time is in its notes)" if done else
            f"wall time {time.perf_counter() - study_start:.0f} s")
    sections.append(f"## {study['name']}\n\n{study['why']}\n\n{wall[0].upper() + wall[1:]}; files in "
                    f"`{study['name']}/`.\n\n### {body.strip()}\n")
  text = (f"# {name}: the {preset} grid\n\n`{command}`\n\nTotal wall time {time.perf_counter() - start:.0f} s.\n\n"
          + "\n".join(sections))
  path = os.path.join(out_dir, "results.md")
  with open(path, "w") as f:
    f.write(text)
  print_fn(f"grid results: {path}")
  return path


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
  if _PRESET.value is not None:
    try:
      studies = grid_studies(_PRESET.value, _SET.value, _PROGRESS.value)
    except ValueError as error:
      sys.exit(str(error) if str(error).startswith(("preset", "methods", "set")) else f"config.{error}")
    run_grid(_NAME.value, _PRESET.value, studies, _RUNS_DIR.value, command="python " + " ".join(sys.argv),
             keep_done=_KEEP_DONE.value)
    return
  try:
    overrides = configs.study_overrides(_REGIME.value, _SET.value)
  except ValueError as error:
    sys.exit(str(error))
  for field, flag in (("train.iterations", _ITERATIONS), ("train.eval_every", _EVAL_EVERY),
                      ("sft.steps", _SFT_STEPS)):
    if flag.value is not None:
      overrides[field] = flag.value
  overrides["log.progress"] = _PROGRESS.value
  try:
    setups = study_configs(_METHODS.value, _SEEDS.value, overrides)
  except ValueError as error:
    sys.exit(f"config.{error}" if not str(error).startswith(("methods", "set")) else str(error))
  baseline = _BASELINE.value if _BASELINE.value in _METHODS.value else None
  run_study(_NAME.value, setups, _RUNS_DIR.value, baseline=baseline)


if __name__ == "__main__":
  app.run(main)
