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
