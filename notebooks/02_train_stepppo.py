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
# # Train with StepPO: SFT warm start, 2 seeds vmapped, held-out curves, resume
#
# `experiments.runner.run(config, workdir)` is what `experiments/train.py` runs: a behaviour-cloning (SFT) warm
# start on the scripted expert's episodes, then RL iterations (rollout + update) for every seed in **one** program
# (`jax.vmap` over seeds), held-out evaluation every few iterations, JSONL logs, TensorBoard files and orbax
# checkpoints. Here: StepPO on the default task (`lookup_qa`, 2-hop questions, think format).
#
# **Runtime.** The default size (a 2-layer 64-wide model, 200 SFT steps, 8 RL iterations of 16 episodes, 2 seeds) took
# 80 s and 1.9 GB of RAM at most (peak RSS) on the project's 2-core CPU machine, shared with a test run (most of it
# compiling); a free Colab CPU runtime also has 2 cores and 12 GB (not measured there). `STEPJAX_NOTEBOOK_SIZE=ci`
# shrinks everything to a smoke test. **GPU/TPU:** nothing to change but the jax install (`jax[cuda12]`); for a real
# run set `model.dtype="bfloat16"`, raise `sft.steps` (the default config's 300 steps or more), `train.iterations` and
# `train.eval_episodes` (256), and use 3+ seeds.
#
# **Read the numbers honestly.** At this size the 2-hop think task is barely learnt: the warm start is short and
# 8 iterations are far too few for RL to move held-out success. The notebook shows the machinery; `make demo` and
# `experiments/ablation.py` are the real runs.

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
# ## The config
#
# Every field is in `experiments/configs/base.py`; `steppo.py` picks the method (step GAE, the GSPO step ratio, a
# separate step critic). `runner.build` checks every field before anything compiles.

# %%
import json
import shutil
import time

import matplotlib.pyplot as plt
import numpy as np

from experiments import runner
from experiments.configs import steppo

WORKDIR = os.path.abspath("runs/notebook_steppo")  # logs and checkpoints (removed first: a fresh run)
shutil.rmtree(WORKDIR, ignore_errors=True)


def make_config(iterations):
  c = steppo.get_config()  # the default task: lookup_qa, 2 hops, think format
  if SIZE == "ci":
    c.model.update(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16)
    c.rollout.update(num_tasks=2, episodes_per_task=2)
    c.sft.update(steps=4, num_tasks=4)
    c.train.update(eval_episodes=4)
  else:
    c.model.update(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
    c.rollout.update(num_tasks=8, episodes_per_task=2)
    c.sft.update(steps=200, num_tasks=16)
    c.train.update(eval_episodes=64)
  c.algo.minibatches = 2
  c.train.update(iterations=iterations, eval_every=2, seeds=2)  # seeds 0 and 1, vmapped
  c.log.update(progress=True, tensorboard=True)  # a live progress bar; TensorBoard files under WORKDIR/tb
  return c


TOTAL_ITERATIONS = 4 if SIZE == "ci" else 8
setup = runner.build(make_config(TOTAL_ITERATIONS // 2))
print(setup.model_config)
print(setup.rollout_config)

# %% [markdown]
# ## SFT warm start, then the first half of the RL iterations
#
# The progress bars are live: SFT's NLL and token accuracy, then per RL chunk the training success, return,
# approximate KL, clip fraction, the last held-out success and the throughput.

# %%
start = time.perf_counter()
first = runner.run(setup.config, WORKDIR, setup=setup)
print(f"first half: {time.perf_counter() - start:.0f} s")
print(sorted(os.listdir(WORKDIR)), "checkpoints:", sorted(os.listdir(os.path.join(WORKDIR, "checkpoints"))))

# %% [markdown]
# ## Resume from the checkpoint
#
# Same config with more iterations and `resume=True`: the runner restores the latest complete checkpoint (the
# warm start and every random key live in the state), cuts the logs back to it and continues. It gives the same
# numbers as one straight run (`tests/test_experiments.py::test_resume_is_bit_identical` checks this).

# %%
start = time.perf_counter()
resumed = runner.run(make_config(TOTAL_ITERATIONS), WORKDIR, resume=True)
print(f"second half (resumed): {time.perf_counter() - start:.0f} s")


# %% [markdown]
# ## Curves from the run's logs
#
# `sft.jsonl` (one line per SFT step), `metrics.jsonl` (one line per iteration and seed) and `eval.jsonl` (one
# line per evaluation and seed) are all a plot needs.

# %%
def read_jsonl(name):
  with open(os.path.join(WORKDIR, name)) as f:
    return [json.loads(line) for line in f]


sft, metrics, evaluations = read_jsonl("sft.jsonl"), read_jsonl("metrics.jsonl"), read_jsonl("eval.jsonl")
seeds = sorted({line["seed"] for line in evaluations})
fig, axes = plt.subplots(1, 3, figsize=(15, 4))
axes[0].plot([line["step"] for line in sft], [line["nll"] for line in sft])
axes[0].set(title="SFT warm start", xlabel="SFT step", ylabel="NLL of the expert's tokens", yscale="log")
for seed in seeds:
  lines = [line for line in evaluations if line["seed"] == seed]
  x = [line["env_steps"] for line in lines]
  axes[1].plot(x, [line["success"] for line in lines], "o-", label=f"seed {seed}, greedy")
  axes[1].plot(x, [line["success_sampled"] for line in lines], "s--", label=f"seed {seed}, sampled")
  train_lines = [line for line in metrics if line["seed"] == seed]
  axes[2].plot([line["iteration"] for line in train_lines], [line["success_rate"] for line in train_lines], "o-",
               label=f"seed {seed}")
axes[1].set(title="held-out success (iteration 0 = SFT start)", xlabel="environment steps", ylabel="success",
            ylim=(-0.05, 1.05))
resumed_at = next(line["env_steps"] for line in evaluations if line["iteration"] == TOTAL_ITERATIONS // 2)
axes[1].axvline(resumed_at, color="0.6", ls=":", label="resumed here (seed 0)")
axes[1].legend(fontsize=8)
axes[2].set(title="training success (sampled)", xlabel="RL iteration", ylabel="success", ylim=(-0.05, 1.05))
axes[2].legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# The summary table `runner.run` returns (also printed above at the end of each run) is what the ablation
# aggregates across methods: see `03_ablation_analysis`.

# %%
print(resumed["table"])
