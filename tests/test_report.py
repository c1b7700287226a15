"""experiments.report against textbook t values, numerical integration of the t density and numpy computations
written out here (independent of report.py's own statistics code)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from experiments import report

# Two-sided 95% Student-t critical values (t_{0.975, df}), as printed in t tables.
TEXTBOOK_T = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 6: 2.4469, 9: 2.2622, 10: 2.2281, 30: 2.0423,
              120: 1.9799, 10**6: 1.95996, 10**9: 1.95996}
# The same to 10 digits for the df the hand computations below use.
T_975 = {2: 4.302652730, 6: 2.446911851}


def t_density(x, df):
  log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
  return np.exp(log_norm - (df + 1) / 2 * np.log1p(x * x / df))


# ------------------------------------------------------------------------------------------------------
# t_critical_95
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("df", sorted(TEXTBOOK_T))
def test_t_critical_matches_tables(df):
  assert report.t_critical_95(df) == pytest.approx(TEXTBOOK_T[df], abs=1e-3)
  # The tables round to 4 decimals; the value agrees to that rounding.
  assert abs(report.t_critical_95(df) - TEXTBOOK_T[df]) <= 5e-5


@pytest.mark.parametrize("df", [1, 2, 3, 5, 30])
def test_t_critical_encloses_95_percent_of_the_density(df):
  t = report.t_critical_95(df)
  x = np.linspace(-t, t, 400_001)
  assert np.trapezoid(t_density(x, df), x) == pytest.approx(0.95, abs=1e-4)
  # And the tails carry the rest: the density integrated past t (substituting x = t / u, u in (0, 1]).
  u = np.linspace(1e-9, 1.0, 400_001)
  tail = 2 * np.trapezoid(t_density(t / u, df) * t / u**2, u)
  assert tail == pytest.approx(0.05, abs=1e-4)


def test_t_critical_decreases_to_the_normal_quantile():
  values = [report.t_critical_95(df) for df in [*range(1, 200), 10**4, 10**5, 10**5 + 1, 10**6, 10**12]]
  assert all(a > b for a, b in zip(values, values[1:]))
  z = 1.959963984540054
  assert math.erfc(z / math.sqrt(2)) == pytest.approx(0.05, abs=1e-15)
  assert values[-1] == pytest.approx(z, abs=1e-11)
  # Continuous across the switch from the incomplete beta to the large-df expansion.
  assert report.t_critical_95(10**5) - report.t_critical_95(10**5 + 1) == pytest.approx(2.4e-10, rel=0.05)


def test_t_critical_accepts_numpy_ints():
  assert report.t_critical_95(np.int64(4)) == report.t_critical_95(4)


@pytest.mark.parametrize("df", [0, -3, 2.0, True, "3", None])
def test_t_critical_rejects_bad_df(df):
  with pytest.raises(ValueError, match=r"^df: must be an int >= 1, got "):
    report.t_critical_95(df)


# ------------------------------------------------------------------------------------------------------
# mean_ci and area_under_curve
# ------------------------------------------------------------------------------------------------------


def test_mean_ci_matches_hand_computation():
  values = np.random.default_rng(0).normal(0.4, 0.1, size=7)
  mean = values.sum() / 7
  std = math.sqrt(((values - mean) ** 2).sum() / 6)
  got_mean, got_half = report.mean_ci(list(values))
  assert got_mean == pytest.approx(mean, rel=1e-12)
  assert got_half == pytest.approx(T_975[6] * std / math.sqrt(7), rel=1e-9)


def test_mean_ci_single_value_and_errors():
  mean, half = report.mean_ci([0.25])
  assert mean == 0.25 and math.isnan(half)
  assert report.mean_ci([0.5, 0.5, 0.5]) == (0.5, 0.0)
  with pytest.raises(ValueError, match=r"^values: must be non-empty"):
    report.mean_ci([])
  with pytest.raises(ValueError, match=r"^values: must be finite"):
    report.mean_ci([0.1, float("nan")])


def test_area_under_curve_matches_trapezoid_loop():
  rng = np.random.default_rng(1)
  x = np.concatenate([[0], np.cumsum(rng.integers(1, 500, size=11))])
  y = rng.uniform(size=12)
  area = sum((x[i + 1] - x[i]) * (y[i] + y[i + 1]) / 2 for i in range(11))
  expected = area / (x[-1] - x[0])
  assert report.area_under_curve(x.tolist(), y.tolist()) == pytest.approx(expected, rel=1e-12)
  assert report.area_under_curve(x, y) == pytest.approx(np.trapezoid(y, x) / (x[-1] - x[0]), rel=1e-12)


def test_area_under_curve_constant_and_single_point():
  assert report.area_under_curve([0, 10, 250, 1000], [0.3] * 4) == pytest.approx(0.3, rel=1e-12)
  assert report.area_under_curve([0, 100], [0.0, 1.0]) == pytest.approx(0.5)
  assert report.area_under_curve([42], [0.7]) == 0.7


@pytest.mark.parametrize("x", [[0, 10, 10], [0, 20, 10], [5, 0, 1]])
def test_area_under_curve_rejects_non_increasing_x(x):
  with pytest.raises(ValueError, match=r"^x: must be strictly increasing") as info:
    report.area_under_curve(x, [0.1, 0.2, 0.3])
  assert "\n" not in str(info.value)


def test_area_under_curve_rejects_mismatched_y():
  with pytest.raises(ValueError, match=r"^y: expected 3 values"):
    report.area_under_curve([0, 1, 2], [0.1, 0.2])


# ------------------------------------------------------------------------------------------------------
# summarize
# ------------------------------------------------------------------------------------------------------

STEPS = {"stepppo": [0, 1000, 3000, 6000], "grpo": [0, 2000, 4000]}


def synthetic_records(seeds=(0, 1, 2)):
  """2 methods x len(seeds) seeds, interleaved so that "grpo" appears first."""
  rng = np.random.default_rng(2)
  records = []
  for seed in seeds:
    for method in ("grpo", "stepppo"):
      n = len(STEPS[method])
      records.append({"method": method, "seed": seed, "env_steps": list(STEPS[method]),
                      "success": np.round(rng.uniform(size=n), 3).tolist(),
                      "success_sampled": np.round(rng.uniform(size=n), 3).tolist()})
  return records


def expected_row(records, method):
  """The summary row computed by hand with numpy."""
  runs = [r for r in records if r["method"] == method]
  n = len(runs)
  x = np.array(runs[0]["env_steps"], dtype=float)

  def stat(values):
    values = np.array(values)
    return values.mean(), T_975[n - 1] * values.std(ddof=1) / math.sqrt(n)

  final = stat([r["success"][-1] for r in runs])
  sampled = stat([r["success_sampled"][-1] for r in runs])
  auc = stat([np.trapezoid(r["success"], x) / (x[-1] - x[0]) for r in runs])
  return {"method": method, "seeds": n, "final_success_mean": final[0], "final_success_ci95": final[1],
          "final_success_sampled_mean": sampled[0], "final_success_sampled_ci95": sampled[1],
          "auc_mean": auc[0], "auc_ci95": auc[1], "start_success_mean": np.mean([r["success"][0] for r in runs])}


def test_summarize_matches_hand_computation():
  records = synthetic_records()
  rows = report.summarize(records)
  assert [row["method"] for row in rows] == ["grpo", "stepppo"]
  for row in rows:
    assert list(row) == list(report.SUMMARY_KEYS)
    expected = expected_row(records, row["method"])
    assert row["seeds"] == 3
    for key in report.SUMMARY_KEYS[2:]:
      assert row[key] == pytest.approx(expected[key], rel=1e-10), key


def test_summarize_single_seed_has_nan_half_widths():
  (row, _) = report.summarize(synthetic_records(seeds=(7,)))
  assert row["seeds"] == 1
  assert all(math.isnan(row[k]) for k in ("final_success_ci95", "final_success_sampled_ci95", "auc_ci95"))
  assert row["final_success_mean"] == synthetic_records(seeds=(7,))[0]["success"][-1]


def test_summarize_uses_each_seeds_own_env_steps():
  records = synthetic_records()
  records[3]["env_steps"] = [0, 1000, 3000, 6500]  # seeds differ in steps per episode
  row = report.summarize(records)[1]
  runs = [r for r in records if r["method"] == "stepppo"]
  aucs = [np.trapezoid(r["success"], r["env_steps"]) / r["env_steps"][-1] for r in runs]
  assert row["auc_mean"] == pytest.approx(np.mean(aucs), rel=1e-10)


def test_summarize_rejects_mismatched_evaluation_counts():
  records = synthetic_records()
  records[3]["env_steps"] = [0, 1000, 3000]
  records[3]["success"] = records[3]["success"][:3]
  records[3]["success_sampled"] = records[3]["success_sampled"][:3]
  with pytest.raises(ValueError, match=r"^records: method 'stepppo': seed 1 has 3 evaluations but seed 0 has 4"):
    report.summarize(records)


def test_summarize_rejects_bad_records():
  records = synthetic_records()
  records[2]["seed"] = 0
  with pytest.raises(ValueError, match=r"^records: method 'grpo' has seed 0 twice"):
    report.summarize(records)
  records = synthetic_records()
  records[1]["success_sampled"] = records[1]["success_sampled"][:-1]
  with pytest.raises(ValueError, match=r"^records\[1\]\.success_sampled: expected 4 values"):
    report.summarize(records)
  del records[0]["success"]
  with pytest.raises(ValueError, match=r"^records\[0\]: missing keys \['success'\]"):
    report.summarize(records)
  with pytest.raises(ValueError, match=r"^records: must be non-empty"):
    report.summarize([])


# ------------------------------------------------------------------------------------------------------
# format_table and write_results
# ------------------------------------------------------------------------------------------------------


def test_format_table():
  row = {"method": "a|b", "seeds": 3, "final_success_mean": 0.5124, "final_success_ci95": 0.0336,
         "final_success_sampled_mean": 0.4, "final_success_sampled_ci95": float("nan"), "auc_mean": 0.25,
         "auc_ci95": 0.01, "start_success_mean": 0.1}
  lines = report.format_table([row]).split("\n")
  assert lines[0] == ("| method | seeds | held-out success (greedy) | held-out success (sampled) | AUC (greedy) "
                      "| SFT start |")
  assert lines[1].count("|") == 7 and set(lines[1]) <= set("|-: ")
  assert lines[2] == r"| a\|b | 3 | 0.512 ± 0.034 | 0.400 | 0.250 ± 0.010 | 0.100 |"


def test_write_results(tmp_path):
  records = synthetic_records()
  records[0]["success"] = np.asarray(records[0]["success"])  # numpy values are written as plain JSON
  out_dir = tmp_path / "runs" / "ablation"
  paths = report.write_results(str(out_dir), records, title="Credit assignment ablation", notes="Three seeds.")
  assert paths == {"md": str(out_dir / "results.md"), "csv": str(out_dir / "results.csv"),
                   "png": str(out_dir / "curves.png"), "json": str(out_dir / "records.json")}
  expected = {m: expected_row(synthetic_records(), m) for m in STEPS}

  with open(paths["csv"], newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    assert tuple(reader.fieldnames) == report.SUMMARY_KEYS
    parsed = list(reader)
  assert [row["method"] for row in parsed] == ["grpo", "stepppo"]
  for row in parsed:
    assert int(row["seeds"]) == 3
    for key in report.SUMMARY_KEYS[2:]:
      assert len(row[key].split(".")[1]) == 4
      assert float(row[key]) == pytest.approx(expected[row["method"]][key], abs=1e-4), key

  md = (out_dir / "results.md").read_text(encoding="utf-8")
  assert md.startswith("# Credit assignment ablation\n\nThree seeds.\n\n")
  assert ("| method | seeds | held-out success (greedy) | held-out success (sampled) | AUC (greedy) | SFT start |"
          in md)
  for method, e in expected.items():
    cells = [method, "3", f"{e['final_success_mean']:.3f} ± {e['final_success_ci95']:.3f}",
             f"{e['final_success_sampled_mean']:.3f} ± {e['final_success_sampled_ci95']:.3f}",
             f"{e['auc_mean']:.3f} ± {e['auc_ci95']:.3f}", f"{e['start_success_mean']:.3f}"]
    assert "| " + " | ".join(cells) + " |" in md
  assert "95% Student-t" in md and "normalized area under the held-out greedy success curve" in md

  png = (out_dir / "curves.png").read_bytes()
  assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1024

  with open(paths["json"], encoding="utf-8") as f:
    assert json.load(f) == synthetic_records()


def test_write_results_single_seed(tmp_path):
  records = synthetic_records(seeds=(3,))
  paths = report.write_results(tmp_path, records, title="One seed")
  md = open(paths["md"], encoding="utf-8").read()
  assert md.startswith("# One seed\n\n| method |")
  assert "±" not in md.split("\n\n")[1]  # the table: means only
  with open(paths["csv"], newline="", encoding="utf-8") as f:
    assert all(row["auc_ci95"] == "nan" for row in csv.DictReader(f))
  assert open(paths["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_write_results_checks_records_before_writing(tmp_path):
  records = synthetic_records()
  records[1]["env_steps"] = [0, 1000, 2000, 1500]
  with pytest.raises(ValueError, match=r"^records\[1\]\.env_steps: must be strictly increasing"):
    report.write_results(tmp_path / "out", records, title="bad")
  assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------------
# paired_differences, format_paired_table and write_results(baseline=...)
# ------------------------------------------------------------------------------------------------------

# method -> (seeds, shift of final success over the baseline's): "stepppo" lacks seed 3, "grpo" lacks seed 0 and
# has seed 7, which the baseline lacks.
PAIRED_METHODS = {"ppo": ((0, 1, 2, 3, 4), 0.0), "stepppo": ((0, 1, 2, 4), 0.3), "grpo": ((1, 2, 3, 4, 7), 0.02)}


def paired_records():
  """Random runs of PAIRED_METHODS, 5 evaluations each, every seed with its own env steps; the start and final
  success of a seed are close across methods (a shared SFT start), so some paired CIs exclude 0 and some do not."""
  rng = np.random.default_rng(5)
  base = {seed: rng.uniform(0.1, 0.5, size=5) for seed in range(8)}
  records = []
  for method, (seeds, shift) in PAIRED_METHODS.items():
    for seed in seeds:
      success = np.clip(base[seed] + rng.normal(0, 0.02, size=5) + shift * np.linspace(0, 1, 5), 0, 1)
      records.append({"method": method, "seed": seed,
                      "env_steps": np.concatenate([[0], np.cumsum(rng.integers(50, 500, size=4))]).tolist(),
                      "success": success.tolist(), "success_sampled": rng.uniform(size=5).tolist()})
  rng.shuffle(records)
  return records


def reference_stat(values):
  """Mean, t_{0.975, n-1} * sd / sqrt(n) (scipy's t quantile) and whether the CI excludes 0; nan CI for n = 1."""
  from scipy import stats
  values = np.asarray(values, dtype=float)
  n = values.size
  ci = stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / math.sqrt(n) if n > 1 else float("nan")
  return values.mean(), ci, bool(abs(values.mean()) > ci)


def expected_cell(row, prefix):
  """The table cell of row[prefix + "_mean" / "_ci95" / "_excludes_zero"], written out here."""
  mean, ci, excludes_zero = (row[f"{prefix}_{stat}"] for stat in ("mean", "ci95", "excludes_zero"))
  if math.isnan(ci):
    return f"{mean:+.3f} (no CI)"
  return f"{mean:+.3f} ± {ci:.3f}" + (" *" if excludes_zero else "")


def reference_metrics(record):
  x, y = np.array(record["env_steps"], dtype=float), np.array(record["success"])
  auc = sum((x[i + 1] - x[i]) * (y[i] + y[i + 1]) / 2 for i in range(len(x) - 1)) / (x[-1] - x[0])
  return {"final_success": y[-1], "final_success_sampled": record["success_sampled"][-1], "auc": auc,
          "rl_gain": y[-1] - y[0], "rl_gain_sampled": record["success_sampled"][-1] - record["success_sampled"][0]}


def reference_paired_rows(records, baseline, metric="final_success"):
  by_method = {}
  for r in records:
    by_method.setdefault(r["method"], {})[r["seed"]] = reference_metrics(r)
  rows = {}
  for method, runs in by_method.items():
    row = {"method": method, "seeds": len(runs)}
    shared = sorted(set(runs) & set(by_method[baseline]))
    for m in report.PAIRED_METRICS:
      if method != baseline:
        diffs = [runs[s][m] - by_method[baseline][s][m] for s in shared]
        row.update(zip([f"{m}_diff_mean", f"{m}_diff_ci95", f"{m}_diff_excludes_zero"], reference_stat(diffs)))
    row["paired_seeds"] = len(shared)
    for gain in ("rl_gain", "rl_gain_sampled"):
      row.update(zip([f"{gain}_mean", f"{gain}_ci95", f"{gain}_excludes_zero"],
                     reference_stat([v[gain] for v in runs.values()])))
    row["metric_mean"] = np.mean([v[metric] for v in runs.values()])
    rows[method] = row
  return rows


def test_paired_differences_match_numpy_reference():
  records = paired_records()
  rows = report.paired_differences(records, "ppo")
  expected = reference_paired_rows(records, "ppo")
  order = list(dict.fromkeys(r["method"] for r in records))
  assert [row["method"] for row in rows] == order
  assert {m: row["paired_seeds"] for m, row in expected.items()} == {"ppo": 5, "stepppo": 4, "grpo": 4}
  flags = []
  for row in rows:
    assert tuple(row) == report.PAIRED_KEYS
    e = expected[row["method"]]
    assert row["baseline"] == "ppo" and row["best_by"] == "final_success"
    assert (row["seeds"], row["paired_seeds"]) == (e["seeds"], e["paired_seeds"])
    diff_keys = [f"{m}_diff_{stat}" for m in report.PAIRED_METRICS for stat in ("mean", "ci95")]
    if row["method"] == "ppo":
      assert all(math.isnan(row[k]) for k in diff_keys)
      assert not any(row[f"{m}_diff_excludes_zero"] for m in report.PAIRED_METRICS)
    else:
      for key in diff_keys:
        assert row[key] == pytest.approx(e[key], rel=1e-9, abs=1e-12), key
      for m in report.PAIRED_METRICS:
        assert row[f"{m}_diff_excludes_zero"] is e[f"{m}_diff_excludes_zero"], m
        flags.append(row[f"{m}_diff_excludes_zero"])
    for gain in ("rl_gain", "rl_gain_sampled"):
      for key in (f"{gain}_mean", f"{gain}_ci95"):
        assert row[key] == pytest.approx(e[key], rel=1e-9), key
      assert row[f"{gain}_excludes_zero"] is e[f"{gain}_excludes_zero"]
  assert True in flags and False in flags  # the data exercise both verdicts
  best = max(expected, key=lambda m: expected[m]["metric_mean"])
  assert [row["method"] for row in rows if row["best"]] == [best] == ["stepppo"]


@pytest.mark.parametrize("metric", report.PAIRED_METRICS)
def test_paired_differences_best_by_metric(metric):
  records = paired_records()
  expected = reference_paired_rows(records, "grpo", metric)
  rows = report.paired_differences(records, "grpo", metric=metric)
  assert all(row["best_by"] == metric for row in rows)
  assert [row["method"] for row in rows if row["best"]] == [max(expected, key=lambda m: expected[m]["metric_mean"])]
  # The baseline only changes which side is subtracted: grpo vs ppo is minus ppo vs grpo.
  vs_ppo = {row["method"]: row for row in report.paired_differences(records, "ppo")}
  grpo_row = next(row for row in rows if row["method"] == "ppo")
  assert grpo_row["auc_diff_mean"] == pytest.approx(-vs_ppo["grpo"]["auc_diff_mean"], rel=1e-12)
  assert grpo_row["auc_diff_ci95"] == pytest.approx(vs_ppo["grpo"]["auc_diff_ci95"], rel=1e-12)


def test_paired_ci_uses_t4_for_five_shared_seeds():
  """Hand numbers: differences 0.1, 0.2, 0.3, 0.4, 0.5 -> mean 0.3, sd sqrt(0.025), half-width t(4) sd / sqrt(5)."""
  records = []
  for seed in range(5):
    for method, final in (("base", 0.2), ("new", 0.2 + 0.1 * (seed + 1))):
      records.append({"method": method, "seed": seed, "env_steps": [0, 10], "success": [0.2, final],
                      "success_sampled": [0.0, 0.0]})
  row = report.paired_differences(records, "base")[1]
  half = 2.7764451051977987 * math.sqrt(0.025) / math.sqrt(5)
  assert row["final_success_diff_mean"] == pytest.approx(0.3, rel=1e-12)
  assert row["final_success_diff_ci95"] == pytest.approx(half, rel=1e-12)
  assert row["rl_gain_diff_mean"] == pytest.approx(0.3, rel=1e-12)  # equal starts: Δ gain = Δ final
  assert row["auc_diff_mean"] == pytest.approx(0.15, rel=1e-12)
  assert row["final_success_sampled_diff_mean"] == 0.0 and row["final_success_sampled_diff_ci95"] == 0.0
  assert row["final_success_sampled_diff_excludes_zero"] is False
  assert row["final_success_diff_excludes_zero"] is True


def test_paired_differences_single_shared_seed_has_nan_ci():
  records = [r for r in paired_records() if r["method"] == "ppo" or (r["method"] == "grpo" and r["seed"] in (2, 7))]
  rows = report.paired_differences(records, "ppo")
  grpo = next(row for row in rows if row["method"] == "grpo")
  assert grpo["paired_seeds"] == 1 and grpo["seeds"] == 2
  assert math.isnan(grpo["auc_diff_ci95"]) and grpo["auc_diff_excludes_zero"] is False
  assert not math.isnan(grpo["rl_gain_ci95"])  # the gain uses both of grpo's own seeds
  line = next(line for line in report.format_paired_table(rows, "ppo").split("\n") if line.startswith("| grpo"))
  cells = [f"{grpo[f'{m}_diff_mean']:+.3f} (no CI)" for m in ("final_success", "final_success_sampled", "auc")]
  gains = [expected_cell(grpo, "rl_gain"), expected_cell(grpo, "rl_gain_sampled")]
  assert line.endswith(" | 2 | 1 | " + " | ".join(cells + gains) + " |")


def test_paired_differences_rejects_bad_input():
  records = paired_records()
  for baseline in ("trpo", 3, None):
    with pytest.raises(ValueError, match=r"^baseline: .* is not a method in records; methods: \[") as info:
      report.paired_differences(records, baseline)
    assert "\n" not in str(info.value)
  with pytest.raises(ValueError, match=r"^metric: expected one of \['final_success', .*got 'success'$"):
    report.paired_differences(records, "ppo", metric="success")
  records = [r for r in records if not (r["method"] == "grpo" and r["seed"] != 7)]
  with pytest.raises(ValueError, match=r"^records: method 'grpo' shares no seed with baseline 'ppo' \(seeds \[7\] vs "
                     r"\[0, 1, 2, 3, 4\]\)"):
    report.paired_differences(records, "ppo")
  with pytest.raises(ValueError, match=r"^records: must be non-empty"):
    report.paired_differences([], "ppo")


PAIRED_ROW = {"method": "x", "baseline": "base", "seeds": 5, "paired_seeds": 4, "best": False, "best_by": "auc",
              **{f"{m}_diff_{stat}": v for m in report.PAIRED_METRICS
                 for stat, v in (("mean", 0.0), ("ci95", 0.0), ("excludes_zero", False))},
              "rl_gain_mean": 0.0, "rl_gain_ci95": 0.0, "rl_gain_excludes_zero": False,
              "rl_gain_sampled_mean": 0.0, "rl_gain_sampled_ci95": 0.0, "rl_gain_sampled_excludes_zero": False}


def test_format_paired_table():
  nan = float("nan")
  no_diffs = {f"{m}_diff_{stat}": nan for m in report.PAIRED_METRICS for stat in ("mean", "ci95")}
  rows = [
      {**PAIRED_ROW, "method": "base", "paired_seeds": 5, "rl_gain_mean": 0.1234, "rl_gain_ci95": 0.05,
       "rl_gain_excludes_zero": True, "rl_gain_sampled_mean": 0.2, "rl_gain_sampled_ci95": 0.01,
       "rl_gain_sampled_excludes_zero": True, **no_diffs},
      {**PAIRED_ROW, "method": "a|b", "best": True, "final_success_diff_mean": 0.2, "final_success_diff_ci95": 0.05,
       "final_success_diff_excludes_zero": True, "final_success_sampled_diff_mean": -0.01,
       "final_success_sampled_diff_ci95": 0.1, "auc_diff_mean": -0.3, "auc_diff_ci95": 0.1,
       "auc_diff_excludes_zero": True, "rl_gain_mean": 0.05, "rl_gain_ci95": 0.06},
      {**PAIRED_ROW, "method": "one", "seeds": 1, "paired_seeds": 1, "final_success_diff_mean": 0.1,
       "final_success_diff_ci95": nan, "rl_gain_mean": 0.1, "rl_gain_ci95": nan},
  ]
  table, legend = report.format_paired_table(rows, "base").split("\n\n")
  lines = table.split("\n")
  assert lines[0] == ("| method | seeds | paired seeds | Δ final success (greedy) | Δ final success (sampled) "
                      "| Δ AUC (greedy) | RL gain over SFT start (greedy) | RL gain over SFT start (sampled) |")
  assert lines[1] == "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
  assert lines[2] == "| base (baseline) | 5 | — | — | — | — | +0.123 ± 0.050 * | +0.200 ± 0.010 * |"
  assert lines[3] == (r"| a\|b (best) | 5 | 4 | +0.200 ± 0.050 * | -0.010 ± 0.100 | -0.300 ± 0.100 * "
                      "| +0.050 ± 0.060 | +0.000 ± 0.000 |")
  assert lines[4] == ("| one | 1 | 1 | +0.100 (no CI) | +0.000 ± 0.000 | +0.000 ± 0.000 | +0.100 (no CI) "
                      "| +0.000 ± 0.000 |")
  assert len(lines) == 5 and "\n" not in legend
  assert legend.startswith("Δ is the mean over the seeds shared with base ")
  assert "* marks a CI that excludes 0" in legend and "(no CI) a single seed" in legend
  assert legend.endswith("(best) marks the highest mean AUC (greedy).")


def test_format_paired_table_marks_excluded_zero_from_reference():
  records = paired_records()
  expected = reference_paired_rows(records, "ppo")
  lines = report.format_paired_table(report.paired_differences(records, "ppo"), "ppo").split("\n")[2:5]
  for line in lines:
    cells = [c.strip() for c in line.strip("|").split("|")]
    method = cells[0].split(" ")[0]
    e = expected[method]
    assert cells[-2:] == [expected_cell(e, "rl_gain"), expected_cell(e, "rl_gain_sampled")]
    if method != "ppo":
      for cell, m in zip(cells[3:6], ("final_success", "final_success_sampled", "auc")):
        assert cell == expected_cell(e, f"{m}_diff"), (method, m)


def test_write_results_with_baseline(tmp_path):
  records = paired_records()
  paths = report.write_results(tmp_path, records, title="Paired", notes="Five seeds.", baseline="ppo")
  assert paths["paired_csv"] == str(tmp_path / "paired.csv")
  assert set(paths) == {"md", "csv", "png", "json", "paired_csv"}
  rows = report.paired_differences(records, "ppo")
  md = open(paths["md"], encoding="utf-8").read()
  main = report.format_table(report.summarize(records))
  paired = report.format_paired_table(rows, "ppo")
  assert md == (f"# Paired\n\nFive seeds.\n\n{main}\n\n{report.TABLE_LEGEND}\n\n## Paired over seeds vs ppo\n\n"
                f"{paired}\n")
  with open(paths["paired_csv"], newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    assert tuple(reader.fieldnames) == report.PAIRED_KEYS
    parsed = list(reader)
  expected = reference_paired_rows(records, "ppo")
  assert [row["method"] for row in parsed] == [row["method"] for row in rows]
  for row in parsed:
    e = expected[row["method"]]
    assert (row["baseline"], int(row["seeds"]), int(row["paired_seeds"])) == ("ppo", e["seeds"], e["paired_seeds"])
    assert row["best"] == str(row["method"] == "stepppo") and row["best_by"] == "final_success"
    assert float(row["rl_gain_ci95"]) == pytest.approx(e["rl_gain_ci95"], abs=1e-4)
    assert row["rl_gain_excludes_zero"] == str(e["rl_gain_excludes_zero"])
    assert float(row["rl_gain_sampled_mean"]) == pytest.approx(e["rl_gain_sampled_mean"], abs=1e-4)
    if row["method"] == "ppo":
      assert row["auc_diff_mean"] == "nan" and row["auc_diff_excludes_zero"] == "False"
    else:
      assert float(row["auc_diff_mean"]) == pytest.approx(e["auc_diff_mean"], abs=1e-4)
      assert row["final_success_diff_excludes_zero"] == str(e["final_success_diff_excludes_zero"])


def test_write_results_without_baseline_writes_no_paired_file(tmp_path):
  report.write_results(tmp_path, paired_records(), title="Plain")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "records.json", "results.csv", "results.md"]
  assert "Paired" not in (tmp_path / "results.md").read_text(encoding="utf-8")


def test_write_results_checks_baseline_before_writing(tmp_path):
  with pytest.raises(ValueError, match=r"^baseline: 'trpo' is not a method in records"):
    report.write_results(tmp_path / "out", paired_records(), title="bad", baseline="trpo")
  assert not (tmp_path / "out").exists()


def test_curves_have_a_95_percent_band_per_method(tmp_path, monkeypatch):
  from matplotlib.axes import Axes
  bands = []
  fill_between = Axes.fill_between
  monkeypatch.setattr(Axes, "fill_between", lambda self, x, lo, hi, **kw: bands.append((lo, hi))
                      or fill_between(self, x, lo, hi, **kw))
  records = paired_records()
  report.write_results(tmp_path, records, title="Bands")
  assert len(bands) == len(PAIRED_METHODS)
  for (lo, hi), method in zip(bands, dict.fromkeys(r["method"] for r in records)):
    success = np.array([r["success"] for r in records if r["method"] == method])
    n = len(success)
    half = np.array([reference_stat(column)[1] for column in success.T])
    np.testing.assert_allclose(hi - lo, 2 * half, rtol=1e-9)
    np.testing.assert_allclose((hi + lo) / 2, success.mean(axis=0), rtol=1e-12)
    assert n == len(PAIRED_METHODS[method][0])


def test_diagnostics_table_averages_the_last_third_then_seeds():
  rng = np.random.default_rng(3)
  lines = {"a": [], "b": []}
  for method in lines:
    for seed in range(3):
      for iteration in range(1, 10):
        line = {"iteration": iteration, "seed": seed, "clip_frac": float(rng.uniform()), "entropy": float(rng.uniform())}
        if method == "a":
          line["critic_ev_steps"] = float(rng.uniform())
        lines[method].append(line)
  table = report.diagnostics_table(lines).splitlines()
  assert table[0].startswith("| method | tokens / step | clip frac |") and len(table) == 4
  for row, method in zip(table[2:], ("a", "b")):
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[0] == method and cells[1] == "—"  # no tokens_per_step lines
    per_seed = [np.mean([l["clip_frac"] for l in lines[method] if l["seed"] == s and l["iteration"] > 6])
                for s in range(3)]
    mean = np.mean(per_seed)
    half = 4.302652729911275 * np.std(per_seed, ddof=1) / np.sqrt(3)  # t(2) quantile
    assert cells[2] == f"{mean:.3f} ± {half:.3f}"
    assert (cells[5] == "—") == (method == "b")  # critic EV only where a critic ran
  with pytest.raises(ValueError, match="^metrics: "):
    report.diagnostics_table({})
