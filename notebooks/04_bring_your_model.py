# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Bring your own model: a Hugging Face checkpoint in, an episode step by step, a checkpoint out
#
# stepjax reads a Hugging Face causal LM directory (Llama, Qwen2, Qwen3: `config.json` + safetensors) and its
# `tokenizer.json` directly: no torch at run time. This notebook
#
# 1. makes such a directory offline: a tiny **random** Qwen2 (`transformers` `save_pretrained`) and a byte-level BPE
#    `tokenizer.json` trained with `tokenizers` on lookup_qa's words (in your own use: point `MODEL_DIR` at a real
#    checkpoint, e.g. one downloaded with `huggingface_hub.snapshot_download`, and skip that cell);
# 2. builds the lookup_qa environment over that tokenizer and loads the checkpoint (`model.checkpoint`);
# 3. runs a multi-turn episode one step at a time with the KV cache: the prompt is prefilled once, then each step
#    decodes (or replays) the action and **extends** the cache with the observation, never re-reading the context;
# 4. exports the params back to Hugging Face format (`save_hf_checkpoint`) and reloads them with `transformers` to
#    compare logits with stepjax's forward.
#
# **Runtime.** 47 s and 1.25 GB of RAM at most (peak RSS) on the project's 2-core CPU machine (not measured on Colab;
# torch is only used to create and re-read the checkpoint). For a real model on GPU/TPU: install `jax[cuda12]`, pass
# `dtype=jnp.bfloat16`, and see `experiments/configs/base.py` (`model.checkpoint`, `tokenizer`, `chat.template`) to
# train it with `experiments/train.py`. `STEPJAX_NOTEBOOK_SIZE=ci` uses 1 layer instead of 2.

# %%
# Setup: in Colab this clones the project and installs it with its pinned versions; locally (stepjax importable
# from a checkout) it does nothing but put the checkout on sys.path (experiments/ is a folder, not a package).
import importlib.util
import os
import subprocess
import sys

STEPJAX_REPO = os.environ.get("STEPJAX_REPO", "https://github.com/stepjax/stepjax")  # where the project lives
STEPJAX_REF = os.environ.get("STEPJAX_REF", "v0.1.0")  # a tag or commit: the notebook and code go together


def _checkout():
  """The project checkout holding this notebook (or the cwd), if any."""
  for folder in (os.getcwd(), os.path.dirname(os.getcwd())):
    if os.path.isfile(os.path.join(folder, "setup.py")) and os.path.isdir(os.path.join(folder, "experiments")):
      return folder
  return None


ROOT = _checkout()
if ROOT is None or importlib.util.find_spec("stepjax") is None:
  ROOT = ROOT or os.path.abspath("stepjax")
  if not os.path.isdir(ROOT):
    subprocess.run(["git", "clone", "--depth", "1", "--branch", STEPJAX_REF, STEPJAX_REPO, ROOT], check=True)
  subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "-c", os.path.join(ROOT, "constraints.txt"),
                  "-e", ROOT + "[experiments]"], check=True)
  importlib.invalidate_caches()
sys.path.insert(0, ROOT)
SIZE = os.environ.get("STEPJAX_NOTEBOOK_SIZE", "default")  # "ci": the smallest run that exercises every cell
assert SIZE in ("ci", "default"), SIZE
print("stepjax checkout:", ROOT, "| size:", SIZE)

# %% [markdown]
# ## 1. A checkpoint directory and its tokenizer.json (offline)

# %%
import dataclasses
import tempfile
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import torch
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from experiments import runner
from experiments.configs import presets, steppo
from stepjax import rollout
from stepjax.envs import lookup_qa
from stepjax.models import Transformer, forward
from stepjax.models.hf import save_hf_checkpoint

start_time = time.perf_counter()
WORK = tempfile.mkdtemp(prefix="stepjax_nb04_")
MODEL_DIR = os.path.join(WORK, "qwen2_tiny")
os.makedirs(MODEL_DIR)

# A byte-level BPE (Qwen's kind) that knows lookup_qa's words, plus the special tokens stepjax uses.
words = list(lookup_qa.vocabulary())
bpe = Tokenizer(models.BPE())
bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
bpe.decoder = decoders.ByteLevel()
bpe.train_from_iterator([" ".join(words)] * 4 + words, trainers.BpeTrainer(
    vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
bpe.add_special_tokens([AddedToken(token, special=True, normalized=False)
                        for token in ("<|endoftext|>", "<|end_of_step|>", "<|end_of_episode|>")])
bpe.save(os.path.join(MODEL_DIR, "tokenizer.json"))

vocab = bpe.get_vocab_size()
hf_config = transformers.Qwen2Config(
    vocab_size=-(-vocab // 64) * 64, hidden_size=32, intermediate_size=64, num_hidden_layers=1 if SIZE == "ci" else 2,
    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=True)
torch.manual_seed(0)
transformers.AutoModelForCausalLM.from_config(hf_config).save_pretrained(MODEL_DIR)
print(MODEL_DIR, sorted(os.listdir(MODEL_DIR)), f"tokenizer: {vocab} tokens")

# %% [markdown]
# ## 2. The environment over this tokenizer, the model from the checkpoint
#
# Two config fields do it: `tokenizer` (a tokenizer.json path) and `model.checkpoint` (the directory). lookup_qa
# builds every observation from token ids at construction time, so any tokenizer works. The cheap one-hop regime
# keeps the episode short; `special_tokens.pad` maps stepjax's pad role to Qwen's `<|endoftext|>`.

# %%
config = presets.with_regime(steppo.get_config(), "one_hop")
config.tokenizer = os.path.join(MODEL_DIR, "tokenizer.json")
config.model.checkpoint = MODEL_DIR
config.special_tokens.pad = "<|endoftext|>"
setup = runner.build(config)
tokenizer, env, env_params = setup.tokenizer, setup.env, setup.env_params
model_config, params = setup.model_config, setup.checkpoint_params
model = Transformer(model_config)
print(model_config)
print("end of step:", tokenizer.id_to_token(tokenizer.end_of_step_id), "| pad:", tokenizer.id_to_token(tokenizer.pad_id))

# %% [markdown]
# ## 3. One multi-turn episode, step by step, with cache extension
#
# The same pieces `rollout.make_rollout` scans over (`stepjax/rollout.py`): `begin` prefills the first observation
# into a fresh KV cache; each step `act` decodes an action with the cache (here: replays the scripted expert's
# action through the same cache, scored by the model, since a random model's own actions are gibberish), the
# environment steps, and `observe` appends the observation to the row **and** extends the cache with it
# (`sampling.extend`). The cache is never rebuilt: the context grows by exactly the step's and the observation's
# tokens.

# %%
rollout_config = dataclasses.replace(setup.rollout_config, num_tasks=1, episodes_per_task=1)
obs_width = env.max_obs_len
reset = jax.jit(jax.vmap(env.reset, in_axes=(0, None)))
env_step = jax.jit(jax.vmap(env.step, in_axes=(0, 0, 0, 0, None)))
expert = jax.jit(jax.vmap(env.expert_action, in_axes=(0, 0, None)))
act = jax.jit(lambda params, rs, key, forced: rollout.act(model, params, rs, key, rollout_config, obs_width, forced))
observe = jax.jit(lambda params, rs, *step: rollout.observe(model, params, rs, *step))

keys, groups = rollout.task_keys_and_groups(jax.random.key(3), rollout_config)
env_state, obs, obs_len = reset(keys, env_params)
rs = rollout.begin(model, params, obs, obs_len, groups, rollout_config)
print(f"prompt ({int(obs_len[0])} tokens, prefilled):\n{tokenizer.decode(np.asarray(obs[0, :obs_len[0]]))}")
key = jax.random.key(4)
for t in range(rollout_config.max_steps):
  key, act_key, env_key, expert_key = jax.random.split(key, 4)
  expert_tokens, expert_len = expert(expert_key[None], env_state, env_params)
  forced = (jnp.pad(expert_tokens, ((0, 0), (0, rollout_config.max_action_len - expert_tokens.shape[1]))), expert_len)
  rs, action, action_len, active = act(params, rs, act_key, forced)
  if not bool(active[0]):
    break
  env_state = env_state.replace(done=env_state.done | ~active)
  env_state, obs, obs_len, reward, terminated, truncated, info = env_step(
      env_key[None], env_state, action[:, :rollout.env_action_width(env, rollout_config)], action_len, env_params)
  rs = observe(params, rs, obs, obs_len, reward, terminated, truncated)
  ids = np.asarray(action[0, :action_len[0]])
  logprobs = np.asarray(rs.batch.logprobs[0, rs.batch.step_start[0, t]:][:len(ids)])
  print(f"\n--- step {t}: {len(ids)} action tokens, then {int(obs_len[0])} observation tokens; "
        f"context now {int(rs.batch.seq_len[0])} tokens (cache filled to the same) ---")
  print("  action tokens:", [(tokenizer.id_to_token(int(i)), round(float(lp), 2)) for i, lp in zip(ids, logprobs)])
  print(f"  observation: {tokenizer.decode(np.asarray(obs[0, :obs_len[0]]))!r}  reward {float(reward[0])}")
  if bool(terminated[0] | truncated[0]):
    break
batch = rollout.finish(rs).validate()
print("\nthe episode as one packed EpisodeBatch row: step_start", np.asarray(batch.step_start[0]).tolist(),
      "step_len", np.asarray(batch.step_len[0]).tolist(), "rewards", np.asarray(batch.step_rewards[0]).tolist())

# %% [markdown]
# The checkpoint's model can of course also act itself: `rollout.rollout(..., actor="model")` samples every
# action with the same cache (a random model's actions are invalid commands, so the episode is cut by its step
# budget).

# %%
sampled, sampled_info = rollout.rollout(params, env, env_params, jax.random.key(5), rollout_config, model)
row = np.asarray(sampled.tokens[0, :sampled.seq_len[0]])
for t in np.flatnonzero(np.asarray(sampled.step_mask[0])):
  begin, length = int(sampled.step_start[0, t]), int(sampled.step_len[0, t])
  print(f"step {t}: {tokenizer.decode(row[begin:begin + length])!r}")

# %% [markdown]
# ## 4. Export to Hugging Face format and compare logits with transformers
#
# `save_hf_checkpoint` writes `config.json` + `model.safetensors` (the architecture follows the config: Qwen2 here,
# since the model has q/k/v biases); copy the tokenizer next to it and `transformers` loads the directory as is.
# `experiments/export_hf.py` does the same for a trained run's checkpoint.

# %%
EXPORT_DIR = os.path.join(WORK, "export")
save_hf_checkpoint(model_config, params, EXPORT_DIR)
with open(os.path.join(MODEL_DIR, "tokenizer.json"), "rb") as src, open(os.path.join(EXPORT_DIR, "tokenizer.json"),
                                                                         "wb") as dst:
  dst.write(src.read())
print(sorted(os.listdir(EXPORT_DIR)))

reloaded = transformers.AutoModelForCausalLM.from_pretrained(EXPORT_DIR, torch_dtype=torch.float32).eval()
tokens = np.asarray(batch.tokens[:1, :batch.seq_len[0]])
with torch.no_grad():
  theirs = reloaded(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
ours = np.asarray(forward(model_config, params, jnp.asarray(tokens))[0])
difference = np.abs(ours - theirs).max(axis=-1)[0]
print(f"{type(reloaded).__name__}: max |logit difference| over the episode's {tokens.shape[1]} tokens = "
      f"{difference.max():.2e}")
assert difference.max() < 1e-3, difference.max()

fig, axes = plt.subplots(1, 2, figsize=(13, 4))
axes[0].scatter(theirs[0].ravel()[::7], ours[0].ravel()[::7], s=2)
axes[0].set(title="every 7th logit of the episode", xlabel="transformers (reloaded export)", ylabel="stepjax")
axes[1].semilogy(np.maximum(difference, 1e-12))
for t in np.flatnonzero(np.asarray(batch.step_mask[0])):
  axes[1].axvspan(int(batch.step_start[0, t]) - 0.5, int(batch.step_start[0, t] + batch.step_len[0, t]) - 0.5,
                  color="0.85", zorder=0)
axes[1].set(title="max |difference| per position (grey: action tokens)", xlabel="token position")
fig.tight_layout()
plt.show()
print(f"notebook body: {time.perf_counter() - start_time:.1f} s")
