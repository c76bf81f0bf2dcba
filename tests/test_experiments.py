"""The reproduction scripts run end to end (reduced scale) and write their tables and plots."""
from __future__ import annotations

import csv
import os

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from experiments.convex import logistic, quadratic  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")


def _written(stem):
  return all(os.path.getsize(stem + ext) > 0 for ext in (".csv", ".md", ".png"))


def _committed_claims(stem):
  with open(os.path.join(RESULTS, stem + "_claims.csv")) as f:
    return {r["claim"]: r["verdict"] for r in csv.DictReader(f)}


def test_quadratic_reproduction_at_the_papers_setting(tmp_path):
  """The whole experiment at its defaults (deterministic): the paper's claim at its own setting
  (lam 0.1, beta_max 0.9) is tested as the paper states it, and its verdict is the one committed
  in results/ (a change in the optimizer that moves a verdict fails here, both ways)."""
  rows = quadratic.main(["--out", str(tmp_path)])
  assert _written(str(tmp_path / "quadratic"))
  gap = {(r["lr"], r["method"]): r["final_gap"] for r in rows}
  lrs = sorted({lr for lr, _ in gap})
  for lr in lrs:  # the part of the claim that holds at every rate: AM beats the usual beta = 0.9
    assert gap[(lr, quadratic.PAPER_DEFAULT)] < gap[(lr, "fixed beta=0.9")]
  # ... and the part that holds at one rate of three: AM beats the best fixed beta (10% margin).
  best_fixed = {lr: min(v for (rate, m), v in gap.items() if rate == lr and m.startswith("fixed"))
                for lr in lrs}
  beats_every_fixed = [gap[(lr, quadratic.PAPER_DEFAULT)] * 1.1 < best_fixed[lr] for lr in lrs]
  assert beats_every_fixed == [False, False, True]
  claims = {r["claim"]: r["verdict"] for r in quadratic.claims(rows)}
  assert claims == _committed_claims("adaptive_memory/quadratic")
  assert "command: `" in (tmp_path / "quadratic.md").read_text()


def test_logistic_reproduction_at_the_papers_setting(tmp_path):
  """One dataset at the experiment's defaults (500 steps, AM's lam 0.1, beta_max 0.9): the
  full-batch run (deterministic) has the committed table's losses and wins, whose claims carry
  the verdicts over all datasets (one minibatch seed instead of three, for the CI budget)."""
  rows = logistic.main(["--datasets", "wine", "--seeds", "1", "--out", str(tmp_path)])
  assert _written(str(tmp_path / "logistic"))
  with open(os.path.join(RESULTS, "adaptive_memory", "logistic.csv")) as f:
    committed = {r["regime"]: r for r in csv.DictReader(f) if r["dataset"] == "wine"}
  assert {r["regime"] for r in rows} == set(committed) == {"full batch", "minibatch 32"}
  for row in [r for r in rows if r["regime"] == "full batch"]:
    want = committed[row["regime"]]
    assert row["am_sgd"] == pytest.approx(float(want["am_sgd"]), rel=1e-6)
    assert row["best_fixed"] == want["best_fixed"]
    assert str(row["am_beats_0_9"]) == want["am_beats_0_9"]
    assert str(row["am_beats_best"]) == want["am_beats_best"]
  claims = {r["claim"]: r["verdict"] for r in logistic.claims(rows)}
  assert set(claims) == set(_committed_claims("adaptive_memory/logistic"))


def test_reddi_reproduction(tmp_path):
  """200k of the paper's 2M steps: a float64 simulation of the official code has MADA at x = 0.39 after
  100k steps with rho below 0.05 by then, and Adam stuck near +1."""
  from experiments.synthetic import reddi  # pylint: disable=import-outside-toplevel
  rows = {r["method"]: r for r in reddi.main(["--steps", "200000", "--out", str(tmp_path)])}
  assert _written(str(tmp_path / "reddi"))
  assert rows["Adam"]["x@100k"] > 0.99
  assert rows["MADA"]["x@100k"] == pytest.approx(0.39, abs=0.01)
  assert rows["MADA"]["first step rho < 0.05"] <= 200_000
  assert rows["AMSGrad"]["x@200k"] < 0 and rows["AVGrad"]["x@200k"] < 0
