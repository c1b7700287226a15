"""Host-side reporting of an ablation: 95% confidence intervals over seeds, a results table and a curve plot.

A run record (one method, one seed) is a plain dict:

  {"method": str, "seed": int, "env_steps": [int, ...], "success": [float, ...], "success_sampled": [float, ...]}

`env_steps` are the cumulative environment (agent) steps at each held-out evaluation — the first may be at 0, the
SFT start — and `success` / `success_sampled` the greedy / sampled held-out success rates there (same lengths).

* `summarize(records)` gives one row per method (first-appearance order): the final greedy and sampled success,
  the normalized area under the greedy success curve (`area_under_curve`) and the start success, as means over
  seeds with the half-width of their 95% Student-t confidence interval (`mean_ci`).
* `paired_differences(records, baseline)` compares every method with `baseline` seed by seed: runs with the same seed
  number share the SFT start and the held-out tasks, so method - baseline is taken per shared seed and its mean gets
  the 95% CI (PAIRED_KEYS). Each row also has the method's own RL gain (final minus start greedy success, per seed).
  `format_paired_table(rows, baseline)` is the markdown table of those rows with its legend.
* `write_results(out_dir, records, title=..., baseline=None)` writes results.csv, results.md, curves.png (mean
  greedy success per method with a 95% CI band over seeds) and records.json; with a baseline also paired.csv (one
  row of PAIRED_KEYS per method) and the paired table in results.md after the main one. `format_table(rows)` is the
  main markdown table alone.

A CI over a single seed (or a single shared seed) is nan: the tables then give the mean alone, and the paired table
says "(no CI)" in that cell.

No JAX and no scipy: `t_critical_95` inverts the Student-t CDF, written as a regularized incomplete beta function.
Bad input raises one ValueError line naming the argument.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import numbers
import os
from typing import Any

import numpy as np

RECORD_KEYS = ("method", "seed", "env_steps", "success", "success_sampled")
SUMMARY_KEYS = ("method", "seeds", "final_success_mean", "final_success_ci95", "final_success_sampled_mean",
                "final_success_sampled_ci95", "auc_mean", "auc_ci95", "start_success_mean")
TABLE_HEADER = ("method", "seeds", "held-out success (greedy)", "held-out success (sampled)", "AUC (greedy)",
                "SFT start")
TABLE_LEGEND = ("± is the half-width of the 95% Student-t confidence interval of the mean over seeds. AUC is the "
                "normalized area under the held-out greedy success curve over environment steps (trapezoid "
                "integral divided by the step range, so a constant curve c has AUC c).")

# The per-seed quantities that paired_differences compares: final greedy / sampled success, the greedy AUC and the RL
# gain (final minus start greedy success).
PAIRED_METRICS = ("final_success", "final_success_sampled", "auc", "rl_gain")
_METRIC_LABELS = {"final_success": "final greedy success", "final_success_sampled": "final sampled success",
                  "auc": "AUC (greedy)", "rl_gain": "RL gain over the SFT start"}
PAIRED_KEYS = ("method", "baseline", "seeds", "paired_seeds",
               *(f"{m}_diff_{stat}" for m in PAIRED_METRICS for stat in ("mean", "ci95", "excludes_zero")),
               "rl_gain_mean", "rl_gain_ci95", "rl_gain_excludes_zero", "rl_gain_sampled_mean",
               "rl_gain_sampled_ci95", "rl_gain_sampled_excludes_zero", "best", "best_by")
PAIRED_HEADER = ("method", "seeds", "paired seeds", "Δ final success (greedy)", "Δ final success (sampled)",
                 "Δ AUC (greedy)", "RL gain over SFT start (greedy)", "RL gain over SFT start (sampled)")

# Phi^-1(0.975): the limit of t_critical_95(df) as df -> infinity.
_Z975 = 1.959963984540054
# The incomplete beta loses digits as df grows (lgamma(df / 2) grows like df log df; ~1e-10 off at df = 1e6), while
# the Cornish-Fisher expansion of the t quantile in 1 / df, truncated after 1 / df**3, is off by < 1e-19 above 1e5.
_LARGE_DF = 10**5


# ------------------------------------------------------------------------------------------------------
# Student-t critical value.
# ------------------------------------------------------------------------------------------------------


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
  """Continued fraction of I_x(a, b) by the modified Lentz method (Numerical Recipes' betacf)."""
  tiny = 1e-300

  def nonzero(v):
    return v if abs(v) > tiny else tiny

  c = 1.0
  d = 1.0 / nonzero(1.0 - (a + b) * x / (a + 1.0))
  h = d
  # Converges in O(sqrt(max(a, b))) terms when x < (a + 1) / (a + b + 2), which the caller guarantees.
  for m in range(1, 100_000):
    even = m * (b - m) * x / ((a + 2 * m - 1.0) * (a + 2 * m))
    odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1.0))
    for numerator in (even, odd):
      d = 1.0 / nonzero(1.0 + numerator * d)
      c = nonzero(1.0 + numerator / c)
      h *= d * c
    if abs(d * c - 1.0) < 1e-15:
      return h
  raise RuntimeError(f"incomplete beta continued fraction did not converge for a={a}, b={b}, x={x}")


def _regularized_incomplete_beta(a: float, b: float, x: float, y: float) -> float:
  """I_x(a, b); y = 1 - x is passed separately so that an x close to 1 keeps its digits."""
  if x <= 0.0:
    return 0.0
  if y <= 0.0:
    return 1.0
  log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(y)
  if x < (a + 1.0) / (a + b + 2.0):
    return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
  return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, y) / b


def _t_two_sided_tail(t: float, df: int) -> float:
  """P(|T| > t) for T ~ Student-t(df) and t >= 0, which is I_{df / (df + t^2)}(df / 2, 1 / 2)."""
  return _regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t), t * t / (df + t * t))


@functools.lru_cache(maxsize=None)
def _t_critical_95(df: int) -> float:
  if df > _LARGE_DF:
    z = _Z975  # Abramowitz & Stegun 26.7.5
    g1 = (z**3 + z) / 4.0
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96.0
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384.0
    return z + g1 / df + g2 / df**2 + g3 / df**3
  # The tail decreases in t from 1 at t = 0: bracket the 0.05 crossing, then bisect to the last float.
  lo, hi = 0.0, 2.0
  while _t_two_sided_tail(hi, df) > 0.05:
    lo, hi = hi, 2.0 * hi
  while True:
    mid = 0.5 * (lo + hi)
    if mid in (lo, hi):
      return mid
    if _t_two_sided_tail(mid, df) > 0.05:
      lo = mid
    else:
      hi = mid


def t_critical_95(df: int) -> float:
  """The two-sided 95% Student-t critical value for `df` >= 1 degrees of freedom (1.95996... as df -> inf)."""
  if isinstance(df, bool) or not isinstance(df, numbers.Integral) or df < 1:
    raise ValueError(f"df: must be an int >= 1, got {df!r}")
  return _t_critical_95(int(df))


# ------------------------------------------------------------------------------------------------------
# Statistics over seeds.
# ------------------------------------------------------------------------------------------------------


def _as_1d(x: Any, arg: str) -> np.ndarray:
  """A non-empty, finite, 1-D float64 array, or one ValueError line naming `arg`."""
  try:
    a = np.asarray(x, dtype=np.float64)
  except (TypeError, ValueError):
    raise ValueError(f"{arg}: expected a 1-D sequence of numbers, got {type(x).__name__}") from None
  if a.ndim != 1:
    raise ValueError(f"{arg}: expected a 1-D sequence, got shape {a.shape}")
  if a.size == 0:
    raise ValueError(f"{arg}: must be non-empty")
  bad = np.flatnonzero(~np.isfinite(a))
  if bad.size:
    raise ValueError(f"{arg}: must be finite, got {a[bad[0]]} at index {bad[0]}")
  return a


def mean_ci(values) -> tuple[float, float]:
  """Mean and 95% CI half-width of the mean, t_critical_95(n - 1) * std(ddof=1) / sqrt(n); nan when n == 1."""
  v = _as_1d(values, "values")
  if v.size == 1:
    return float(v[0]), float("nan")
  return float(v.mean()), t_critical_95(v.size - 1) * float(v.std(ddof=1)) / math.sqrt(v.size)


def area_under_curve(x, y) -> float:
  """Trapezoid integral of y over x divided by x[-1] - x[0] (a constant curve c gives c); one point gives y[0]."""
  xs, ys = _as_1d(x, "x"), _as_1d(y, "y")
  if ys.size != xs.size:
    raise ValueError(f"y: expected {xs.size} values (the length of x), got {ys.size}")
  steps = np.diff(xs)
  if np.any(steps <= 0):
    i = int(np.flatnonzero(steps <= 0)[0])
    raise ValueError(f"x: must be strictly increasing, got x[{i}]={xs[i]:g} then x[{i + 1}]={xs[i + 1]:g}")
  if xs.size == 1:
    return float(ys[0])
  return float(np.trapezoid(ys, xs) / (xs[-1] - xs[0]))


def _as_record_list(records) -> list:
  if isinstance(records, (str, bytes, dict)) or not hasattr(records, "__iter__"):
    raise ValueError(f"records: expected a list of run dicts, got {type(records).__name__}")
  records = list(records)
  if not records:
    raise ValueError("records: must be non-empty")
  return records


def _group_runs(records: list) -> dict[str, dict[str, Any]]:
  """Checks the records and groups them by method (first-appearance order).

  Each group holds "seeds" (list), "env_steps", "success" and "success_sampled" ([seeds, evals] arrays).
  """
  groups: dict[str, dict[str, Any]] = {}
  for i, record in enumerate(records):
    arg = f"records[{i}]"
    if not isinstance(record, dict):
      raise ValueError(f"{arg}: expected a dict, got {type(record).__name__}")
    missing = [k for k in RECORD_KEYS if k not in record]
    if missing:
      raise ValueError(f"{arg}: missing keys {missing}; a record has {list(RECORD_KEYS)}")
    method, seed = record["method"], record["seed"]
    if not isinstance(method, str):
      raise ValueError(f"{arg}.method: expected a str, got {method!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
      raise ValueError(f"{arg}.seed: expected an int, got {seed!r}")
    env_steps = _as_1d(record["env_steps"], f"{arg}.env_steps")
    if np.any(np.diff(env_steps) <= 0):
      raise ValueError(f"{arg}.env_steps: must be strictly increasing, got {env_steps.astype(np.int64).tolist()}")
    curves = {}
    for key in ("success", "success_sampled"):
      curves[key] = _as_1d(record[key], f"{arg}.{key}")
      if curves[key].size != env_steps.size:
        raise ValueError(f"{arg}.{key}: expected {env_steps.size} values (the length of env_steps), "
                         f"got {curves[key].size}")
    group = groups.setdefault(method, {"seeds": [], "env_steps": [], "success": [], "success_sampled": []})
    if seed in group["seeds"]:
      raise ValueError(f"records: method {method!r} has seed {seed} twice")
    # Seeds take different numbers of environment steps per episode, so only the evaluation count must agree.
    if group["env_steps"] and env_steps.size != group["env_steps"][0].size:
      raise ValueError(f"records: method {method!r}: seed {seed} has {env_steps.size} evaluations but seed "
                       f"{group['seeds'][0]} has {group['env_steps'][0].size}; all seeds of a method must be "
                       "evaluated equally often")
    group["seeds"].append(int(seed))
    group["env_steps"].append(env_steps)
    for key, curve in curves.items():
      group[key].append(curve)
  for group in groups.values():
    for key in ("env_steps", "success", "success_sampled"):
      group[key] = np.stack(group[key])
  return groups


def summarize(records) -> list[dict]:
  """One row per method (first-appearance order) with the SUMMARY_KEYS: means over seeds and 95% CI half-widths."""
  return _summary_rows(_group_runs(_as_record_list(records)))


def _per_seed(group: dict[str, Any]) -> dict[str, np.ndarray]:
  """The PAIRED_METRICS of each seed of a `_group_runs` group, as [seeds] arrays in the group's seed order."""
  success = group["success"]
  return {"final_success": success[:, -1], "final_success_sampled": group["success_sampled"][:, -1],
          "auc": np.array([area_under_curve(steps, curve) for steps, curve in zip(group["env_steps"], success)]),
          "rl_gain": success[:, -1] - success[:, 0],
          "rl_gain_sampled": group["success_sampled"][:, -1] - group["success_sampled"][:, 0]}


def _summary_rows(groups: dict[str, dict[str, Any]]) -> list[dict]:
  rows = []
  for method, group in groups.items():
    per_seed = _per_seed(group)
    final_mean, final_ci = mean_ci(per_seed["final_success"])
    sampled_mean, sampled_ci = mean_ci(per_seed["final_success_sampled"])
    auc_mean, auc_ci = mean_ci(per_seed["auc"])
    rows.append({
        "method": method, "seeds": len(group["seeds"]),
        "final_success_mean": final_mean, "final_success_ci95": final_ci,
        "final_success_sampled_mean": sampled_mean, "final_success_sampled_ci95": sampled_ci,
        "auc_mean": auc_mean, "auc_ci95": auc_ci,
        "start_success_mean": float(group["success"][:, 0].mean()),
    })
  return rows


def _mean_ci_fields(prefix: str, values) -> dict[str, Any]:
  """{prefix}_mean, {prefix}_ci95 (nan for one value) and {prefix}_excludes_zero (False when the CI is nan)."""
  mean, ci = mean_ci(values)
  return {f"{prefix}_mean": mean, f"{prefix}_ci95": ci, f"{prefix}_excludes_zero": bool(abs(mean) > ci)}


def paired_differences(records, baseline: str, metric: str = "final_success") -> list[dict]:
  """Every method against `baseline`, paired over seed numbers: one row of PAIRED_KEYS per method, baseline included.

  A row's fields:
    method, baseline: the method and the baseline's name.
    seeds: the method's own seed count; paired_seeds: how many seed numbers it shares with the baseline (for the
      baseline row, its own seed count).
    {m}_diff_mean, {m}_diff_ci95, {m}_diff_excludes_zero for m in PAIRED_METRICS: the mean over shared seeds of the
      per-seed difference method - baseline of m, the half-width of its 95% Student-t CI (`mean_ci`; nan for one
      shared seed) and whether that CI excludes 0 (False when nan). For the baseline row: nan, nan, False.
    rl_gain_mean, rl_gain_ci95, rl_gain_excludes_zero: the same for the method's own RL gain, final minus start
      greedy success, over all of its seeds (paired within each run, so every method has it, the baseline too);
      rl_gain_sampled_*: the same for sampled success (what the policy gradient optimizes).
    best, best_by: `best` is True on the one method with the highest mean `metric` (one of PAIRED_METRICS) over its
      own seeds (the first such on a tie); best_by is `metric`.
  Rows are in first-appearance order of the methods in `records`. A method sharing no seed with the baseline, an
  unknown baseline or metric raise one ValueError line naming the argument.
  """
  return _paired_rows(_group_runs(_as_record_list(records)), baseline, metric)


def _paired_rows(groups: dict[str, dict[str, Any]], baseline: str, metric: str) -> list[dict]:
  if metric not in PAIRED_METRICS:
    raise ValueError(f"metric: expected one of {list(PAIRED_METRICS)}, got {metric!r}")
  if not isinstance(baseline, str) or baseline not in groups:
    raise ValueError(f"baseline: {baseline!r} is not a method in records; methods: {list(groups)}")
  per_seed = {method: _per_seed(group) for method, group in groups.items()}
  base = groups[baseline]
  rows = []
  for method, group in groups.items():
    values = per_seed[method]
    row = {"method": method, "baseline": baseline, "seeds": len(group["seeds"])}
    if method == baseline:
      row["paired_seeds"] = len(group["seeds"])
      row.update({f"{m}_diff_{stat}": v for m in PAIRED_METRICS for stat, v in
                  (("mean", float("nan")), ("ci95", float("nan")), ("excludes_zero", False))})
    else:
      shared = [s for s in group["seeds"] if s in base["seeds"]]
      if not shared:
        raise ValueError(f"records: method {method!r} shares no seed with baseline {baseline!r} (seeds "
                         f"{sorted(group['seeds'])} vs {sorted(base['seeds'])}); paired differences need shared seeds")
      mine = [group["seeds"].index(s) for s in shared]
      theirs = [base["seeds"].index(s) for s in shared]
      row["paired_seeds"] = len(shared)
      for m in PAIRED_METRICS:
        row.update(_mean_ci_fields(f"{m}_diff", values[m][mine] - per_seed[baseline][m][theirs]))
    row.update(_mean_ci_fields("rl_gain", values["rl_gain"]))
    row.update(_mean_ci_fields("rl_gain_sampled", values["rl_gain_sampled"]))
    row["best"], row["best_by"] = False, metric
    rows.append(row)
  means = [values[metric].mean() for values in per_seed.values()]
  rows[int(np.argmax(means))]["best"] = True
  return rows


# ------------------------------------------------------------------------------------------------------
# Output files.
# ------------------------------------------------------------------------------------------------------


def _mean_pm_ci(mean: float, ci: float) -> str:
  return f"{mean:.3f}" if math.isnan(ci) else f"{mean:.3f} ± {ci:.3f}"


def format_table(rows) -> str:
  """The markdown results table of `summarize` rows (no trailing newline)."""
  lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "|".join([" --- "] + [" ---: "] * 5) + "|"]
  for row in rows:
    cells = (
        str(row["method"]).replace("|", r"\|"),  # a bare | would split the cell
        str(row["seeds"]),
        _mean_pm_ci(row["final_success_mean"], row["final_success_ci95"]),
        _mean_pm_ci(row["final_success_sampled_mean"], row["final_success_sampled_ci95"]),
        _mean_pm_ci(row["auc_mean"], row["auc_ci95"]),
        _mean_pm_ci(row["start_success_mean"], float("nan")),
    )
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _signed_cell(mean: float, ci: float, excludes_zero: bool) -> str:
  """A signed mean and its CI half-width, e.g. +0.120 ± 0.050; " *" when the CI excludes 0, "(no CI)" for nan."""
  if math.isnan(ci):
    return f"{mean:+.3f} (no CI)"
  return f"{mean:+.3f} ± {ci:.3f}" + (" *" if excludes_zero else "")


def format_paired_table(rows, baseline: str) -> str:
  """The markdown table of `paired_differences` rows, then a blank line and a one-line legend (no trailing newline).

  The baseline's row shows its seeds and RL gain, with "—" in the paired columns; "(baseline)" and "(best)" follow
  the method names they apply to.
  """
  lines = ["| " + " | ".join(PAIRED_HEADER) + " |", "|" + "|".join([" --- "] + [" ---: "] * 7) + "|"]
  for row in rows:
    is_baseline = row["method"] == baseline
    name = str(row["method"]).replace("|", r"\|") + (" (baseline)" if is_baseline else "")
    name += " (best)" if row["best"] else ""
    cells = [name, str(row["seeds"])]
    if is_baseline:
      cells += ["—"] * 4
    else:
      cells.append(str(row["paired_seeds"]))
      cells += [_signed_cell(*(row[f"{m}_diff_{stat}"] for stat in ("mean", "ci95", "excludes_zero")))
                for m in ("final_success", "final_success_sampled", "auc")]
    cells += [_signed_cell(*(row[f"{gain}_{stat}"] for stat in ("mean", "ci95", "excludes_zero")))
              for gain in ("rl_gain", "rl_gain_sampled")]
    lines.append("| " + " | ".join(cells) + " |")
  legend = (f"Δ is the mean over the seeds shared with {baseline} (same SFT start and held-out tasks) of the per-seed "
            f"difference method − {baseline}; RL gain is final minus SFT-start greedy (sampled) success over the "
            "method's own seeds. ± is the half-width of the 95% Student-t CI of that mean, * marks a CI that "
            f"excludes 0, (no CI) a single seed; (best) marks the highest mean {_METRIC_LABELS[rows[0]['best_by']]}.")
  return "\n".join(lines) + "\n\n" + legend


def _plot_curves(groups: dict[str, dict[str, Any]], path: str, title: str) -> None:
  """Held-out greedy success vs environment steps: the mean over seeds, with a mean ± CI band when n >= 2."""
  # A bare Figure on an Agg canvas, not pyplot: nothing is registered globally (no figure to leak, no backend
  # switched under the caller), so there is nothing to close afterwards.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(7.0, 4.5))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  for method, group in groups.items():
    steps, success = group["env_steps"].mean(axis=0), group["success"]  # x: the seeds' mean env steps
    n = success.shape[0]
    mean = success.mean(axis=0)
    (line,) = ax.plot(steps, mean, marker="o", markersize=3, label=f"{method} (n={n})")
    if n >= 2:
      half = t_critical_95(n - 1) * success.std(axis=0, ddof=1) / math.sqrt(n)
      ax.fill_between(steps, mean - half, mean + half, color=line.get_color(), alpha=0.2, linewidth=0)
  ax.set_xlabel("environment steps")
  ax.set_ylabel("held-out success rate (greedy)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def _json_default(obj: Any) -> Any:
  """Lets records holding numpy scalars or arrays be dumped as plain JSON."""
  if isinstance(obj, np.generic):
    return obj.item()
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  raise TypeError(f"records: {type(obj).__name__} is not JSON serializable")


def _write_csv(path: str, keys: tuple, rows: list[dict]) -> None:
  """One header line of `keys`, then a line per row; floats with 4 decimals (nan as "nan"), bools as True/False."""
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(keys)
    for row in rows:
      writer.writerow([f"{row[k]:.4f}" if isinstance(row[k], float) else row[k] for k in keys])


# Training metrics (metrics.jsonl) that say why one credit level beats another: name in the log -> column header.
DIAGNOSTICS = {
    "tokens_per_step": "tokens / step",
    "clip_frac": "clip frac",
    "approx_kl": "KL (approx)",
    "entropy": "entropy",
    "critic_ev_steps": "critic EV (steps)",
    "critic_ev_tokens": "critic EV (tokens)",
    "adv_step0_std": "adv std (step 0)",
    "adv_step1_std": "adv std (step 1)",
    "adv_step2_std": "adv std (step 2)",
}
DIAGNOSTICS_LEGEND = ("Each cell: the mean over the last third of the training iterations, then over seeds (± the 95% "
                      "CI over seeds). critic EV is the critic's explained variance of the undiscounted return-to-go, "
                      "read at step boundaries (steps) or before every action token (tokens), whatever level the "
                      "method reads it at; adv std (step t) is the std of the per-step advantages at step index t; "
                      "— where a method has no such metric (no critic).")


def diagnostics_table(metrics: dict[str, list[dict]]) -> str:
  """Markdown table of `DIAGNOSTICS` per method from metrics.jsonl lines ({"iteration", "seed", name: value}),
  averaged over each seed's last third of iterations, then over seeds with a 95% CI."""
  if not isinstance(metrics, dict) or not metrics:
    raise ValueError("metrics: expected a non-empty mapping of method -> metrics.jsonl lines")
  rows = []
  for method, lines in metrics.items():
    last = max(line["iteration"] for line in lines)
    tail = [line for line in lines if line["iteration"] > last - max(1, last // 3)]
    cells = []
    for name in DIAGNOSTICS:
      per_seed = {}
      for line in tail:
        if name in line and math.isfinite(line[name]):
          per_seed.setdefault(line["seed"], []).append(line[name])
      if per_seed:
        cells.append(_mean_pm_ci(*mean_ci([float(np.mean(v)) for v in per_seed.values()])))
      else:
        cells.append("—")
    rows.append(f"| {method} | " + " | ".join(cells) + " |")
  header = "| method | " + " | ".join(DIAGNOSTICS.values()) + " |"
  rule = "| --- | " + " | ".join("---:" for _ in DIAGNOSTICS) + " |"
  return "\n".join([header, rule, *rows])


def write_results(out_dir, records, *, title: str, notes: str = "", baseline: str | None = None,
                  diagnostics: dict[str, list[dict]] | None = None) -> dict[str, str]:
  """Writes results.csv, results.md, curves.png and records.json under out_dir; returns their paths by kind.

  With a `baseline` method also paired.csv (kind "paired_csv", the `paired_differences` rows) and the paired table
  in results.md after the main table and its legend. An unknown baseline raises before anything is written. With
  `diagnostics` (method -> its metrics.jsonl lines) results.md ends with `diagnostics_table`.
  """
  records = _as_record_list(records)
  groups = _group_runs(records)  # every check runs before anything is written
  rows = _summary_rows(groups)
  paired = None if baseline is None else _paired_rows(groups, baseline, "final_success")
  os.makedirs(out_dir, exist_ok=True)
  files = [("md", "results.md"), ("csv", "results.csv"), ("png", "curves.png"), ("json", "records.json")]
  files += [("paired_csv", "paired.csv")] if paired else []
  paths = {kind: os.path.join(out_dir, name) for kind, name in files}

  _write_csv(paths["csv"], SUMMARY_KEYS, rows)
  parts = [f"# {title}", ""]
  if notes.strip():
    parts += [notes.strip(), ""]
  parts += [format_table(rows), "", TABLE_LEGEND, ""]
  if paired:
    _write_csv(paths["paired_csv"], PAIRED_KEYS, paired)
    parts += [f"## Paired over seeds vs {baseline}", "", format_paired_table(paired, baseline), ""]
  if diagnostics:
    parts += ["## Diagnostics (training)", "", diagnostics_table(diagnostics), "", DIAGNOSTICS_LEGEND, ""]
  with open(paths["md"], "w", encoding="utf-8") as f:
    f.write("\n".join(parts))

  _plot_curves(groups, paths["png"], title)

  with open(paths["json"], "w", encoding="utf-8") as f:
    json.dump(records, f, indent=1, default=_json_default)
  return paths
