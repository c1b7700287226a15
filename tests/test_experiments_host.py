"""experiments/ on host environments (search_qa): build errors name the field, the expert host rollout replays the
expert's text and solves every question, `runner.run` does SFT + RL with held-out evaluation and writes the logs,
and a resumed run ends exactly where an uninterrupted one does.

The questions come from `stepjax.testing.write_multihop_questions`: two-hop bridge questions over made-up people
and towns in the HotpotQA file layout ("_id", "question", "answer", "supporting_facts", "context"), each with its 2
supporting paragraphs and 2 distractor paragraphs of other questions."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from experiments import runner
from experiments.configs import grpo
from stepjax import rollout as rollout_lib
from stepjax.envs.host import HostEnvPool
from stepjax.models import Transformer
from stepjax.testing import write_multihop_questions

def tiny(config, data, **train):
  """search_qa at test size: a 1-layer 32-wide model, 2 x 2 episodes, short passages and contexts, 2 SFT steps."""
  config.env.update(name="search_qa", data=str(data), top_k=2, passage_budget=60)
  config.model.update(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                      max_position_embeddings=640, attention_block=0)
  config.rollout.update(num_tasks=2, episodes_per_task=2, max_steps=4, max_len=640, max_action_len=48,
                        max_obs_len=192)
  config.algo.minibatches = 2
  config.sft.update(steps=3, num_tasks=4)
  config.train.update({"iterations": 2, "eval_every": 1, "eval_episodes": 4, "seeds": 1, **train})
  config.log.update(progress=False, tensorboard=True)
  return config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  path = tmp_path_factory.mktemp("hotpot") / "questions.json"
  write_multihop_questions(path)
  return path


def _lines(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _without_timing(lines):
  return [{k: v for k, v in line.items() if k not in runner.TIMING_KEYS} for line in lines]


@pytest.mark.parametrize("field, value, message", [
    ("env.data", None, r"^env\.data: search_qa needs a question file"),
    ("env.data", "/nonexistent/questions.json", r"^env\.data: '/nonexistent/questions\.json' is not a file"),
    ("env.data_format", "squad", r"^env\.data_format: unknown 'squad'; allowed: hotpotqa, 2wikimultihopqa, musique"),
    ("env.held_out_fraction", 1.5, r"^env\.held_out_fraction: must be in \(0, 1\), got 1\.5"),
    ("env.held_out_fraction", 1e-6, r"^env\.held_out_fraction: 1e-06 leaves no held-out questions of the 20"),
    ("env.step_timeout", -1.0, r"^env\.step_timeout: must be > 0 seconds \(or None: no limit\), got -1\.0"),
    ("env.tool_format", "json", r"^env\.tool_format: unknown 'json'; allowed: command, tags"),
    ("env.corpus", "/nonexistent/corpus.jsonl", r"^env\.corpus: '/nonexistent/corpus\.jsonl' is not a file"),
    ("rollout.max_obs_len", 0, r"^rollout\.max_obs_len: must be an int >= 1, got 0"),
    ("train.task_pool", 8, r"^train\.task_pool: 8: a host environment trains on its own training split"),
])
def test_bad_host_config_is_one_line_naming_the_field(data, field, value, message):
  config = tiny(grpo.get_config(), data)
  section, leaf = field.split(".")
  config[section][leaf] = value
  with pytest.raises(ValueError, match=message) as error:
    runner.build(config)
  assert "\n" not in str(error.value)


def test_bad_question_file_names_env_data(tmp_path, data):
  bad = tmp_path / "bad.json"
  records = json.loads(data.read_text())
  del records[3]["answer"]
  bad.write_text(json.dumps(records))
  with pytest.raises(ValueError, match=r"^env\.data: .*bad\.json\[3\]\.answer: missing") as error:
    runner.build(tiny(grpo.get_config(), bad))
  assert "\n" not in str(error.value)


def test_split_and_preset(data):
  config = grpo.get_config()
  config.env.update(name="search_qa", data=str(data))
  setup = runner.build(config)
  assert (setup.config.tokenizer, setup.config.env.data_format, setup.rollout_config.max_len) == ("byte", "hotpotqa",
                                                                                                  2048)
  train_ids = {q["id"] for q in setup.host.train_items}
  eval_ids = {q["id"] for q in setup.host.eval_items}
  assert not train_ids & eval_ids and len(train_ids | eval_ids) == 20 and eval_ids
  assert os.path.isdir(str(data) + ".bm25")  # the index is saved next to the question file


def test_expert_host_rollout_replays_the_expert_and_solves_every_question(data):
  setup = runner.build(tiny(grpo.get_config(), data))
  config = dataclasses.replace(setup.rollout_config, num_tasks=8, episodes_per_task=1)
  model = Transformer(setup.model_config)
  params = model.init(jax.random.key(0), np.zeros((1, 1), np.int32))["params"]
  expert = rollout_lib.make_host_rollout(model, config, setup.tokenizer, actor="expert")
  questions = setup.host.train_items
  with HostEnvPool(setup.host.make_envs(questions, 8)) as pool:
    batch, info = expert(params, pool, list(range(8)), jax.random.key(1))
  tok = setup.tokenizer
  assert np.all(info.success) and np.all(info.env_metrics["em"] == 1.0)
  np.testing.assert_array_equal(info.env_metrics["searches"], 2.0)
  assert np.all(np.asarray(batch.terminated)) and not np.any(np.asarray(batch.truncated))
  tokens, mask = np.asarray(batch.tokens), np.asarray(batch.action_mask)
  for row in range(8):
    q = questions[row]
    titles = list(dict.fromkeys(title for title, _ in q["supporting_facts"]))
    expected = [f"search {titles[0]}", f"search {titles[1]}", f"answer {q['answer']}"]
    starts, lengths = np.asarray(batch.step_start)[row], np.asarray(batch.step_len)[row]
    steps = [tokens[row, s:s + n] for s, n in zip(starts[:3], lengths[:3])]
    assert [tok.decode(step, skip_special=True) for step in steps] == expected
    assert all(step[-1] == tok.end_of_step_id for step in steps)  # every step ends with the end-of-step token
    assert mask[row].sum() == sum(len(step) for step in steps)  # the expert's tokens are the action tokens
    np.testing.assert_array_equal(np.asarray(batch.step_rewards)[row, :3], [0.0, 0.0, 1.0])


def test_run_sft_rl_eval_logs_and_resume(tmp_path, data):
  """SFT + 2 RL iterations with held-out evaluation after the start and each iteration; then the same run stopped
  after the first evaluation (1 iteration) and resumed to 2 gives the very same metrics, evaluations and state."""
  quiet = lambda _: None  # noqa: E731
  straight = runner.run(tiny(grpo.get_config(), data), str(tmp_path / "a"), print_fn=quiet)
  workdir = tmp_path / "a"
  sft = _lines(workdir / "sft.jsonl")
  assert [line["step"] for line in sft] == [1, 2, 3] and all(line["expert_success"] == 1.0 for line in sft)
  assert sft[-1]["nll"] < sft[0]["nll"]  # behaviour cloning learns
  metrics, evals = _lines(workdir / "metrics.jsonl"), _lines(workdir / "eval.jsonl")
  assert [(line["iteration"], line["seed"]) for line in metrics] == [(1, 0), (2, 0)]
  assert [line["iteration"] for line in evals] == [0, 1, 2]
  for line in metrics:
    assert {"success_rate", "em", "f1", "searches", "approx_kl", "env_steps_per_s", "agent_steps_per_s"} <= set(line)
    assert 0.0 <= line["em"] <= 1.0 and line["agent_steps"] >= 4  # 4 episodes of at least one step
  assert metrics[1]["env_steps"] == metrics[0]["agent_steps"] + metrics[1]["agent_steps"]
  for line in evals:
    assert {"success", "success_sampled", "return", "return_sampled", "episode_steps", "invalid_rate", "em", "f1",
            "searches"} <= set(line)
  assert straight["final"] == [evals[-1]] and len(straight["records"]) == 1
  assert os.listdir(workdir / "tb") == ["seed0"] and os.path.isdir(workdir / "checkpoints" / "seed0")

  first = tiny(grpo.get_config(), data, iterations=1)
  runner.run(first, str(tmp_path / "b"), print_fn=quiet)
  resumed = runner.run(tiny(grpo.get_config(), data), str(tmp_path / "b"), resume=True, print_fn=quiet)
  for name in ("metrics.jsonl", "eval.jsonl", "sft.jsonl"):
    assert _without_timing(_lines(tmp_path / "a" / name)) == _without_timing(_lines(tmp_path / "b" / name)), name
  assert resumed["final"] == straight["final"]
  for a, b in zip(jax.tree.leaves(straight["state"]), jax.tree.leaves(resumed["state"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # A plain rerun in the used workdir starts over: the old run's checkpoint 2 goes (orbax would otherwise skip saving
  # steps 0 and 1 below it, and a resume would restore the old run's state).
  runner.run(first, str(tmp_path / "b"), print_fn=quiet)
  assert sorted(os.listdir(tmp_path / "b" / "checkpoints" / "seed0")) == ["0", "1"]
  assert [line["iteration"] for line in _lines(tmp_path / "b" / "eval.jsonl")] == [0, 1]


def test_resume_without_checkpoint_is_one_line(tmp_path, data):
  with pytest.raises(FileNotFoundError, match=r"^checkpoint\.directory: .* does not exist"):
    runner.run(tiny(grpo.get_config(), data), str(tmp_path / "fresh"), resume=True)
