"""The verdict rules of experiments/verdicts.py, the reporting of claims, and the mutation tool."""
from __future__ import annotations

import ast
import os

import pytest

from experiments import reporting
from experiments import verdicts as V
from tests import mutation_pass


def stat(mean, std=0.01, n=3):
  return V.Stat(mean, std, n)


def test_stat_of_seeds():
  s = V.Stat.of([1.0, 2.0, 3.0])
  assert (s.mean, s.std, s.n) == (2.0, 1.0, 3)
  assert V.Stat.of([2.5]).std == 0.0
  assert str(s) == "2.0000 ± 1.0000"


@pytest.mark.parametrize("a, b, verdict", [
    (stat(1.00), stat(1.10), "reproduced"),       # lower by 0.1, noise 2 x 0.0082
    (stat(1.00), stat(1.01), "partly"),           # lower, within the noise
    (stat(1.01), stat(1.00), "not reproduced"),   # higher, within the noise
    (stat(1.10), stat(1.00), "contradicted"),     # higher beyond the noise
    (stat(1.0, 0.0, 1), stat(1.0 + 1e-9, 0.0, 1), "reproduced"),  # deterministic: any gap
])
def test_lower(a, b, verdict):
  assert V.lower(a, b) == verdict


def test_matches_and_fraction_and_combine():
  assert V.matches(stat(1.0), stat(1.005), tolerance=0.01) == "reproduced"
  assert V.matches(stat(1.0), stat(1.05), tolerance=0.01) == "not reproduced"
  assert V.matches(stat(1.0, 0.001), stat(1.015, 0.001), tolerance=0.01) == "partly"
  assert V.fraction(0.97, 0.978) == "reproduced"
  assert V.fraction(0.7, 0.978) == "partly"
  assert V.fraction(0.5, 0.978) == "not reproduced"
  assert V.fraction(0.2, 0.978) == "contradicted"
  assert V.combine(["reproduced", "reproduced"]) == "reproduced"
  assert V.combine(["reproduced", "contradicted"]) == "partly"
  assert V.combine(["not reproduced", "contradicted"]) == "not reproduced"
  assert V.combine(["contradicted", "contradicted"]) == "contradicted"
  with pytest.raises(ValueError, match="verdict"):
    V.claim_row("c", "p", "o", "sort of", "w")


def test_claims_head_the_table(tmp_path):
  rows = [{"method": "a", "loss": 1.0}]
  claims = [V.claim_row("a is low", "Fig. 1", "1.0 | 2.0", "reproduced", "lower")]
  text = reporting.write_table(str(tmp_path / "t"), rows, title="T", claims=claims)
  assert text.index("## Claims and verdicts") < text.index("## Measurements")
  assert "| a is low | Fig. 1 | 1.0 / 2.0 | reproduced | lower |" in text
  assert (tmp_path / "t_claims.csv").read_text().splitlines()[0] == "claim,paper,ours,verdict,why"
  text = reporting.write_table(str(tmp_path / "u"), rows, title="U", claims=[])
  assert "No paper claim is tested by this table." in text


def test_mutation_tool_changes_one_term_and_leaves_checks_alone():
  source = ("def f(x, b=0.9):\n"
            "  check_beta('b', b)\n"
            "  if b < 0:\n"
            "    raise ValueError('b')\n"
            "  return x * b + 1\n")
  described = [text for _, text in mutation_pass._candidates(ast.parse(source))]  # pylint: disable=protected-access
  assert sorted(described) == ["0.9 -> 1.8", "1 -> 2", "Add -> Sub", "Mult -> Div"]
  mutated = {text: mutation_pass.mutant_source(source, i) for i, text in enumerate(described)}
  assert "return x * b - 1" in mutated["Add -> Sub"]
  assert "b=1.8" in mutated["0.9 -> 1.8"]
  assert "return x / b + 1" in mutated["Mult -> Div"]
  assert "check_beta('b', b)" in mutated["1 -> 2"] and "if b < 0" in mutated["1 -> 2"]
  negated = "def g(x):\n  return -x\n"
  assert [t for _, t in mutation_pass._candidates(ast.parse(negated))] == ["drop unary minus"]  # pylint: disable=protected-access
  assert "return x" in mutation_pass.mutant_source(negated, 0).splitlines()[1]


def test_the_claims_index_is_up_to_date():
  """results/claims.md lists every committed *_claims.csv (python -m experiments.verdicts)."""
  results = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")
  rows = V.collect(results)
  assert {r["table"] for r in rows} >= {"adaptive_memory/quadratic.md", "mada/reddi.md"}
  assert all(r["verdict"] in V.VERDICTS for r in rows)
  with open(os.path.join(results, "claims.md")) as f:
    assert f.read() == V.index_text(rows)
