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
# # Reading an ablation: paired differences, curves with CIs, training diagnostics
#
# `experiments/ablation.py --name=NAME ...` writes `runs/NAME/`: `records.json` (every run's held-out success
# curve), `results.csv`, `paired.csv`, `results.md`, and one folder per method with that method's `metrics.jsonl`
# (one line per iteration and seed) and `eval.jsonl`. This notebook reads them with `experiments.report`.
#
# **Which study.** Set `STEPJAX_STUDY` to a study folder (e.g. `runs/demo` after `make demo`). Without it the
# notebook reads `notebooks/data/demo/`: a copy of the files `make demo` wrote on the project's 2-core CPU machine
# (StepPO with the GSPO and the exact step ratio, token-level PPO at lambda 1 and 0.95, and GRPO, 5 seeds each, on
# 2-hop lookup_qa in the think format with an expert that stops early; the table in the README). That copy is what
# the committed outputs show.
#
# **Runtime.** About 1 s and 85 MB of RAM (peak RSS) on the project's 2-core CPU machine; there is nothing to
# accelerate.
# `STEPJAX_NOTEBOOK_SIZE=ci` changes nothing here (the files are small).

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

# %%
import json

import matplotlib.pyplot as plt
import numpy as np

from experiments import report

STUDY = os.environ.get("STEPJAX_STUDY") or os.path.join(ROOT, "notebooks", "data", "demo")
with open(os.path.join(STUDY, "records.json")) as f:
  records = json.load(f)
methods = list(dict.fromkeys(record["method"] for record in records))
print("study:", STUDY)
print("methods:", methods, "| runs:", len(records))

# %% [markdown]
# ## The summary table
#
# Final held-out success (greedy and sampled) and the normalized area under the greedy curve, mean ± the half-width
# of a 95% Student-t CI over seeds. `results.csv` holds the same rows; here they are recomputed from the records.

# %%
rows = report.summarize(records)
print(report.format_table(rows))

# %% [markdown]
# ## Paired differences against a baseline
#
# Every method starts from the same SFT warm start per seed and is evaluated on the same held-out tasks, so seed
# `k` of one method and seed `k` of another are a pair. The paired difference (method − baseline, per seed) has a
# much tighter CI than the difference of two unpaired means. A CI that excludes 0 is marked.

# %%
BASELINE = "steppo" if "steppo" in methods else methods[0]
paired = report.paired_differences(records, baseline=BASELINE)
print(report.format_paired_table(paired, BASELINE))

metrics_shown = [("final_success", "Δ final success (greedy)"), ("final_success_sampled", "Δ final success (sampled)"),
                 ("auc", "Δ AUC (greedy)"), ("rl_gain", "Δ RL gain (greedy)")]
others = [row for row in paired if row["method"] != BASELINE]
fig, axes = plt.subplots(1, len(metrics_shown), figsize=(16, 0.6 + 0.6 * max(len(others), 1)), sharey=True)
for ax, (metric, label) in zip(axes, metrics_shown):
  for i, row in enumerate(others):
    mean, ci = row[f"{metric}_diff_mean"], row[f"{metric}_diff_ci95"]
    color = "tab:red" if row[f"{metric}_diff_excludes_zero"] else "tab:blue"
    ax.errorbar(mean, i, xerr=ci, fmt="o", color=color, capsize=4)
  ax.axvline(0, color="k", lw=0.8)
  ax.set_title(label, fontsize=10)
  ax.set_yticks(range(len(others)), [f"{row['method']} − {BASELINE}" for row in others])
fig.suptitle(f"paired over seeds, 95% CI (red: excludes 0)", y=1.02)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Held-out success curves with CI bands
#
# Mean over seeds at each evaluation, with the 95% CI of the mean as a band. Seeds take slightly different numbers
# of environment steps, so the x axis is the mean over seeds.

# %%
fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
for key, ax in zip(("success", "success_sampled"), axes):
  for method in methods:
    runs = [record for record in records if record["method"] == method]
    x = np.mean([run["env_steps"] for run in runs], axis=0)
    curves = np.array([run[key] for run in runs])
    stats = np.array([report.mean_ci(curves[:, j]) for j in range(curves.shape[1])])
    mean, ci = stats[:, 0], np.nan_to_num(stats[:, 1])
    line, = ax.plot(x, mean, "o-", label=f"{method} ({len(runs)} seeds)")
    ax.fill_between(x, mean - ci, mean + ci, color=line.get_color(), alpha=0.2)
  ax.set(title=f"held-out {'greedy' if key == 'success' else 'sampled'} success", xlabel="environment steps")
axes[0].set_ylabel("success (mean ± 95% CI)")
axes[0].legend()
fig.tight_layout()
plt.show()


# %% [markdown]
# ## Training diagnostics from metrics.jsonl
#
# `report.diagnostics_table` averages each seed's last third of iterations, then the seeds. Below it, the same
# metrics over training: the critic's explained variance (per step for a step critic, per token for a token
# critic; methods without a critic have none) and the advantages' statistics per step index.

# %%
def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


metrics = {method: read_jsonl(os.path.join(STUDY, method, "metrics.jsonl")) for method in methods
           if os.path.isfile(os.path.join(STUDY, method, "metrics.jsonl"))}
print(report.diagnostics_table(metrics))


def per_iteration(lines, name):
  """-> iterations, mean over seeds, 95% CI over seeds (nan where a seed lacks the metric)."""
  iterations = sorted({line["iteration"] for line in lines})
  stats = []
  for it in iterations:
    values = [line[name] for line in lines if line["iteration"] == it and np.isfinite(line.get(name, np.nan))]
    stats.append(report.mean_ci(values) if values else (np.nan, np.nan))
  stats = np.array(stats)
  return np.array(iterations), stats[:, 0], np.nan_to_num(stats[:, 1])


fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
for method, lines in metrics.items():
  for name, style in (("critic_ev_steps", "-"), ("critic_ev_tokens", ":")):
    if any(name in line for line in lines):
      x, mean, ci = per_iteration(lines, name)
      if np.isfinite(mean).any():
        line, = axes[0].plot(x, mean, style, label=f"{method}: {name.split('_')[-1]}")
        axes[0].fill_between(x, mean - ci, mean + ci, color=line.get_color(), alpha=0.15)
  x, mean, ci = per_iteration(lines, "success_rate")
  line, = axes[1].plot(x, mean, label=method)
  axes[1].fill_between(x, mean - ci, mean + ci, color=line.get_color(), alpha=0.2)
axes[0].set(title="critic explained variance", xlabel="RL iteration", ylim=(-1.5, 1.05))
axes[0].axhline(0, color="k", lw=0.5)
axes[0].legend(fontsize=8)
axes[1].set(title="training success (sampled episodes)", xlabel="RL iteration", ylabel="success",
            ylim=(0, 1))
axes[1].legend(fontsize=8)

# Advantage std per step index (averaged over iterations and seeds): how much credit signal each step gets. (Their
# means are ~0: training whitens the advantages.)
step_slots = sorted({int(k[len("adv_step"):-len("_std")]) for lines in metrics.values() for k in lines[0]
                     if k.startswith("adv_step") and k.endswith("_std")})
width = 0.8 / max(len(metrics), 1)
for i, (method, lines) in enumerate(metrics.items()):
  stds = [np.mean([line[f"adv_step{k}_std"] for line in lines]) for k in step_slots]
  axes[2].bar(np.array(step_slots) + (i - (len(metrics) - 1) / 2) * width, stds, width, label=method)
axes[2].set(title="advantage std by step index", xlabel="step index", xticks=step_slots)
axes[2].axhline(0, color="k", lw=0.5)
axes[2].legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# **Reading it (the shipped demo study).** Every method lifts held-out greedy success from the SFT start's 0.000
# (it stops after the first fact) to 0.50-0.60, and the paired differences against StepPO in final greedy success
# all span 0; the curves show that StepPO and token PPO at lambda 0.95 got there more slowly. The critic's explained
# variance tells whether a critic method's baseline is informative (here: not yet, about 0 everywhere); the
# advantage-by-step panel shows how much signal each estimator gives each step. Step 0 is the first search, step 1
# holds the decision (follow the chain or answer), step 2 the answer; token-level lambda 0.95 gives the first two the
# least.
