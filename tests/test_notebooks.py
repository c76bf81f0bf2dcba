"""Every notebook in notebooks/ executes without error (in a temporary copy)."""
from __future__ import annotations

import pathlib
import shutil

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
  """The `quick` LM comparison on a tiny generated corpus, 15 steps for two of its optimizers
  (plain and schedule-free; no network): the files the notebook reads, as compare writes them."""
  from experiments.lm import compare  # pylint: disable=import-outside-toplevel
  folder = tmp_path_factory.mktemp("quick")
  corpus = folder / "corpus.txt"
  corpus.write_text("to be or not to be that is the question\n" * 400)
  compare.run_preset("quick", "full", out=str(folder), data_path=str(corpus),
                     overrides_extra={"train.steps": 15, "eval.interval": 5, "eval.tokens": 2048},
                     optimizers=("adamw", "schedule_free_adamw"))
  return folder


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path, monkeypatch, request):
  monkeypatch.setenv("OPTAX_ACCEL_QUICK", "1")  # notebooks shorten their horizons under tests
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  if "lm_comparison" in path.name:
    monkeypatch.setenv("OPTAX_ACCEL_RESULTS", str(request.getfixturevalue("quick_results")))
  copy = tmp_path / path.name
  shutil.copy(path, copy)
  nb = nbformat.read(copy, as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3").execute(cwd=str(ROOT / "notebooks"))
