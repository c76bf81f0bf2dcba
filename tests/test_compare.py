"""experiments.lm.compare: finished runs are kept and reused, and the claims read the right rows."""
from __future__ import annotations

import pytest

from experiments import verdicts as V
from experiments.lm import compare


@pytest.fixture
def corpus(tmp_path):
  path = tmp_path / "corpus.txt"
  path.write_text("to be or not to be that is the question\n" * 300)
  return str(path)


def test_an_interrupted_comparison_continues_where_it_stopped(tmp_path, corpus, monkeypatch):
  kw = dict(out=str(tmp_path / "out"), data_path=corpus, optimizers=("adamw", "lion"),
            overrides_extra={"train.steps": 4, "eval.interval": 2, "eval.tokens": 1024})
  real_train, calls = compare.train_lib.train, []

  def train_then_die(cfg):
    if calls:
      raise KeyboardInterrupt  # the second run is interrupted
    calls.append(cfg["optim.name"])
    return real_train(cfg)

  monkeypatch.setattr(compare.train_lib, "train", train_then_die)
  with pytest.raises(KeyboardInterrupt):
    compare.run_preset("quick", "full", **kw)
  assert calls == ["adamw"] and len(list((tmp_path / "out" / "runs").glob("*.json"))) == 1
  assert not list((tmp_path / "out" / "runs").glob("*.tmp"))

  def train(cfg):
    calls.append(cfg["optim.name"])
    return real_train(cfg)

  monkeypatch.setattr(compare.train_lib, "train", train)
  rows = compare.run_preset("quick", "full", **kw)  # the same command again
  assert calls == ["adamw", "lion"]
  assert [r["run"] for r in rows] == ["AdamW", "Lion"]
  assert compare.run_preset("quick", "full", **kw) == rows and calls == ["adamw", "lion"]
  table = (tmp_path / "out" / "table.md").read_text()
  assert "No paper claim is tested by this table." in table  # quick tests no claim
  assert (tmp_path / "out" / "runs.csv").read_text().count("\n") == 3  # header + one row per seed
  kw.update(optimizers=("adamw",), overrides_extra={**kw["overrides_extra"], "train.steps": 5})

  def start_only(cfg):  # that the run starts again is the point; it need not finish
    calls.append(cfg["optim.name"])
    raise KeyboardInterrupt

  monkeypatch.setattr(compare.train_lib, "train", start_only)
  with pytest.raises(KeyboardInterrupt):
    compare.run_preset("quick", "full", **kw)  # changed settings: run again
  assert calls == ["adamw", "lion", "adamw"]


def _stats(losses, n=3, std=0.01):
  return {key: V.Stat(mean, std, n) for key, mean in losses.items()}


def test_accel_claims_read_each_batch():
  steps = 1000
  labels = [r.label for r in compare._accel_runs("cpu", steps)]  # pylint: disable=protected-access
  assert labels == ["AdamW", "AdEMAMix", "Simplified-AdEMAMix", "SF-AdamW"]
  paper_like = {("AdamW", 8): 2.0, ("AdEMAMix", 8): 1.8, ("Simplified-AdEMAMix", 8): 1.805,
                ("SF-AdamW", 8): 1.9, ("AdamW", 32): 1.7, ("AdEMAMix", 32): 1.69,
                ("Simplified-AdEMAMix", 32): 1.692, ("SF-AdamW", 32): 1.8}
  verdicts = [c["verdict"] for c in compare._accel_claims(_stats(paper_like, std=0.001))]  # pylint: disable=protected-access
  assert verdicts == ["reproduced"] * 5
  reversed_ = {k: (4.0 - v) for k, v in paper_like.items()}  # every ordering the other way
  verdicts = [c["verdict"] for c in compare._accel_claims(_stats(reversed_, std=0.001))]  # pylint: disable=protected-access
  assert verdicts[:4] == ["contradicted"] * 4


def test_accel_coefficients_follow_the_horizon():
  runs = {r.label: r for r in compare._accel_runs("cpu", 1000)}  # pylint: disable=protected-access
  b3 = runs["AdEMAMix"].kwargs["b3"]
  assert b3 == pytest.approx(1 - 25.6 / 1000) and runs["AdEMAMix"].kwargs["b3_warmup"] == 1000
  simplified = runs["Simplified-AdEMAMix"]
  ratio = 8.0 * (1 - b3)  # the exact AdEMAMix(b1=0) <-> Simplified-AdEMAMix mapping
  assert simplified.kwargs["b1"] == b3 and simplified.kwargs["alpha"] == pytest.approx(1 / ratio)
  assert simplified.lr == pytest.approx(runs["AdEMAMix"].lr * ratio)


def test_mada_grid_claims_and_heatmap(tmp_path):
  runs = compare._mada_grid("cpu", 600)  # pylint: disable=protected-access
  assert len(runs) == 3 * 25 and sum(r.seeds is None for r in runs) == 3
  stats = {}
  for run in runs:
    b1, b2 = (float(x) for x in run.label.split("=(")[1].rstrip(")").split(","))
    adam = 2.0 + abs(b1 - 0.8) + abs(b2 - 0.99)
    loss = {"Adam": adam, "HyperAdam": 2.0 + 0.5 * (adam - 2.0) + 0.01,
            "MADA": 1.99 + 0.4 * (adam - 2.0)}[run.label.split()[0]]
    stats[(run.label, 16)] = V.Stat(loss, 0.001 if run.seeds is None else 0.0,
                                    3 if run.seeds is None else 1)
  claims = compare._mada_claims(stats)  # pylint: disable=protected-access
  assert claims[0]["ours"].startswith("100%") and claims[0]["verdict"] == "reproduced"
  assert [c["verdict"] for c in claims] == ["reproduced"] * 4
  compare.heatmap(stats, str(tmp_path / "heatmap.png"), title="t")
  assert (tmp_path / "heatmap.png").stat().st_size > 0
