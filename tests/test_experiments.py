"""experiments/: config validation, the runner (logs, checkpoints, exact resume), the ablation grid and its files."""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest

from experiments import ablation, configs, runner
from experiments.configs import (base, gigpo, grpo, presets, reinforce_pp, rloo, steppo, steppo_exact, token_ppo,
                                 token_ppo_lam95)
from stepjax import rollout
from stepjax.models import Transformer
from stepjax.models.transformer import PRESETS

ALL_CONFIGS = (steppo, steppo_exact, token_ppo, token_ppo_lam95, grpo, rloo, reinforce_pp, gigpo)


def one_hop(config):
  """The cheap lookup_qa regime the runner tests were sized for: one hop, plain commands of 2-3 tokens, L = 128."""
  config.env.update(step_format="plain", hops=1, max_hops=1, num_entities=16)
  config.rollout.update(max_steps=4, max_len=128, max_action_len=6)
  config.model.update(max_position_embeddings=512, attention_block=0)
  return config


def small(config, **train):
  """A few-second version of a config: one hop, a 1-layer 32-wide model, 2 x 2 episodes, 2 seeds."""
  one_hop(config)
  config.model.update(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16)
  config.rollout.update(num_tasks=2, episodes_per_task=2)
  config.algo.minibatches = 2
  config.sft.update(steps=2, num_tasks=4)
  config.train.update({"iterations": 4, "eval_every": 2, "eval_episodes": 4, "seeds": 2, **train})
  config.log.update(progress=False, tensorboard=True)
  return config


@pytest.mark.parametrize("module", ALL_CONFIGS, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_every_config_builds(module):
  setup = runner.build(module.get_config())
  assert setup.update_config.credit.estimator == module.get_config().algo.estimator
  assert setup.model_config.vocab_size >= setup.tokenizer.vocab_size


@pytest.mark.parametrize("env_name", sorted(presets.ENV_PRESETS))
def test_every_environment_is_one_flag_away(env_name):
  """env.name alone picks a consistent tokenizer, step format, lengths and budgets; the scripted expert's episodes
  fit them (every task solved, no step cut short, no context overflow); a field set explicitly wins."""
  config = steppo.get_config()
  config.env.name = env_name
  setup = runner.build(config)
  preset = presets.ENV_PRESETS[env_name]
  assert setup.config.tokenizer == preset[""]["tokenizer"]
  for section in ("env", "rollout", "model"):
    for field, value in preset[section].items():
      assert setup.config[section][field] == value, (section, field)
  assert {"<think>", "</think>"} <= set(setup.tokenizer.special_ids)  # the think format is reachable
  assert setup.env.max_action_len <= setup.rollout_config.max_action_len
  assert setup.rollout_config.max_len <= setup.model_config.max_position_embeddings
  expert_config = dataclasses.replace(setup.rollout_config, num_tasks=8, episodes_per_task=1)
  model = Transformer(setup.model_config.replace(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=1,
                                                 num_kv_heads=1, head_dim=16))
  params = model.init(jax.random.key(0), np.zeros((1, 1), np.int32))["params"]
  batch, info = rollout.rollout(params, setup.env, setup.env_params, jax.random.key(1), expert_config, model,
                                actor="expert")
  assert bool(np.all(info.success)) and not bool(np.any(batch.truncated))
  lengths = np.asarray(batch.step_len)[np.asarray(batch.step_mask)]
  assert lengths.mean() >= 16 and lengths.max() <= setup.rollout_config.max_action_len  # long steps
  config.rollout.max_len = 2048  # an explicit field wins over the preset
  config.model.max_position_embeddings = 2048
  assert runner.build(config).rollout_config.max_len == 2048


def test_one_hop_regime_is_the_first_release_main_job():
  setup = runner.build(presets.with_regime(steppo.get_config(), "one_hop"))
  assert (setup.config.env.step_format, setup.config.env.hops, setup.rollout_config.max_len) == ("plain", 1, 128)
  assert "<think>" not in setup.tokenizer.special_ids and setup.env.max_action_len <= 6
  with pytest.raises(ValueError, match=r"^regime: unknown 'two_hop'; allowed: two_hop_skip, one_hop"):
    presets.with_regime(steppo.get_config(), "two_hop")


@pytest.mark.parametrize("field, value, message", [
    ("algo.estimator", "td_lambda", r"^algo\.estimator: unknown 'td_lambda'; allowed: step_gae, token_gae"),
    ("algo.loss", "dpo", r"^algo\.loss: unknown 'dpo'; allowed: ppo, gspo, step_ratio"),
    ("algo.critic", "none", r"^algo\.critic: estimator 'step_gae' reads a critic"),
    ("algo.whiten", "batch", r"^algo\.whiten: unknown 'batch'"),
    ("algo.minibatches", 3, r"^update\.minibatches: 3 does not divide the batch size 32"),
    ("env.name", "atari", r"^env\.name: unknown 'atari'; allowed: lookup_qa, textworld_lite, grid_nav"),
    ("env.hops", 3, r"^env\.hops: must be in \[1, env\.max_hops=2\], got 3"),
    ("env.expert_slip", 1.5, r"^env\.expert_slip: must be in \[0, 1\]"),
    ("env.expert_skip", -0.1, r"^env\.expert_skip: must be in \[0, 1\]"),
    ("env.num_relations", 5, r"^env\.num_relations: expected 1 \.\.\. 4, got 5"),
    ("sft.entity_weight", 0.0, r"^sft\.entity_weight: must be a number > 0, got 0\.0"),
    ("model.preset", "gpt5", r"^model\.preset: unknown 'gpt5'; allowed: " + ", ".join(PRESETS) + r" \(or model"),
    ("model.checkpoint", "/nonexistent/ckpt", r"^model\.checkpoint: /nonexistent/ckpt is not a directory"),
    ("tokenizer", "gpt2", r"^tokenizer: 'gpt2' is not allowed"),
    ("rollout.max_action_len", 200, r"^rollout\.max_len: 256 cannot hold the first observation plus one step"),
    ("rollout.max_len", 1024, r"^rollout\.max_len: 1024 exceeds the model's max_position_embeddings 256"),
    ("train.eval_every", 7, r"^train\.eval_every: 7 must divide train\.iterations=30"),
    ("train.seeds", 0, r"^train\.seeds: must be an int >= 1, got 0"),
    ("optim.schedule", "linear", r"^optim\.schedule: unknown 'linear'"),
])
def test_bad_config_is_one_line_naming_the_field(field, value, message):
  config = base.get_config()
  section, leaf = field.split(".") if "." in field else (None, field)
  (config[section] if section else config)[leaf] = value
  with pytest.raises(ValueError, match=message) as error:
    runner.build(config)
  assert "\n" not in str(error.value)


def test_entity_weight_marks_each_entity_token():
  config = base.get_config()
  config.sft.entity_weight = 10.0
  setup = runner.build(config)
  weights = setup.sft_token_weights
  ids = [setup.tokenizer.encode(name)[0] for name in setup.env.entity_names]
  assert len(setup.env.entity_names) == 16 and weights.shape == (setup.model_config.vocab_size,)
  assert np.all(weights[ids] == 10.0) and np.sum(weights != 1.0) == 16
  assert runner.build(base.get_config()).sft_token_weights is None  # weight 1: the plain token mean
  config.env.name = "grid_nav"
  with pytest.raises(ValueError, match=r"^sft\.entity_weight: 10\.0 needs an environment that names its entities "
                     r"\(lookup_qa\), not 'grid_nav'; use 1\.0$"):
    runner.build(config)
  config = base.get_config()
  config.sft.entity_weight = 10.0
  config.tokenizer, config.env.step_format = "byte", "plain"
  with pytest.raises(ValueError, match=r"^sft\.entity_weight: needs one token per entity name \(tokenizer=word\); "
                     r"'byte' spells 'Zorva' in 5$"):
    runner.build(config)


def test_resume_without_checkpoint_is_one_line(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"^checkpoint\.directory: .* does not exist"):
    runner.run(small(steppo.get_config()), str(tmp_path / "fresh"), resume=True)


def _lines(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _without_timing(lines):
  return [{k: v for k, v in line.items() if k not in runner.TIMING_KEYS} for line in lines]


@pytest.mark.drill
def test_seeds_in_groups_match_one_program_and_resume(tmp_path):
  """train.seeds_at_once=1: the 2 seeds run one after another (each group's checkpoints in checkpoints/seeds<k>-<k>,
  its start saved as checkpoint 0), with the logs and final states of the run that vmaps both; a resume continues a
  group that had only its start (killed before its first checkpoint) and one that had finished its part.
  A drill (`make drills`): its one-seed programs cost about a minute of compilation, which the suite has no room
  for."""
  from test_runner_mesh import assert_same_logs  # noqa: PLC0415  (tests/ is on the path)

  quiet = lambda _: None  # noqa: E731
  # small()'s config, as test_resume_is_bit_identical runs it.
  together = runner.run(small(steppo.get_config()), str(tmp_path / "one"), print_fn=quiet)
  runner.run(small(steppo.get_config(), seeds_at_once=1, iterations=2), str(tmp_path / "groups"), print_fn=quiet)
  checkpoints = tmp_path / "groups" / "checkpoints"
  assert sorted(os.listdir(checkpoints)) == ["seeds0-0", "seeds1-1"]
  assert sorted(os.listdir(checkpoints / "seeds1-1")) == ["0", "2"]
  shutil.rmtree(checkpoints / "seeds1-1" / "2")  # seed 1 as if killed before its first checkpoint
  apart = runner.run(small(steppo.get_config(), seeds_at_once=1), str(tmp_path / "groups"), resume=True,
                     print_fn=quiet)
  assert_same_logs(tmp_path / "one", tmp_path / "groups", by_seed=True)
  assert [(r["seed"], r["env_steps"]) for r in apart["records"]] == [(r["seed"], r["env_steps"])
                                                                     for r in together["records"]]
  assert len(apart["state"]) == 2
  for i, group_state in enumerate(apart["state"]):
    for a, b in zip(jax.tree.leaves(together["state"]), jax.tree.leaves(group_state)):
      np.testing.assert_allclose(np.asarray(b)[0], np.asarray(a)[i], rtol=1e-4, atol=1e-5)


def test_resume_is_bit_identical(tmp_path):
  """4 iterations straight == 2 iterations, then --resume to 4: parameters, metrics and evaluations all equal; the
  same from a damaged checkpoint 4; then a plain rerun starts over."""
  straight = runner.run(small(steppo.get_config()), str(tmp_path / "a"), print_fn=lambda _: None)
  first = small(steppo.get_config())
  first.train.iterations = 2
  runner.run(first, str(tmp_path / "b"), print_fn=lambda _: None)
  resumed = runner.run(small(steppo.get_config()), str(tmp_path / "b"), resume=True, print_fn=lambda _: None)
  for a, b in zip(jax.tree.leaves(straight["state"]), jax.tree.leaves(resumed["state"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for name in ("metrics.jsonl", "eval.jsonl"):
    a, b = _lines(tmp_path / "a" / name), _lines(tmp_path / "b" / name)
    assert len(a) == len(b) == {"metrics.jsonl": 4 * 2, "eval.jsonl": 3 * 2}[name]
    assert _without_timing(a) == _without_timing(b)
  assert straight["records"] == resumed["records"]
  # TensorBoard event files (tensorboardX) per seed, orbax checkpoints at iterations 2 and 4.
  assert sorted(os.listdir(tmp_path / "a" / "tb")) == ["seed0", "seed1"]
  assert sorted(os.listdir(tmp_path / "a" / "tb" / "seed0"))[0].startswith("events.out.tfevents")
  assert sorted(d for d in os.listdir(tmp_path / "a" / "checkpoints") if d.isdigit()) == ["2", "4"]

  # A damaged newest checkpoint (its largest data file deleted): --resume names it, sets it aside and resumes from 2,
  # to the same end (drills/kill.py and tests/test_drill_checkpoint.py go further).
  step_dir = tmp_path / "b" / "checkpoints" / "4" / "state"
  files = [os.path.join(d, name) for d, _, names in os.walk(step_dir) for name in names]
  os.remove(max(files, key=os.path.getsize))
  printed = []
  resumed = runner.run(small(steppo.get_config()), str(tmp_path / "b"), resume=True, print_fn=printed.append)
  assert printed[0].startswith("resume: checkpoint 4 is damaged (")
  assert printed[0].endswith("set aside as 4.damaged; resuming from checkpoint 2")
  for a, b in zip(jax.tree.leaves(straight["state"]), jax.tree.leaves(resumed["state"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for name in ("metrics.jsonl", "eval.jsonl"):
    assert _without_timing(_lines(tmp_path / "a" / name)) == _without_timing(_lines(tmp_path / "b" / name))

  # A plain rerun in the used workdir starts over: the old run's checkpoints go first (orbax would skip saving step 2
  # below the old 4, and a later resume would restore the old run).
  runner.run(first, str(tmp_path / "b"), print_fn=lambda _: None)
  assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["2"]
  assert len(_lines(tmp_path / "b" / "metrics.jsonl")) == 2 * 2


def test_ablation_tiny_grid_writes_results(tmp_path, monkeypatch):
  setups = ablation.study_configs(["steppo", "grpo"], 2, {})
  setups = [runner.build(small(setup.config)) for setup in setups]
  printed = []
  monkeypatch.setattr(runner, "build", lambda config: pytest.fail("run_study rebuilt a setup it was given"))
  with pytest.raises(ValueError, match=r"^baseline: 'ppo' is not among the methods \['steppo', 'grpo'\]"):
    ablation.run_study("tiny", setups, str(tmp_path), baseline="ppo")  # refused before anything runs
  # One compiled evaluation for every method of the study, and the shared start evaluated once.
  runner._PROGRAMS.clear()  # programs built by earlier tests would hold the evaluation uncounted
  assert runner._evaluate_program(setups[0]) is runner._evaluate_program(setups[1])
  calls = []
  shared = runner._evaluate_program(setups[0])
  runner._PROGRAMS[runner._evaluation_key(setups[0])]["evaluate"] = lambda *a: calls.append(1) or shared(*a)
  out = ablation.run_study("tiny", setups, str(tmp_path), baseline="steppo", print_fn=printed.append)
  t = setups[0].config.train
  assert len(calls) == 1 + 2 * (t.iterations // t.eval_every)
  study = tmp_path / "tiny"
  for name in ("results.md", "results.csv", "curves.png", "records.json", "paired.csv"):
    assert (study / name).exists(), name
  assert (study / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  md = (study / "results.md").read_text()
  assert "| steppo | 2 |" in md and "| grpo | 2 |" in md
  assert "## Paired over seeds vs steppo" in md and "| grpo | 2 | 2 |" in md
  diagnostics = md.split("## Diagnostics (training)")[1].splitlines()
  header = next(line for line in diagnostics if line.startswith("| method |")).split("|")
  column = [cell.strip() for cell in header].index("critic EV (steps)")
  steppo_row = next(line for line in diagnostics if line.startswith("| steppo |")).split("|")
  grpo_row = next(line for line in diagnostics if line.startswith("| grpo |")).split("|")
  assert steppo_row[column].strip() != "—" and grpo_row[column].strip() == "—"  # StepPO has a critic, GRPO none
  assert [row["method"] for row in out["rows"]] == ["steppo", "grpo"]
  # Every method started from the same SFT params: identical held-out success at iteration 0 for each seed.
  start = {(r["method"], r["seed"]): r["success"][0] for r in out["records"]}
  assert start[("steppo", 0)] == start[("grpo", 0)] and start[("steppo", 1)] == start[("grpo", 1)]
  assert any("results:" in line for line in printed)


def test_ablation_rejects_unknown_method_and_field():
  with pytest.raises(ValueError, match=r"^methods: unknown method 'ppo2'; allowed: .*steppo"):
    ablation.study_configs(["ppo2"], 3, {})
  with pytest.raises(ValueError, match=r"^set: 'algo.gama' is not a config field"):
    ablation.study_configs(["steppo"], 3, {"algo.gama": 0.9})


@pytest.mark.parametrize("variant", sorted(presets.VARIANTS))
def test_every_variant_is_its_config_with_its_fields(variant):
  """A variant builds, carries its own name, sets its fields over the study's (--set cannot undo what defines it) and
  equals its config file everywhere else."""
  base_name, fields = presets.VARIANTS[variant]
  reference = configs.method_config(base_name, {"train.iterations": 10})
  study = {"train.iterations": 10, **{field: reference[field.split(".")[0]][field.split(".")[1]] for field in fields}}
  config = configs.method_config(variant, study)
  assert config.name == variant and config.train.iterations == 10
  for field, value in fields.items():
    section, leaf = field.split(".")
    assert config[section][leaf] == value != reference[section][leaf]
    reference[section][leaf] = value
  reference.name = variant
  assert config.to_json() == reference.to_json()
  runner.build(config)
  assert variant in configs.method_names()


def test_paper_grid_builds_every_study():
  """--preset=paper: every study's methods build and share their SFT settings (study_configs checks); the demo task
  and a second environment are in it, and the ablation variants run where steps are long."""
  studies = ablation.grid_studies("paper", ["train.seeds=1"], progress=False)
  by_name = {study["name"]: setups for study, setups in studies}
  assert set(by_name) == {"two_hop_skip", "grid_nav"}
  assert {setup.config.env.name for setups in by_name.values() for setup in setups} == {"lookup_qa", "grid_nav"}
  demo = by_name["two_hop_skip"][0].config  # the demo task: the regime make demo runs
  assert (demo.env.hops, demo.env.step_format, demo.env.expert_skip, demo.sft.entity_weight) == (2, "think", 0.6, 10)
  assert [s.config.name for s in by_name["two_hop_skip"]] == list(presets.METHODS) + list(presets.VARIANTS)
  assert all(s.config.train.seeds == 3 for setups in by_name.values() for s in setups)  # the study's seeds win
  with pytest.raises(ValueError, match=r"^preset: unknown 'papr'; allowed: paper"):
    ablation.grid_studies("papr", [])


def test_grid_writes_one_results_file_over_its_studies(tmp_path, monkeypatch):
  setups = [runner.build(small(setup.config)) for setup in ablation.study_configs(["grpo"], 2, {})]
  studies = [({"name": "first", "methods": ("grpo",), "why": "The first study."}, setups),
             ({"name": "second", "methods": ("grpo",), "why": "The second study."}, setups)]
  path = ablation.run_grid("tinygrid", "tiny", studies, str(tmp_path), command="python x.py", print_fn=lambda _: None)
  text = open(path).read()
  assert text.startswith("# tinygrid: the tiny grid\n\n`python x.py`")
  assert text.index("## first\n\nThe first study.") < text.index("## second\n\nThe second study.")
  assert text.count("| grpo | 2 |") == 2  # each study's table, as its own results.md has it
  for study in ("first", "second"):
    assert (tmp_path / "tinygrid" / study / "results.md").exists()
  # A grid stopped part-way continues with keep_done: finished studies are kept, not rerun.
  (tmp_path / "tinygrid" / "second" / "results.md").unlink()
  ran = []
  monkeypatch.setattr(ablation, "run_study", lambda name, *args, **kwargs: ran.append(name) or open(
      tmp_path / "tinygrid" / name / "results.md", "w").write(f"# {name}: redone\n"))
  text = open(ablation.run_grid("tinygrid", "tiny", studies, str(tmp_path), keep_done=True,
                                print_fn=lambda _: None)).read()
  assert ran == ["second"] and "Kept from an earlier run" in text and text.count("| grpo | 2 |") == 1


def test_model_from_a_hugging_face_checkpoint(tmp_path):
  """model.checkpoint: a safetensors directory is the model (its config and weights); SFT and RL start from it."""
  from stepjax.models import hf, transformer

  setup = runner.build(small(steppo.get_config()))
  params = transformer.init_params(setup.model_config, jax.random.key(0))
  hf.save_hf_checkpoint(setup.model_config, params, str(tmp_path / "ckpt"))
  config = small(steppo.get_config())
  config.model.checkpoint = str(tmp_path / "ckpt")
  config.sft.steps = 0  # RL starts from the checkpoint itself
  loaded = runner.build(config)
  assert loaded.model_config.hidden_size == 32 and loaded.model_config.vocab_size == setup.model_config.vocab_size
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded.checkpoint_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  start = runner.warm_start(loaded, progress=False)
  assert start is loaded.checkpoint_params
  # A checkpoint whose vocabulary cannot hold the tokenizer's ids is refused.
  small_vocab = setup.model_config.replace(vocab_size=256)
  hf.save_hf_checkpoint(small_vocab, transformer.init_params(small_vocab, jax.random.key(0)), str(tmp_path / "v"))
  config.model.checkpoint = str(tmp_path / "v")
  with pytest.raises(ValueError, match=r"^model\.checkpoint: vocab_size 256 does not cover the tokenizer's 338 ids"):
    runner.build(config)
