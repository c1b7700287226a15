"""Regenerate a notebook's committed .ipynb from its jupytext .py (the source of truth) and execute it.

  python notebooks/execute.py 01_quickstart            # default size: the committed outputs
  python notebooks/execute.py 01_quickstart --size=ci  # the size the tests run

Cells run with the notebooks/ folder as the working directory, like Colab runs them next to the checkout.
"""

from __future__ import annotations

import argparse
import os
import time

import jupytext
import nbformat
from nbclient import NotebookClient

HERE = os.path.dirname(os.path.abspath(__file__))
NOTEBOOKS = ("01_quickstart", "02_train_stepppo", "03_ablation_analysis", "04_bring_your_model")


def read_source(name: str) -> nbformat.NotebookNode:
  """The notebook as its .py says (no outputs)."""
  return jupytext.read(os.path.join(HERE, name + ".py"))


def execute(notebook: nbformat.NotebookNode, size: str, timeout: int = 1200) -> float:
  """Runs every cell in notebooks/ with STEPJAX_NOTEBOOK_SIZE=size; raises on the first error. -> seconds."""
  previous = os.environ.get("STEPJAX_NOTEBOOK_SIZE")
  os.environ["STEPJAX_NOTEBOOK_SIZE"] = size  # the kernel inherits the environment
  start = time.perf_counter()
  try:
    NotebookClient(notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": HERE}}).execute()
  finally:
    if previous is None:
      os.environ.pop("STEPJAX_NOTEBOOK_SIZE")
    else:
      os.environ["STEPJAX_NOTEBOOK_SIZE"] = previous
  return time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("names", nargs="*", default=list(NOTEBOOKS))
  parser.add_argument("--size", default="default", choices=("default", "ci"))
  args = parser.parse_args()
  for name in args.names:
    name = os.path.splitext(os.path.basename(name))[0]
    notebook = read_source(name)
    seconds = execute(notebook, args.size)
    nbformat.write(notebook, os.path.join(HERE, name + ".ipynb"))
    print(f"{name}: executed at size {args.size} in {seconds:.0f} s")


if __name__ == "__main__":
  main()
