"""A Hugging Face model end to end, offline: a tiny random Qwen2 checkpoint (transformers `save_pretrained`) and a
byte-level BPE tokenizer.json with Qwen's chat special tokens (`tokenizers`); `experiments/train.py` runs SFT and 2
GRPO iterations on search_qa in ChatML with them; `experiments/export_hf.py` writes the trained policy back, and
transformers loads it with the logits of stepjax's forward. The episodes' ids are exactly what transformers'
`apply_chat_template` gives for the same messages. Then the chat format's ids and errors on tiny word-level
tokenizers (ChatML and Llama 3), and the config errors of chat templates and role tokens.

Sizes: a 1-layer 32-wide model, 2 x 2 episodes of at most 320 tokens, 3 SFT steps, every batch of 4 rows so that
the run compiles each program once and the checks below reuse them; compiling the SFT step, the RL update and the
rollout pieces is most of this file's time.
"""

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import export_hf, host_runner, runner
from experiments.configs import grpo
from stepjax import chat as chat_lib
from stepjax import rollout as rollout_lib
from stepjax import train
from stepjax.data import load_records
from stepjax.envs import search_qa
from stepjax.envs.host import ChatEnv, HostEnvPool, HostStep
from stepjax.models import Transformer, forward, load_hf_checkpoint
from stepjax.testing import write_multihop_questions
from stepjax.tokenizers import HFTokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN3_THINK = ("<think>", "</think>")  # ordinary added tokens in Qwen3's tokenizer, as here
# Qwen's ChatML template without its tool-call branches: what `apply_chat_template` renders for plain messages.
CHATML_JINJA = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                "{% endif %}")
SYSTEM = "Search, then answer."
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
              r"\s+(?!\S)|\s+")


def build_qwen_tokenizer(path, texts) -> None:
  """A byte-level BPE tokenizer.json (Qwen's kind) trained on `texts`, with Qwen's chat special tokens after the
  learned vocabulary (as in Qwen, ids just below the checkpoint's padded embedding size), and a tokenizer_config.json
  with Qwen's roles and a ChatML template."""
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

  tokenizer = Tokenizer(models.BPE())
  tokenizer.normalizer = normalizers.NFC()
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence([  # Qwen2's (transformers' Qwen2Tokenizer sets the same)
      pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=1024, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tokenizer.train_from_iterator(texts, trainer)
  tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in QWEN_SPECIAL])
  tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in QWEN3_THINK])
  tokenizer.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
               "pad_token": "<|endoftext|>", "add_prefix_space": False, "chat_template": CHATML_JINJA}, f)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """{"data": the questions, "checkpoint": a Qwen2 checkpoint directory holding tokenizer.json too}."""
  root = tmp_path_factory.mktemp("hf_e2e")
  data = str(root / "questions.json")
  write_multihop_questions(data)
  records = load_records(data, "hotpotqa").records
  # The tokenizer learns from the expert's episodes (observations and commands), as a real one knows English.
  env, texts = search_qa.SearchQAEnv(records, search_qa.SearchQAConfig(top_k=2, passage_budget=60)), []
  for i in range(len(records)):
    texts.append(env.reset(i))
    while (command := env.expert_command()) is not None:
      step = env.step(command)
      texts += [command, step.observation]
      if step.terminated or step.truncated:
        break
  checkpoint = str(root / "qwen2_tiny")
  os.makedirs(checkpoint)
  build_qwen_tokenizer(checkpoint, texts)
  vocab = tokenizers.Tokenizer.from_file(os.path.join(checkpoint, "tokenizer.json")).get_vocab_size()
  config = transformers.Qwen2Config(
      vocab_size=-(-vocab // 64) * 64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=True)
  torch.manual_seed(0)
  transformers.AutoModelForCausalLM.from_config(config).save_pretrained(checkpoint)
  return {"data": data, "checkpoint": checkpoint}


def overrides(files) -> dict:
  """The command-line fields of the run (beyond --config=grpo.py)."""
  checkpoint = files["checkpoint"]
  return {
      "env.name": "search_qa", "env.data": files["data"], "env.top_k": 2, "env.passage_budget": 60,
      "model.checkpoint": checkpoint, "tokenizer": os.path.join(checkpoint, "tokenizer.json"),
      "model.attention_block": 0, "chat.template": "chatml", "chat.system": SYSTEM,
      "rollout.num_tasks": 2, "rollout.episodes_per_task": 2, "rollout.max_steps": 4, "rollout.max_len": 320,
      "rollout.max_action_len": 24, "rollout.max_obs_len": 96, "algo.epochs": 1, "algo.minibatches": 1,
      "sft.steps": 3, "sft.num_tasks": 4, "train.iterations": 2, "train.eval_every": 1, "train.eval_episodes": 4,
      "train.seeds": 1, "log.progress": False, "log.tensorboard": False,
  }


def run_config(files):
  """The config train.py builds from the same flags."""
  config = grpo.get_config()
  for field, value in overrides(files).items():
    section, _, leaf = field.rpartition(".")
    (config[section] if section else config)[leaf] = value
  return config


@pytest.fixture(scope="module")
def trained(files, tmp_path_factory):
  """experiments/train.py's main, in this process, then export_hf.export. -> {"workdir", "export"}."""
  from absl import flags

  from experiments import train as train_cli

  root = tmp_path_factory.mktemp("hf_e2e_run")
  workdir, out = str(root / "run"), str(root / "export")
  argv = ["train.py", f"--config={REPO}/experiments/configs/grpo.py", f"--workdir={workdir}"]
  argv += [f"--config.{field}={value}" for field, value in overrides(files).items()]
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr("sys.argv", argv)  # config_flags reads the --config.<field> overrides from sys.argv
    flags.FLAGS(argv)
    try:
      train_cli.main([])
    finally:
      flags.FLAGS.unparse_flags()
  info = export_hf.export(workdir, out, seed=0)
  assert info == {"seed": 0, "step": 2, "files": ["config.json", "model.safetensors", "tokenizer.json",
                                                   "tokenizer_config.json"]}
  return {"workdir": workdir, "export": out}


@pytest.fixture(scope="module")
def setup(files):
  return runner.build(run_config(files))


def _lines(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_train_py_runs_sft_and_two_rl_iterations(files, trained):
  workdir = trained["workdir"]
  sft = _lines(os.path.join(workdir, "sft.jsonl"))
  assert [line["step"] for line in sft] == [1, 2, 3] and all(line["expert_success"] == 1.0 for line in sft)
  assert sft[-1]["nll"] < sft[0]["nll"]  # behaviour cloning learns
  metrics = _lines(os.path.join(workdir, "metrics.jsonl"))
  assert [(line["iteration"], line["seed"]) for line in metrics] == [(1, 0), (2, 0)]
  for line in metrics:
    assert all(np.isfinite(line[name]) for name in ("policy_loss", "approx_kl", "return_mean", "em"))
    assert line["agent_steps"] >= 4 and line["skipped"] == 0
  assert [line["iteration"] for line in _lines(os.path.join(workdir, "eval.jsonl"))] == [0, 1, 2]
  with open(os.path.join(workdir, "config.json")) as f:
    recorded = json.load(f)
  assert (recorded["chat"]["template"], recorded["chat"]["system"]) == ("chatml", SYSTEM)
  assert recorded["model"]["checkpoint"] == files["checkpoint"]


def test_tokenizer_roles_come_from_the_chat_template(setup):
  tok, rc = setup.tokenizer, setup.rollout_config
  assert isinstance(tok, HFTokenizer)
  assert (tok.end_of_step_id, tok.eos_id, tok.pad_id) == tuple(tok.token_to_id(name) for name in (
      "<|im_end|>", "<|endoftext|>", "<|endoftext|>"))
  assert tok.vocab_size <= setup.model_config.vocab_size  # nothing added: the checkpoint's embedding covers it
  assert rc.stop_ids == (tok.end_of_step_id, tok.eos_id)
  assert setup.host.chat.end_of_step_id == tok.end_of_step_id


@functools.lru_cache(maxsize=2)
def _hf_tokenizer(path):
  return transformers.AutoTokenizer.from_pretrained(path)


def _expected_episode_ids(setup, question, commands):
  """The ids transformers gives for the episode's messages: the env's own (unwrapped) observations as user turns,
  `commands` as assistant turns, rendered with the checkpoint's ChatML template and encoded whole."""
  hf_tokenizer = _hf_tokenizer(setup.config.model.checkpoint)
  env = setup.host.make_envs([question], 1)[0]
  assert isinstance(env, ChatEnv)
  inner = env.env
  messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": inner.reset(0)}]
  for command in commands:
    messages += [{"role": "assistant", "content": command},
                 {"role": "user", "content": inner.step(command, None).observation}]
  text = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  return hf_tokenizer(text, add_special_tokens=False)["input_ids"], text


def test_expert_episodes_are_transformers_chat_template_ids(setup, trained):
  """SFT's token rows: the exact ChatML layout, id for id what apply_chat_template + encode give; the actions (and
  only they) are action tokens, each ending with <|im_end|>."""
  del trained  # after the run: its compiled programs serve here
  # The batch size of the run (4), so that the programs SFT compiled serve here too.
  config = dataclasses.replace(setup.rollout_config, num_tasks=4, episodes_per_task=1)
  expert = rollout_lib.make_host_rollout(Transformer(setup.model_config), config, setup.tokenizer, actor="expert")
  questions = setup.host.train_items[:4]
  with HostEnvPool(setup.host.make_envs(questions, 4)) as pool:
    batch, info = expert(setup.checkpoint_params, pool, [0, 1, 2, 3], jax.random.key(0))
  assert np.all(info.success)
  tok, chat = setup.tokenizer, setup.host.chat
  im_start, im_end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
  for row, question in enumerate(questions):
    titles = list(dict.fromkeys(title for title, _ in question["supporting_facts"]))
    commands = [f"search {titles[0]}", f"search {titles[1]}", f"answer {question['answer']}"]
    expected, text = _expected_episode_ids(setup, question, commands)
    n = int(batch.seq_len[row])
    ids = np.asarray(batch.tokens)[row, :n]
    assert ids.tolist() == expected
    assert tok.decode(ids) == text
    assert text.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nTools: search")
    assert text.endswith("<|im_start|>user\nCorrect.<|im_end|>\n<|im_start|>assistant\n")
    starts, lengths = np.asarray(batch.step_start)[row, :3], np.asarray(batch.step_len)[row, :3]
    mask = np.zeros(n, bool)
    for start, length, command in zip(starts, lengths, commands):
      step = ids[start:start + length]
      assert tok.decode(step) == command + "<|im_end|>" and step[-1] == im_end
      assert ids[start - len(chat.suffix):start].tolist() == list(chat.suffix)  # ...<|im_start|>assistant\n
      assert ids[start + length:start + length + len(chat.prefix)].tolist() == list(chat.prefix)
      mask[start:start + length] = True
    np.testing.assert_array_equal(np.asarray(batch.action_mask)[row, :n], mask)
    assert ids[0] == im_start and ids[:len(chat.first_prefix)].tolist() == list(chat.first_prefix)


def test_model_episodes_have_the_same_turns(setup, trained):
  """RL's rows (sampled from the trained policy): every observation sits between the same turn headers as in SFT."""
  config = dataclasses.replace(setup.rollout_config, num_tasks=4, episodes_per_task=1)
  sample = rollout_lib.make_host_rollout(Transformer(setup.model_config), config, setup.tokenizer)
  with HostEnvPool(setup.host.make_envs(setup.host.train_items, 4)) as pool:
    # A key on the device, as the run's are: the run's compiled sampler serves.
    key = jax.device_put(jax.random.key(1), jax.devices()[0])
    batch, _ = sample(_trained_policy(setup, trained["workdir"]), pool, [0, 1, 2, 3], key)
  chat = setup.host.chat
  for row in range(4):
    ids = np.asarray(batch.tokens)[row, :int(batch.seq_len[row])].tolist()
    steps = int(np.asarray(batch.step_mask)[row].sum())
    assert steps >= 1 and ids[:len(chat.first_prefix)] == list(chat.first_prefix)
    for t in range(steps):
      start, length = int(batch.step_start[row, t]), int(batch.step_len[row, t])
      assert ids[start - len(chat.suffix):start] == list(chat.suffix)
      after = ids[start + length:start + length + len(chat.prefix)]
      assert after == list(chat.prefix) or start + length == len(ids)  # the last step may end the row


def _trained_policy(setup, workdir):
  """The seed's final policy params, restored in full from the run's orbax checkpoint (the runner's own way)."""
  programs = host_runner._programs(setup)
  key = jax.random.fold_in(jax.random.key(0), 1)
  state, iteration = train.restore_checkpoint(os.path.join(workdir, "checkpoints", "seed0"),
                                              jax.eval_shape(programs["init"], key, None))
  assert iteration == 2
  return train.policy_trunk(state.params["policy"])


def test_export_loads_in_transformers_with_the_same_logits(setup, trained):
  params = _trained_policy(setup, trained["workdir"])
  out = trained["export"]
  changed = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), params, setup.checkpoint_params)
  assert max(jax.tree.leaves(changed)) > 1e-3  # SFT and RL moved the weights

  config, exported = load_hf_checkpoint(out)
  assert config.tie_word_embeddings and config.qkv_bias  # Qwen2, as loaded
  jax.tree.map(np.testing.assert_array_equal, exported, jax.device_get(params))
  with open(os.path.join(out, "config.json")) as f:
    hf_config = json.load(f)
  tok = setup.tokenizer
  assert hf_config["architectures"] == ["Qwen2ForCausalLM"]
  assert (hf_config["eos_token_id"], hf_config["pad_token_id"]) == ([tok.end_of_step_id, tok.eos_id], tok.pad_id)

  model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
  episode = np.asarray(_expected_episode_ids(setup, setup.host.train_items[0],
                                             ["search nowhere", "answer nothing"])[0], np.int32)
  lengths = [len(episode), 40, 7]
  tokens = np.full((3, len(episode)), tok.pad_id, np.int32)
  for row, n in enumerate(lengths):
    tokens[row, :n] = episode[:n]
  mask = (np.arange(tokens.shape[1]) < np.array(lengths)[:, None]).astype(np.int64)
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()
  ours = np.asarray(jax.jit(forward, static_argnums=0)(setup.model_config, params, jnp.asarray(tokens))[0])
  for row, n in enumerate(lengths):
    np.testing.assert_allclose(ours[row, :n], theirs[row, :n], atol=1e-4, rtol=0)

  # The tokenizer next to the weights is the run's: same ids, and transformers reads it with its chat template.
  exported_tokenizer = tokenizers.Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
  text = tok.decode(episode)
  assert exported_tokenizer.encode(text, add_special_tokens=False).ids == episode.tolist()
  assert transformers.AutoTokenizer.from_pretrained(out)(text, add_special_tokens=False)["input_ids"] == \
      episode.tolist()


def test_export_errors_are_one_line(trained, tmp_path):
  with pytest.raises(ValueError, match=r"^seed: 3 is not a seed of the run in .*; its seeds are \[0\]$"):
    export_hf.export(trained["workdir"], str(tmp_path / "x"), seed=3)
  with pytest.raises(FileNotFoundError, match=r"^checkpoint\.step: 7 is not a complete checkpoint in .*; available"):
    export_hf.export(trained["workdir"], str(tmp_path / "x"), step=7)
  with pytest.raises(ValueError, match=r"^workdir: .*config\.json is missing"):
    export_hf.export(str(tmp_path), str(tmp_path / "x"))


# ------------------------------------------------------------------------------------------------------
# The chat format on tiny word-level tokenizers: exact ids, one-line errors.
# ------------------------------------------------------------------------------------------------------

WORDS = ("[UNK]", " ", "\n", "system", "user", "assistant", "Be", "brief", "look", "north", "ok", ".")
CHATML_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
LLAMA3_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def word_tokenizer(path, special, **roles) -> HFTokenizer:
  """A tokenizer.json whose ids are WORDS' indices then `special`'s: each word, space and newline one id."""
  from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers

  library = Tokenizer(models.WordLevel({word: i for i, word in enumerate(WORDS)}, unk_token="[UNK]"))
  library.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w]"), behavior="isolated")
  library.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in special])
  library.save(str(path))
  return HFTokenizer(path, **roles)


def test_chatml_ids(tmp_path):
  tok = word_tokenizer(tmp_path / "tokenizer.json", CHATML_TOKENS, end_of_step="<|im_end|>",
                       end_of_episode="<|endoftext|>")
  w = {word: i for i, word in enumerate(WORDS)}
  start, end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
  assert (start, end) == (13, 14)
  chat = chat_lib.make_chat_format(tok, "chatml", system="Be brief.")
  obs = tok.encode("look north")
  user, assistant = [start, w["user"], w["\n"]], [start, w["assistant"], w["\n"]]
  system = [start, w["system"], w["\n"], w["Be"], w[" "], w["brief"], w["."], end, w["\n"]]
  assert chat.wrap(obs, first=True).tolist() == system + user + obs + [end, w["\n"]] + assistant
  assert chat.wrap(obs, first=False).tolist() == [w["\n"]] + user + obs + [end, w["\n"]] + assistant
  assert chat.wrap([], first=False).dtype == np.int32
  assert chat.end_of_step_id == tok.end_of_step_id == end
  assert chat.overhead == len(system + user) + 5
  assert chat_lib.make_chat_format(tok, "chatml").first_prefix == tuple(user)  # no system turn


def test_llama3_ids(tmp_path):
  tok = word_tokenizer(tmp_path / "tokenizer.json", LLAMA3_TOKENS, end_of_step="<|eot_id|>",
                       end_of_episode="<|end_of_text|>", pad="<|end_of_text|>")
  w = {word: i for i, word in enumerate(WORDS)}
  bot, eot = tok.token_to_id("<|begin_of_text|>"), tok.token_to_id("<|eot_id|>")
  head, head_end = tok.token_to_id("<|start_header_id|>"), tok.token_to_id("<|end_header_id|>")
  chat = chat_lib.make_chat_format(tok, "llama3", system="ok")
  user = [head, w["user"], head_end, w["\n"], w["\n"]]
  assistant = [head, w["assistant"], head_end, w["\n"], w["\n"]]
  system = [head, w["system"], head_end, w["\n"], w["\n"], w["ok"], eot]
  obs = tok.encode("look")
  assert chat.wrap(obs, first=True).tolist() == [bot] + system + user + obs + [eot] + assistant
  assert chat.wrap(obs, first=False).tolist() == user + obs + [eot] + assistant  # no separator after <|eot_id|>
  # Overrides by name: no begin token, another turn start.
  plain = chat_lib.make_chat_format(tok, "llama3", begin="", turn_start="<|begin_of_text|>")
  assert plain.wrap(obs, first=True).tolist() == [bot, w["user"], head_end, w["\n"], w["\n"]] + obs + [eot] + [
      bot, w["assistant"], head_end, w["\n"], w["\n"]]


class _Scripted:
  """A host env: text or id observations, a fault on the action "boom"."""

  color = "green"

  def reset(self, seed):
    return "look" if seed == 0 else np.array([7, 8], np.int32)

  def step(self, action_text, action_tokens):
    if action_text == "boom":
      raise RuntimeError("boom")
    return HostStep(observation="ok", reward=1.0, terminated=True, truncated=False, info={"success": True})

  def expert_command(self):
    return "look north"


def test_chat_env_wraps_every_observation(tmp_path):
  tok = word_tokenizer(tmp_path / "tokenizer.json", CHATML_TOKENS, end_of_step="<|im_end|>",
                       end_of_episode="<|endoftext|>")
  chat = chat_lib.make_chat_format(tok, "chatml", system="Be brief.")
  env = ChatEnv(_Scripted(), chat, tok)
  assert env.reset(0).tolist() == chat.wrap(tok.encode("look"), first=True).tolist()
  assert env.reset(1).tolist() == chat.wrap([7, 8], first=True).tolist()  # ids are used as given
  step = env.step("go", np.array([1], np.int32))
  assert step.observation.tolist() == chat.wrap(tok.encode("ok"), first=False).tolist()
  assert (step.reward, step.terminated, step.truncated, step.info) == (1.0, True, False, {"success": True})
  fault = env.step("boom", np.array([1], np.int32))
  assert fault.truncated and not fault.terminated and fault.info["error"] == "RuntimeError('boom')"
  assert fault.observation.tolist() == chat.wrap(tok.encode("Environment error: RuntimeError"), first=False).tolist()
  assert (env.expert_command(), env.color) == ("look north", "green")


@pytest.mark.parametrize("template, names, message", [
    ("chatml", {"turn_start": "<|nope|>"}, r"^turn_start: '<\|nope\|>' is not a token of .*tokenizer\.json; set "
                                           r"chat\.turn_start to one of its special tokens"),
    ("llama3", {}, r"^begin: '<\|begin_of_text\|>' is not a token of "),
    ("chatml", {"turn_end": "<|endoftext|>"}, r"^turn_end: '<\|endoftext\|>' \(id 12\) is not the tokenizer's "
                                              r"end-of-step token \(id 14\)"),
    ("chatml", {"turn_end": ""}, r"^turn_end: must name a token of the tokenizer, got ''$"),
    ("chatml", {"turn_ends": "x"}, r"^turn_ends: is not a chat token field; allowed: begin, turn_start"),
    ("vicuna", {}, r"^template: unknown 'vicuna'; allowed: chatml, llama3$"),
])
def test_chat_format_errors_are_one_line(tmp_path, template, names, message):
  tok = word_tokenizer(tmp_path / "tokenizer.json", CHATML_TOKENS, end_of_step="<|im_end|>",
                       end_of_episode="<|endoftext|>")
  with pytest.raises(ValueError, match=message) as error:
    chat_lib.make_chat_format(tok, template, **names)
  assert "\n" not in str(error.value)


@pytest.mark.parametrize("changes, message", [
    ({"chat.turn_start": "<|nope|>"}, r"^chat\.turn_start: '<\|nope\|>' is not a token of .*tokenizer\.json"),
    ({"chat.template": "vicuna"}, r"^chat\.template: unknown 'vicuna'; allowed: none, chatml, llama3$"),
    ({"chat.template": "llama3"}, r"^chat\.template: 'llama3' takes '<\|eot_id\|>' as the end_of_step token, which "
                                  r".* lacks; set chat\.turn_end to one of its tokens$"),
    ({"chat.turn_end": "<|nope|>"}, r"^chat\.turn_end: '<\|nope\|>' is not a token of "),
    ({"special_tokens.end_of_episode": "<|nope|>"}, r"^special_tokens\.end_of_episode: '<\|nope\|>' is not a token"),
    ({"special_tokens.end_of_episode": "<|im_end|>"}, r"^special_tokens\.end_of_episode: '<\|im_end\|>' is the "
                                                      r"end-of-step token too"),
    ({"special_tokens.end_of_step": "<|endoftext|>"}, r"^special_tokens\.end_of_step: '<\|endoftext\|>' is not the "
                                                      r"chat's turn end '<\|im_end\|>'"),
    ({"chat.template": "none", "chat.system": "hi"}, r"^chat\.system: 'hi' is set but chat\.template is 'none'"),
    ({"tokenizer": "byte"}, r"^chat\.template: 'chatml' needs a tokenizer\.json that holds its tokens; "
                            r"config\.tokenizer is 'byte'$"),
    ({"tokenizer": "byte", "chat.template": "none", "chat.system": "", "special_tokens.pad": "<|endoftext|>"},
     r"^special_tokens\.pad: '<\|endoftext\|>': the 'byte' tokenizer's reserved tokens are fixed"),
    ({"env.name": "lookup_qa"}, r"^chat\.template: 'chatml' applies to host environments \(search_qa, textworld\); "
                                r"lookup_qa builds its observations inside JAX: use 'none'$"),
    ({"rollout.max_obs_len": 16}, r"^rollout\.max_obs_len: 16 cannot hold an observation with the chat template's "
                                  r"\d+ ids around it"),
])
def test_bad_chat_config_is_one_line_naming_the_field(files, changes, message):
  config = run_config(files)
  for field, value in changes.items():
    section, leaf = field.rsplit(".", 1) if "." in field else ("", field)
    (config[section] if section else config)[leaf] = value
  with pytest.raises(ValueError, match=message) as error:
    runner.build(config)
  assert "\n" not in str(error.value)


def test_special_tokens_map_roles_without_a_chat_template(files):
  config = run_config(files)
  config.chat.update(template="none", system="")
  config.special_tokens.update(end_of_step="<|im_end|>", end_of_episode="<|endoftext|>")
  setup = runner.build(config)
  tok = setup.tokenizer
  assert (tok.end_of_step_id, tok.eos_id) == (tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>"))
  assert setup.host.chat is None and not isinstance(setup.host.make_envs(setup.host.train_items, 1)[0], ChatEnv)
