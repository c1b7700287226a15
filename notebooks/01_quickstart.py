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
# # stepjax quickstart: the step is the action
#
# An LLM agent acts in **steps**: it reads an observation, writes one whole response (a think span and a command),
# the environment answers, and so on; the reward comes at the end. This notebook builds an `EpisodeBatch` in the
# default environment (`lookup_qa`, 2-hop questions in the think format), decodes one episode, and computes
# step-level and token-level advantages on the same batch to show what "the step is the action" means.
#
# **Runtime.** 18 s and 0.85 GB of RAM at most (peak RSS) on the project's 2-core CPU machine, most of it XLA
# compiling the rollout once; a free Colab CPU runtime also has 2 cores (not measured there). Nothing here needs an
# accelerator: on a GPU/TPU runtime JAX uses it as is (install `jax[cuda12]` there, or keep Colab's TPU jax) and
# nothing else changes.
#
# **Size.** `STEPJAX_NOTEBOOK_SIZE=ci` (what the tests run) uses fewer episodes; the default is already small.

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
# ## The environment, its tokenizer and a tiny policy
#
# `experiments.runner.build` turns a config into stepjax objects. The StepPO config's defaults are the project's
# default task: `lookup_qa` with 2-hop questions, a word-level tokenizer and `<think>` spans. We keep its
# environment and tokenizer and swap in a tiny random transformer as the policy.

# %%
import dataclasses
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from experiments import runner
from experiments.configs import steppo
from stepjax import credit, rollout
from stepjax.models import Transformer
from stepjax.models.transformer import init_params

start_time = time.perf_counter()
setup = runner.build(steppo.get_config())
tokenizer, env, env_params = setup.tokenizer, setup.env, setup.env_params
model_config = setup.model_config.replace(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                                          num_kv_heads=1, head_dim=16)
model = Transformer(model_config)
params = init_params(model_config, jax.random.key(0))
print(f"environment: {env.name}, {setup.config.env.hops} hops, step format {setup.config.env.step_format!r}; "
      f"vocabulary: {tokenizer.vocab_size} tokens")
print(f"policy: {sum(x.size for x in jax.tree.leaves(params)):,} parameters")

# %% [markdown]
# ## An `EpisodeBatch` from the scripted expert and from the policy
#
# `rollout.rollout` runs the whole episode loop in one jitted `lax.scan` over steps. With `actor="expert"` the
# environment's scripted expert writes the actions (they are still scored by the policy, which is how SFT warm
# starts use it); with `actor="model"` the policy samples them. Both give a packed `EpisodeBatch`: one row per
# episode, the prompt then each step's action tokens followed by the observation, plus per-step boundaries
# (`step_start`, `step_len`) and rewards.

# %%
tasks = 2 if SIZE == "ci" else 4
rollout_config = dataclasses.replace(setup.rollout_config, num_tasks=tasks, episodes_per_task=2)
expert_batch, expert_info = rollout.rollout(params, env, env_params, jax.random.key(1), rollout_config, model,
                                            actor="expert")
policy_batch, policy_info = rollout.rollout(params, env, env_params, jax.random.key(1), rollout_config, model,
                                            actor="model")
# One batch: the expert's episodes first, then the policy's (the same tasks: both used the same key).
batch = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), expert_batch, policy_batch).validate()
success = np.concatenate([expert_info.success, policy_info.success])
print("tokens", batch.tokens.shape, "| step slots", batch.step_start.shape)
print("expert success:", np.asarray(expert_info.success).tolist())
print("policy success:", np.asarray(policy_info.success).tolist())
print("tokens per step (rows: episodes; 0 = no step):\n", np.asarray(batch.step_len))

# %% [markdown]
# ## One episode as text
#
# Observation tokens (written by the environment) and action tokens (written by the agent) share one row. Below,
# each step's action is shown between `[step k: ...]`.


# %%
def show_episode(batch, row):
  tokens = np.asarray(batch.tokens[row, :batch.seq_len[row]])
  starts, lengths = np.asarray(batch.step_start[row]), np.asarray(batch.step_len[row])
  pieces, position = [], 0
  for k in np.flatnonzero(np.asarray(batch.step_mask[row])):
    pieces.append(tokenizer.decode(tokens[position:starts[k]]))
    pieces.append(f"[step {k}: {tokenizer.decode(tokens[starts[k]:starts[k] + lengths[k]])}]")
    position = starts[k] + lengths[k]
  pieces.append(tokenizer.decode(tokens[position:]))
  print("".join(pieces))
  print(f"-> rewards per step {np.asarray(batch.step_rewards[row])[np.asarray(batch.step_mask[row])].tolist()}")


print("=== the scripted expert ===")
show_episode(batch, 0)
print("\n=== the random policy (same task) ===")
show_episode(batch, expert_batch.batch_size)

# %% [markdown]
# ## Step-level vs token-level advantages on the same batch
#
# Both estimators get the same critic: a constant value of 0.5 at every position (a stand-in for a learned one, so
# the numbers are easy to follow), gamma = 1 and lambda = 0.95. An episode cut off by the step or context budget
# (the random policy's) counts as ended with reward 0 (`truncation_as_terminal=True`, as the lookup_qa configs do)
# instead of bootstrapping from the critic.
#
# * `step_gae` (StepPO) reads the critic once per step, at the position just before the step starts, runs GAE over
#   **steps**, and gives every token of a step the same advantage: the step is one action.
# * `token_gae` (token-level PPO) runs GAE over **action tokens**: the reward sits on the last token, and lambda
#   decays it token by token, so the first tokens of a long step (its think span) get much less credit than its
#   command, although the whole step was one decision.
#
# Whitening is off here so the two are on the same scale (training whitens them).

# %%
position_values = jnp.full(batch.tokens.shape, 0.5)
step_credit = credit.compute_advantages(
    credit.CreditConfig(estimator="step_gae", gamma=1.0, lam=0.95, whiten=None,
                        truncation_as_terminal=True), batch, position_values)
token_credit = credit.compute_advantages(
    credit.CreditConfig(estimator="token_gae", gamma=1.0, lam=0.95, whiten=None,
                        truncation_as_terminal=True), batch, position_values)
np.set_printoptions(precision=3, suppress=True)
print("per-step advantages, step_gae (expert episode, policy episode):\n",
      np.asarray(step_credit.step_advantages)[[0, expert_batch.batch_size]])
print("mean per-step advantages, token_gae (the mean of each step's tokens):\n",
      np.asarray(token_credit.step_advantages)[[0, expert_batch.batch_size]])


# %%
def plot_advantages(row, ax, title):
  n = int(batch.seq_len[row])
  positions = np.arange(n)
  action = np.asarray(batch.action_mask[row, :n])
  step_adv = np.asarray(step_credit.token_advantages[row, :n])
  token_adv = np.asarray(token_credit.token_advantages[row, :n])
  ax.bar(positions[action] - 0.2, step_adv[action], width=0.4, label="step_gae (StepPO)", color="tab:blue")
  ax.bar(positions[action] + 0.2, token_adv[action], width=0.4, label="token_gae (token PPO)", color="tab:orange")
  for k in np.flatnonzero(np.asarray(batch.step_mask[row])):
    begin, length = int(batch.step_start[row, k]), int(batch.step_len[row, k])
    ax.axvspan(begin - 0.5, begin + length - 0.5, color="0.9", zorder=0)
    ax.axvline(begin - 0.5, color="k", lw=0.8, ls="--")
    ax.text(begin, 0.98, f"step {k}", transform=ax.get_xaxis_transform(),
            va="top", fontsize=8)
  ax.axhline(0, color="k", lw=0.5)
  ax.set_title(title)
  ax.set_xlabel("token position (grey: the agent's action tokens; white: observations)")
  ax.set_ylabel("advantage")


fig, axes = plt.subplots(2, 1, figsize=(12, 7))
plot_advantages(0, axes[0], "scripted expert episode (reward 1)")
plot_advantages(expert_batch.batch_size, axes[1], "random policy episode, same task")
fig.tight_layout(rect=(0, 0, 1, 0.95))
fig.legend(*axes[0].get_legend_handles_labels(), loc="upper center", ncol=2)
plt.show()

# %% [markdown]
# **Reading the plot.** Dashed lines mark where each step begins. StepPO's advantage (blue) is flat inside a
# step: one number per decision. Token-level GAE (orange) ramps up inside every step of the successful episode,
# and its think tokens get a fraction of the credit its command gets, even though the command only follows from
# the thought. The failed episode (three invalid actions, cut off by the budget) gets negative advantages under
# both, shaped the same way: token-level GAE blames its last tokens most.
#
# Next: `02_train_stepppo` trains a policy with StepPO; `03_ablation_analysis` compares methods.

# %%
print(f"notebook body: {time.perf_counter() - start_time:.1f} s")
