"""Every notebook in notebooks/ executes without error (in a temporary copy)."""
from __future__ import annotations

import pathlib
import shutil

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path, monkeypatch):
  monkeypatch.setenv("OPTAX_ACCEL_QUICK", "1")  # notebooks shorten their horizons under tests
  monkeypatch.setenv("OPTAX_ACCEL_OUT", str(tmp_path))  # where notebooks may write files
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  copy = tmp_path / path.name
  shutil.copy(path, copy)
  nb = nbformat.read(copy, as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3").execute(cwd=str(ROOT / "notebooks"))
