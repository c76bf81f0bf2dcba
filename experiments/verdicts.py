"""Verdicts on the papers' claims, computed from our measurements by fixed rules.

A claim is compared with what we measured and gets one of four verdicts:

- ``reproduced``: the effect has the paper's sign and is larger than the noise (two standard errors
  of the difference over seeds);
- ``partly``: the sign agrees but the effect is within the noise, or only some parts of a
  composite claim hold;
- ``not reproduced``: no effect of the paper's sign (the difference is within the noise, or the
  sign is the other way within the noise);
- ``contradicted``: the opposite effect, larger than the noise.

The rules are the same for every table, so a verdict cannot be chosen after seeing the numbers;
each claim carries a line saying why it came out as it did (and, where it did not reproduce, the
likely reason, written with the claim before the run).
"""
from __future__ import annotations

import csv
import dataclasses
import math
import os
from collections.abc import Sequence

VERDICTS = ("reproduced", "partly", "not reproduced", "contradicted")


@dataclasses.dataclass(frozen=True)
class Stat:
  """Mean and standard deviation of a metric over n seeds (std 0 for one seed)."""
  mean: float
  std: float
  n: int

  @classmethod
  def of(cls, values: Sequence[float]) -> Stat:
    values = [float(v) for v in values]
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return cls(mean, std, n)

  def __str__(self) -> str:
    return f"{self.mean:.4f} ± {self.std:.4f}" if self.n > 1 else f"{self.mean:.4f}"


def standard_error(a: Stat, b: Stat) -> float:
  """Standard error of mean(a) - mean(b) (independent seeds)."""
  return math.sqrt(a.std ** 2 / a.n + b.std ** 2 / b.n)


def signed(effect: float, noise: float) -> str:
  """Verdict for an effect whose paper sign is positive, against its noise (2 standard errors)."""
  if not math.isfinite(effect):
    return "contradicted" if effect < 0 else "reproduced"
  if effect > noise and effect > 0:
    return "reproduced"
  if effect > 0:
    return "partly"
  if -effect > noise:
    return "contradicted"
  return "not reproduced"


def lower(a: Stat, b: Stat) -> str:
  """The claim "a is lower than b" (losses)."""
  return signed(b.mean - a.mean, 2 * standard_error(a, b))


def matches(a: Stat, b: Stat, tolerance: float) -> str:
  """The claim "a matches b": within ``tolerance`` or the noise, whichever is larger."""
  gap = abs(a.mean - b.mean)
  noise = max(tolerance, 2 * standard_error(a, b))
  if gap <= noise:
    return "reproduced"
  return "partly" if gap <= 2 * noise else "not reproduced"


def fraction(observed: float, paper: float, chance: float = 0.5) -> str:
  """A claimed fraction of cases (paper > chance): reproduced at >= 90% of the paper's excess over
  chance, partly above chance, not reproduced near chance, contradicted below it."""
  excess = (observed - chance) / (paper - chance)
  if excess >= 0.9:
    return "reproduced"
  if excess > 0.2:
    return "partly"
  return "not reproduced" if excess > -0.2 else "contradicted"


def combine(parts: Sequence[str]) -> str:
  """A composite claim: reproduced if every part is, contradicted if every part is, else partly
  (or not reproduced when no part is better than that)."""
  if all(p == "reproduced" for p in parts):
    return "reproduced"
  if all(p == "contradicted" for p in parts):
    return "contradicted"
  if all(p in ("not reproduced", "contradicted") for p in parts):
    return "not reproduced"
  return "partly"


def claim_row(claim: str, paper: str, ours: str, verdict: str, why: str) -> dict:
  if verdict not in VERDICTS:
    raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
  return {"claim": claim, "paper": paper, "ours": ours, "verdict": verdict, "why": why}


def collect(results_dir: str = "results") -> list[dict]:
  """Every claim of every table under ``results_dir`` (its ``*_claims.csv``), with its table."""
  rows = []
  for folder, _, files in sorted(os.walk(results_dir)):
    for name in sorted(files):
      if name.endswith("_claims.csv"):
        path = os.path.join(folder, name)
        with open(path, newline="") as f:
          table = os.path.relpath(path, results_dir).removesuffix("_claims.csv") + ".md"
          rows += [{"table": table, **row} for row in csv.DictReader(f)]
  return rows


def index_text(rows: list[dict]) -> str:
  counts = {v: sum(r["verdict"] == v for r in rows) for v in VERDICTS}
  lines = ["# Every claim and its verdict", "",
           "Made by `python -m experiments.verdicts` from the `*_claims.csv` next to each table "
           "(the rules: `experiments/verdicts.py`; scales and reasons: each table and "
           "docs/reproductions.md).", "",
           "Totals: " + ", ".join(f"{n} {v}" for v, n in counts.items()), "",
           "| table | claim | paper | ours | verdict |", "|---|---|---|---|---|"]
  lines += [f"| {r['table']} | {r['claim']} | {r['paper']} | {r['ours']} | **{r['verdict']}** |"
            for r in rows]
  return "\n".join(lines) + "\n"


def main():
  text = index_text(collect())
  with open(os.path.join("results", "claims.md"), "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
