"""The notebooks, kept honest: each .ipynb matches its jupytext .py (the source of truth), its committed outputs
come from a real run (no errors, the plots as inline PNGs), and every notebook executes from scratch at its CI size
(STEPJAX_NOTEBOOK_SIZE=ci) without an error.

Run with `make notebooks` (not part of `make test`: pytest.ini's testpaths is tests/). Regenerate a notebook after
editing its .py: `python notebooks/execute.py NAME` (default size; commit both files).
"""

import os
import sys

import jupytext
import nbformat
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import execute  # noqa: E402  (notebooks/execute.py)

HERE = os.path.dirname(os.path.abspath(__file__))
# Notebooks that plot: their committed .ipynb must show at least this many images.
PLOTS = {"01_quickstart": 1, "02_train_stepppo": 1, "03_ablation_analysis": 3, "04_bring_your_model": 1}


def _committed(name):
  return nbformat.read(os.path.join(HERE, name + ".ipynb"), as_version=4)


def _sources(notebook):
  return [(cell.cell_type, cell.source.strip()) for cell in notebook.cells]


def test_every_notebook_is_listed():
  found = sorted(f[:-len(".py")] for f in os.listdir(HERE) if f[:2].isdigit() and f.endswith(".py"))
  assert found == sorted(execute.NOTEBOOKS) == sorted(PLOTS)
  with open(os.path.join(os.path.dirname(HERE), "README.md"), encoding="utf-8") as f:
    readme = f.read()
  for name in found:
    assert f"notebooks/{name}.ipynb" in readme, f"README.md does not link {name}"


@pytest.mark.parametrize("name", execute.NOTEBOOKS)
def test_ipynb_matches_its_py(name):
  """Cell by cell, the committed .ipynb has the sources jupytext reads from the .py."""
  assert _sources(_committed(name)) == _sources(jupytext.read(os.path.join(HERE, name + ".py"))), (
      f"{name}.ipynb is out of sync with {name}.py: run python notebooks/execute.py {name}")


@pytest.mark.parametrize("name", execute.NOTEBOOKS)
def test_committed_outputs_are_from_a_run(name):
  notebook = _committed(name)
  code = [cell for cell in notebook.cells if cell.cell_type == "code"]
  assert code and all(cell.get("execution_count") for cell in code), f"{name}.ipynb has unexecuted cells"
  outputs = [output for cell in code for output in cell.get("outputs", [])]
  assert not [output for output in outputs if output.output_type == "error"], f"{name}.ipynb has an error output"
  images = sum("image/png" in output.get("data", {}) for output in outputs)
  assert images >= PLOTS[name], f"{name}.ipynb shows {images} inline PNG(s), expected >= {PLOTS[name]}"


@pytest.mark.parametrize("name", execute.NOTEBOOKS)
def test_notebook_executes_at_ci_size(name):
  """Every cell, from the .py, in a fresh kernel; nbclient raises on the first failing cell."""
  notebook = execute.read_source(name)
  execute.execute(notebook, "ci", timeout=600)
  assert any("image/png" in output.get("data", {}) for cell in notebook.cells for output in cell.get("outputs", []))
