"""Optimizer comparisons on the LM task: tables (CSV + Markdown), curves and verdicts on the papers' claims.

    python -m experiments.lm.compare --preset quick                 # the README's main job
    python -m experiments.lm.compare --preset accel-batch --scale cpu

Presets: ``quick`` (tiny GPT on Shakespeare, one run per optimizer family, CPU minutes),
``mada-shakespeare`` (Adam vs HyperAdam vs MADA over a 5 x 5 (beta1, beta2) grid; MADA Fig. 8),
``accel-batch`` (AdamW, AdEMAMix, Simplified-AdEMAMix, SF-AdamW at a small and a large batch;
Morwani et al.), ``am-warmup`` (LLaMA, AdamW and AM-AdamW with and without warmup; Topollai &
Choromanska Table 6). ``--scale full`` is the paper-like setting (for an accelerator); ``--scale cpu``
shrinks model, steps and batches so that a preset runs in well under an hour on a 2-core CPU, with
the horizon-dependent coefficients (AdEMAMix's b3 and warmups, learning-rate warmup) scaled to the
run length as the papers scale them to theirs (docs/reproductions.md).

Results go to ``results/lm/<preset>`` (``-cpu`` at CPU scale): ``table.{md,csv}`` (mean ± std over
seeds per setting, the claims with their verdicts at the top), ``runs.csv`` (every seed),
``curves.png`` and ``curves.json``; the grid preset adds ``heatmap.png``. Every finished run is
kept in ``runs/<name>.json``: an interrupted comparison continues where it stopped when started
again with the same command (a run whose settings changed is run again).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from experiments import reporting
from experiments import verdicts as V
from experiments.lm import data as data_lib
from experiments.lm import recipes
from experiments.lm import train as train_lib

HISTORY_POINTS = 200  # training-loss points kept per run (every validation point is kept)


@dataclasses.dataclass
class Run:
  label: str
  optimizer: str
  lr: float
  kwargs: dict = dataclasses.field(default_factory=dict)
  overrides: dict = dataclasses.field(default_factory=dict)
  paper: Any = None  # the paper's number for this setting, if any
  seeds: tuple | None = None  # None: the preset's


@dataclasses.dataclass
class Preset:
  config: str
  overrides: dict
  runs: Callable[[str, int], list]  # (scale, train.steps) -> the runs
  batch_sizes: tuple = (None,)
  seeds: tuple = (0,)
  metric: str = "final val loss"  # what the claims compare
  metric_note: str = ""
  claims: Callable[[dict], list] | None = None  # {(label, batch): Stat of metric} -> claim rows
  cpu: dict = dataclasses.field(default_factory=dict)  # overrides at --scale cpu (none: full only)
  cpu_seeds: tuple = (0, 1, 2)
  per_batch: dict = dataclasses.field(default_factory=dict)  # batch -> its own overrides


# ----------------------------------------------------------------------------------------------
# Runs.


def _quick_runs(scale, steps):
  del scale, steps
  return [
      Run("AdamW", "adamw", 3e-3),
      Run("AdEMAMix", "ademamix", 3e-3, {"b3": 0.999, "alpha": 2.0}),
      Run("Simplified-AdEMAMix", "simplified_ademamix", 3e-5, {"b1": 0.99, "alpha": 2.0}),
      Run("SF-AdamW", "schedule_free_adamw", 5e-3),
      Run("MARS-AdamW", "mars_adamw", 3e-3),
      Run("Lion", "lion", 1e-3),
      Run("AM-AdamW", "am_adamw", 3e-3),
      Run("MADA", "mada", 3e-3),
  ]


# MADA Fig. 8 spans beta1 in [0.01, 0.99] and beta2 in [0.501, 0.99]; five values of each.
MADA_GRID_B1 = (0.05, 0.3, 0.55, 0.8, 0.99)
MADA_GRID_B2 = (0.501, 0.65, 0.8, 0.9, 0.99)
MADA_NOISE_POINT = (0.8, 0.99)  # run with every cpu seed: the seed-to-seed noise of the grid


def _mada_grid(scale, steps, grid=(MADA_GRID_B1, MADA_GRID_B2)):
  del steps
  lr = 1e-3 if scale == "full" else 3e-3
  runs = []
  for b1 in grid[0]:
    for b2 in grid[1]:
      kw = {"b1": b1, "b2": b2}
      seeds = None if (b1, b2) == MADA_NOISE_POINT else (0,)
      hyper = {**kw, "hyper_lr": 2.5e-3, "hyper_momentum": 0.5}
      runs += [Run(f"Adam b=({b1},{b2})", "adamw", lr, dict(kw), seeds=seeds),
               Run(f"HyperAdam b=({b1},{b2})", "hyperadam", lr, dict(hyper), seeds=seeds),
               Run(f"MADA b=({b1},{b2})", "mada", lr, dict(hyper), seeds=seeds)]
  return runs


def slow_ema_beta(steps: int) -> float:
  """AdEMAMix's b3 for a run of ``steps``: 0.9999 (time constant 1/(1-b3) = 10k steps) belongs to
  Pagliardini et al.'s 256k-step runs; keeping 1/(1-b3) at the same fraction of the run gives
  1 - b3 = 25.6 / steps (0.9744 at 1000 steps), and at least 0.95 (above the fast b1 = 0.9) for
  runs shorter than 512 steps."""
  return max(0.95, 1.0 - 25.6 / steps)


def _accel_runs(scale, steps):
  """AdamW, AdEMAMix, Simplified-AdEMAMix, SF-AdamW. Simplified-AdEMAMix takes AdEMAMix's
  coefficients through the exact equivalence of the two without warmups (docs/ademamix.md):
  b1_S = b3, alpha_S = 1 / (alpha (1 - b3)), lr_S = lr alpha (1 - b3), the decay per step
  lr * weight_decay kept."""
  lr, alpha = (6e-4, 8.0) if scale == "full" else (3e-3, 8.0)
  b3 = slow_ema_beta(steps)
  ratio = alpha * (1 - b3)
  return [
      Run("AdamW", "adamw", lr),
      Run("AdEMAMix", "ademamix", lr,
          {"b3": b3, "alpha": alpha, "alpha_warmup": steps, "b3_warmup": steps}),
      Run("Simplified-AdEMAMix", "simplified_ademamix", lr * ratio,
          {"b1": b3, "alpha": 1 / ratio, "b1_warmup": steps},
          overrides={"optim.weight_decay": 0.1 / ratio}),
      Run("SF-AdamW", "schedule_free_adamw", 2e-3 if scale == "full" else 5e-3),
  ]


AM_TABLE6 = {"60m": (4.02, 3.95), "100m": (3.87, 3.79)}  # (AdamW, AM-AdamW) validation loss


def _am_runs(scale, steps, size="60m"):
  del steps
  lr = 1e-3 if scale == "full" else 1e-2
  adamw, am = AM_TABLE6[size]
  return [Run("AdamW, warmup", "adamw", lr, paper=adamw),
          Run("AdamW, no warmup", "adamw", lr, overrides={"optim.warmup": 0}),
          Run("AM-AdamW, warmup", "am_adamw", lr, paper=am),
          Run("AM-AdamW, no warmup", "am_adamw", lr, overrides={"optim.warmup": 0})]


# MADA Table 2 (GPT-2 124M on OpenWebText, final validation loss, one seed each).
MADA_TABLE2 = {"Adam": 2.8956, "Adan": 2.8896, "HyperAdam": 2.8950, "Lion": 2.8892,
               "AVGrad": 2.8895, "MADA": 2.8806}


def _mada_owt_runs(scale, steps):
  """Table 2's six optimizers with the official code's settings (experiments/lm/recipes.py)."""
  del scale, steps
  hyper_lr, frozen = recipes.MADA_OWT_HYPER_LR, {"freeze_steps": 50}
  paper = MADA_TABLE2
  return [Run("Adam", "adamw", 6e-4, paper=paper["Adam"]),
          Run("Adan", "adan", 6e-4, {"b1": 0.98, "b2": 0.92, "b3": 0.99}, paper=paper["Adan"]),
          Run("HyperAdam", "hyperadam", 6e-4,
              {"hyper_lr": {k: hyper_lr[k] for k in ("b1", "b2")}, **frozen},
              paper=paper["HyperAdam"]),
          Run("Lion", "lion", 1.5e-4, {"b1": 0.9, "b2": 0.99}, paper=paper["Lion"],
              overrides={"optim.kwargs": {}}),  # Lion has no eps
          Run("AVGrad", "avgrad", 6e-4, paper=paper["AVGrad"]),
          Run("MADA", "mada", 6e-4, {"b3": 0.9, "rho": 0.0, "hyper_lr": dict(hyper_lr), **frozen},
              paper=paper["MADA"])]


# The full MADA Fig. 8 grid of the official grid_search.py: 25 x 11 = 275 points per method.
MADA_FULL_GRID_B1 = (0.01, 0.05, 0.10, 0.125, 0.175, 0.225, 0.25, 0.30, 0.35, 0.375, 0.425, 0.475,
                     0.50, 0.55, 0.60, 0.625, 0.675, 0.725, 0.75, 0.80, 0.85, 0.875, 0.925, 0.975,
                     0.99)
MADA_FULL_GRID_B2 = (0.501, 0.55, 0.60, 0.65, 0.70, 0.75, 0.80, 0.85, 0.90, 0.95, 0.99)


# ----------------------------------------------------------------------------------------------
# Claims (written before the runs; the likely reason for a miss is part of the claim).


def _claim(claim, paper, ours, verdict, why_ok, why_not):
  """A claim row; ``why_not`` (the likely reason for a miss, written before the runs) is shown
  unless the claim reproduced."""
  return V.claim_row(claim, paper, ours, verdict,
                     why_ok if verdict == "reproduced" else "likely: " + why_not)


def _accel_claims(stats):
  small, large = sorted({b for _, b in stats})
  s = lambda label, batch: stats[(label, batch)]  # noqa: E731
  rows = []
  others = ("AdamW", "Simplified-AdEMAMix", "SF-AdamW")
  parts = [V.lower(s("AdEMAMix", small), s(o, small)) for o in others]
  rows.append(_claim(
      f"AdEMAMix is the best of the four at small batch ({small})", "Figs. 1-3 (curves)",
      ", ".join(f"{o} {s(o, small)}" for o in ("AdEMAMix",) + others), V.combine(parts),
      "lowest mean, beyond two standard errors of each other optimizer",
      "the slow EMA has a time constant of ~25 steps at this horizon, close to the fast one: "
      "little of AdEMAMix's long memory is left at 1k steps"))
  parts = [V.lower(s(a, small), s("AdamW", small)) for a in ("AdEMAMix", "Simplified-AdEMAMix")]
  rows.append(_claim(
      f"accelerated methods (AdEMAMix, Simplified-AdEMAMix) beat AdamW at small batch ({small})",
      "Figs. 1-3", f"AdamW {s('AdamW', small)}; AdEMAMix {s('AdEMAMix', small)}; "
      f"Simplified {s('Simplified-AdEMAMix', small)}", V.combine(parts),
      "both below AdamW beyond the noise",
      "no learning-rate tuning per optimizer at this scale (one rate each, from a rule)"))
  gaps = {}
  for batch in (small, large):
    best = min(("AdEMAMix", "Simplified-AdEMAMix"), key=lambda a: s(a, batch).mean)
    a, b = s("AdamW", batch), s(best, batch)
    gaps[batch] = V.Stat(a.mean - b.mean, V.standard_error(a, b) * np.sqrt(min(a.n, b.n)),
                         min(a.n, b.n))
  rows.append(_claim(
      f"the advantage over AdamW shrinks from batch {small} to batch {large}", "Figs. 1-3",
      f"AdamW - best accelerated: {gaps[small]} at {small}, {gaps[large]} at {large}",
      V.lower(gaps[large], gaps[small]), "the gap is smaller at the larger batch, beyond the noise",
      f"a batch of {large} x 64 bytes is far below the paper's 1M tokens: both batches may be in "
      "the noise-dominated regime"))
  rows.append(_claim(
      f"SF-AdamW is worse than AdamW at large batch ({large})", "Fig. 2 (curves)",
      f"SF-AdamW {s('SF-AdamW', large)}, AdamW {s('AdamW', large)}",
      V.lower(s("AdamW", large), s("SF-AdamW", large)), "SF-AdamW's loss is higher beyond the noise",
      "the paper's large batch is 1M tokens per step; ours is a few thousand bytes"))
  parts = [V.matches(s("Simplified-AdEMAMix", b), s("AdEMAMix", b), 0.01) for b in (small, large)]
  rows.append(_claim(
      "Simplified-AdEMAMix matches AdEMAMix at both batch sizes (within 0.01 nats or the noise)",
      "Figs. 1-3", "; ".join(f"batch {b}: {s('Simplified-AdEMAMix', b)} vs {s('AdEMAMix', b)}"
                             for b in (small, large)), V.combine(parts),
      "within 0.01 nats or two standard errors at both batches",
      "the equivalence is exact only without AdEMAMix's alpha/b3 warmups and with its b1 = 0"))
  return rows


def _grid_points(stats, method):
  return {tuple(float(x) for x in re.findall(r"[\d.]+", label.split("=")[1])): st.mean
          for (label, _), st in stats.items() if label.startswith(method + " ")}


def _mada_claims(stats):
  adam, hyper, mada = (_grid_points(stats, m) for m in ("Adam", "HyperAdam", "MADA"))
  points = sorted(adam)
  noise = max(st.std for (label, _), st in stats.items() if st.n > 1)
  below = lambda a, b: np.mean([a[p] < b[p] for p in points])  # noqa: E731
  clear = lambda a, b: np.mean([a[p] < b[p] - 2 * noise for p in points])  # noqa: E731
  spread = lambda grid: max(grid.values()) - min(grid.values())  # noqa: E731
  mean = {k: V.Stat.of(list(v.values())) for k, v in (("Adam", adam), ("HyperAdam", hyper),
                                                      ("MADA", mada))}
  rows = [
      _claim(f"MADA's final train loss is below Adam's on most of the grid ({len(points)} points)",
             "97.8% of 275 points", f"{below(mada, adam):.0%} ({clear(mada, adam):.0%} by more than "
             f"2 x the seed std {noise:.4f})", V.fraction(below(mada, adam), 0.978),
             "MADA lower at nearly every point",
             "MADA's learned coefficients move by ~hyper_lr x steps; in 600 steps they stay near "
             "their Adam start, so MADA behaves like Adam at most points"),
      _claim("MADA's final train loss is below HyperAdam's on most of the grid",
             "85.8% of 275 points", f"{below(mada, hyper):.0%}", V.fraction(below(mada, hyper), 0.858),
             "MADA lower at nearly as many points as in the paper",
             "the same short horizon: the extra coefficients (b3, rho, c, gamma) barely move"),
      _claim("grid mean: MADA < HyperAdam < Adam", "0.684 < 0.698 < 0.812",
             f"MADA {mean['MADA']}, HyperAdam {mean['HyperAdam']}, Adam {mean['Adam']} "
             "(mean ± std over the grid)",
             V.combine([V.signed(mean["HyperAdam"].mean - mean["MADA"].mean, 2 * noise),
                        V.signed(mean["Adam"].mean - mean["HyperAdam"].mean, 2 * noise)]),
             "both orderings beyond twice the seed noise",
             "the paper's gap comes from the bad corners of the grid (Adam > 0.8 on 114/275), "
             "where learning b1, b2 over 5k steps helps most"),
      _claim("learning the coefficients removes Adam's bad corners (spread over the grid)",
             "max - min: Adam 1.40, MADA 0.21",
             f"max - min: Adam {spread(adam):.4f}, HyperAdam {spread(hyper):.4f}, MADA "
             f"{spread(mada):.4f}", V.signed(spread(adam) - spread(mada), 2 * noise),
             "MADA's spread is smaller than Adam's beyond the noise",
             "too few steps for the coefficients to leave a bad start"),
  ]
  return rows


def _am_claims(stats, size="60m", why="a different corpus and a 0.1M model, 1k steps"):
  s = lambda label: stats[(label, next(b for (lab, b) in stats if lab == label))]  # noqa: E731
  adamw, am = AM_TABLE6[size]
  return [
      _claim("AM-AdamW's validation loss is below AdamW's (with warmup)",
             f"Table 6 (LLaMA-{size.upper()}): {am} vs {adamw}",
             f"{s('AM-AdamW, warmup')} vs {s('AdamW, warmup')}",
             V.lower(s("AM-AdamW, warmup"), s("AdamW, warmup")), "lower beyond the noise",
             why),
      _claim("AM-AdamW is below AdamW without warmup too", "Fig. 6 (curves)",
             f"{s('AM-AdamW, no warmup')} vs {s('AdamW, no warmup')}",
             V.lower(s("AM-AdamW, no warmup"), s("AdamW, no warmup")), "lower beyond the noise",
             "a different corpus and a 0.1M model"),
      _claim("AdamW without warmup trains worse than with warmup", "Fig. 6 (curves)",
             f"{s('AdamW, no warmup')} vs {s('AdamW, warmup')}",
             V.lower(s("AdamW, warmup"), s("AdamW, no warmup")), "worse beyond the noise",
             "a 2-layer 0.1M model at lr 1e-2 may not be unstable enough to need warmup"),
      _claim("AM-AdamW without warmup matches AdamW with warmup (within 0.02 nats or the noise)",
             "Fig. 6 (curves)", f"{s('AM-AdamW, no warmup')} vs {s('AdamW, warmup')}",
             V.matches(s("AM-AdamW, no warmup"), s("AdamW, warmup"), 0.02), "within the tolerance",
             "the warmup matters more (or less) at this scale than in the paper"),
  ]


def _mada_owt_claims(stats):
  s = {label: st for (label, _), st in stats.items()}
  others = [k for k in MADA_TABLE2 if k != "MADA"]
  one_seed = "one seed per optimizer as in the paper, so any difference decides"
  return [
      _claim("MADA has the lowest final validation loss of the six", "Table 2: MADA 2.8806, "
             "next Lion 2.8892", ", ".join(f"{k} {s[k]}" for k in MADA_TABLE2),
             V.combine([V.lower(s["MADA"], s[k]) for k in others]),
             f"MADA lowest ({one_seed})",
             "the hypergradient is formed from the whole accumulated gradient (the code's from one "
             "microbatch), and the val split's documents differ; the paper's margins (0.009 to "
             "the next) are within typical seed-to-seed spread of GPT-2 runs"),
      _claim("every alternative to Adam ends below Adam", "Table 2: all five below 2.8956",
             ", ".join(f"{k} {s[k]}" for k in others),
             V.combine([V.lower(s[k], s["Adam"]) for k in others if k != "Adam"]),
             f"all five below Adam ({one_seed})",
             "HyperAdam's paper margin is 0.0006: a seed's noise decides it"),
      _claim("HyperAdam matches Adam (within 0.002 nats)", "Table 2: 2.8950 vs 2.8956",
             f"{s['HyperAdam']} vs {s['Adam']}", V.matches(s["HyperAdam"], s["Adam"], 0.002),
             "within 0.002", "learning b1 and b2 alone moved the loss at our settings"),
  ]


PRESETS = {
    "quick": Preset("tiny", {"train.steps": 300, "eval.interval": 100, "eval.tokens": 8192},
                    _quick_runs, metric_note="no paper number at this scale"),
    "mada-shakespeare": Preset(
        "shakespeare-char", {"optim.kwargs.eps": 1e-8}, _mada_grid, metric="final train loss",
        metric_note=("paper (MADA Fig. 8, 275-point grid, 5k steps, 10.7M model, final train "
                     "loss): mean Adam 0.812, HyperAdam 0.698, MADA 0.684; best Adam 0.604 at "
                     "(0.875, 0.99), best MADA 0.595 at (0.80, 0.99); Adam at (0.99, 0.501): "
                     "2.003. The paper runs one seed per grid point; so do we, and the point "
                     f"{MADA_NOISE_POINT} runs every seed to measure the seed-to-seed noise. "
                     "Hypergradients from the unclipped gradient (the official code)"),
        claims=_mada_claims,
        cpu={"model": "tiny", "train.steps": 600, "train.batch_size": 16, "train.seq_len": 64,
             "eval.interval": 200, "eval.tokens": 8192, "optim.warmup": 12}),
    "accel-batch": Preset(
        "gpt2-124m", {"train.steps": 20_000}, _accel_runs,
        batch_sizes=(32, 512),
        metric_note=("Morwani et al. report curves, not numbers: AdEMAMix best, accelerated "
                     "methods ahead of AdamW at small batch, the gap shrinking at large batch, "
                     "SF-AdamW weak at large batch, Simplified-AdEMAMix = AdEMAMix. No learning "
                     "rate is tuned per optimizer: AdamW's and SF-AdamW's from the reference setups, "
                     "Simplified-AdEMAMix by the exact AdEMAMix mapping"),
        claims=_accel_claims,
        cpu={"model": "tiny", "train.steps": 1000, "train.seq_len": 64, "eval.interval": 250,
             "eval.tokens": 16_384, "optim.warmup": 50, "batch_sizes": (8, 32)}),
    "am-warmup": Preset(
        "llama-60m", {}, _am_runs,
        metric_note=("paper Table 6 (LLaMA-60M, C4, 1B tokens, warmup regime not stated; "
                     "validation loss): AdamW 4.02, AM-AdamW 3.95; ours is a different corpus "
                     "and scale, so compare orderings, not values"),
        claims=_am_claims,
        cpu={"model": "tiny-llama", "train.steps": 1000, "train.batch_size": 16,
             "train.seq_len": 64, "eval.interval": 250, "eval.tokens": 16_384,
             "optim.warmup": 100}),
    # The papers' recipes (experiments/lm/recipes.py), at --scale full only.
    "mada-gpt2-owt": Preset(
        "mada-gpt2-owt", {}, _mada_owt_runs, seeds=(5000,),
        metric_note=("paper: MADA Table 2 (GPT-2 124M, OpenWebText, 49.2B tokens, final val loss "
                     "on the whole val split, one seed each)"),
        claims=_mada_owt_claims),
    "mada-shakespeare-char": Preset(
        "mada-shakespeare-char", {},
        lambda scale, steps: _mada_grid(scale, steps, (MADA_FULL_GRID_B1, MADA_FULL_GRID_B2)),
        seeds=(1,), metric="final train loss",
        metric_note=("paper: MADA Fig. 8 (275-point grid, 5k steps, tiny-shakespeare characters, "
                     "dropout 0.2, final train loss over 200 random batches): mean Adam 0.812, "
                     "HyperAdam 0.698, MADA 0.684; one seed (1) per point as the code"),
        claims=_mada_claims),
    **{f"am-llama-{size}-c4": Preset(
        f"am-llama-{size}-c4", {}, functools.partial(_am_runs, size=size),
        metric_note=(f"paper: Topollai & Choromanska Table 6 (LLaMA-{size.upper()}, C4-en, 1B "
                     f"tokens, validation loss): AdamW {AM_TABLE6[size][0]}, AM-AdamW "
                     f"{AM_TABLE6[size][1]}; the warmup regime of the numbers is not stated"),
        claims=functools.partial(_am_claims, size=size,
                                 why="one seed; GaLore's template assumed (the paper's code is "
                                     "not released)"))
       for size in ("60m", "100m")},
    "accel-150m-c4": Preset(
        "accel-150m-c4-32k", {}, _accel_runs, batch_sizes=(64, 2048),
        per_batch={2048: {k: recipes.RECIPES["accel-150m-c4-1m"].config[k]
                          for k in ("train.steps", "optim.warmup", "eval.interval")}},
        metric_note=("Morwani et al. report curves, not numbers (Figs. 1-3, 150M, 32k and 1M "
                     "tokens per step); setup ours (experiments/lm/recipes.py)"),
        claims=_accel_claims),
}


# ----------------------------------------------------------------------------------------------
# Running, resuming and reporting.


def _slug(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_")


def _thin(history: list[dict]) -> list[dict]:
  every = max(1, len(history) // HISTORY_POINTS)
  return [{k: r[k] for k in ("step", "loss", "val_loss") if k in r}
          for i, r in enumerate(history)
          if i % every == every - 1 or "val_loss" in r or i == len(history) - 1]


def _run_once(settings: dict, config: str, path: str) -> dict:
  """Trains one setting, or reads it back from ``path`` if it finished with the same settings."""
  if os.path.exists(path):
    with open(path) as f:
      done = json.load(f)
    if done["settings"] == json.loads(json.dumps(settings)):
      return done
  cfg = train_lib.build_config(config, settings)
  cfg["log.metrics"], cfg["log.progress"] = None, sys.stderr.isatty()
  summary = train_lib.train(cfg)
  train_loss = (summary["train_eval_loss"] if summary["train_eval_loss"] is not None
                else summary["train_loss"])
  done = {"settings": settings, "train_loss": train_loss,
          "val_loss": summary["val_loss"], "tokens_per_s": summary["tokens_per_s"],
          "history": _thin(summary["history"])}
  os.makedirs(os.path.dirname(path), exist_ok=True)
  reporting.write_json(path, done)
  return done


@dataclasses.dataclass
class Planned:
  """One training run of a comparison: its setting, seed and where its result is kept."""
  run: Run
  batch: int
  seed: int
  settings: dict  # overrides of the preset's config
  path: str  # runs/<name>.json
  steps: int


def plan(name: str, scale: str, out: str | None = None, data_path: str | None = None,
         overrides_extra: dict | None = None, optimizers: tuple[str, ...] | None = None
         ) -> tuple[str, list[Planned], dict]:
  """The runs of a preset at a scale: (output folder, runs in order, the base config)."""
  preset = PRESETS[name]
  overrides = dict(preset.overrides)
  batch_sizes, seeds = preset.batch_sizes, preset.seeds
  if scale == "cpu":
    if not preset.cpu:
      raise train_lib.ConfigError(f"preset {name!r} is a paper recipe: it runs at --scale full "
                                  "(its CPU-scale counterpart is in docs/reproductions.md)")
    cpu = dict(preset.cpu)
    batch_sizes = cpu.pop("batch_sizes", batch_sizes)
    seeds = preset.cpu_seeds
    overrides.update(cpu)
  overrides.update(overrides_extra or {})
  if data_path:
    overrides["data.path"] = data_path
  out = out or os.path.join("results", "lm", name + ("-cpu" if scale == "cpu" else ""))
  cfg0 = train_lib.build_config(preset.config, overrides)
  by_batch = {}
  for batch in batch_sizes:
    cfg = train_lib.build_config(preset.config, {**overrides, **preset.per_batch.get(batch, {})})
    by_batch[batch] = [r for r in preset.runs(scale, cfg["train.steps"])
                       if optimizers is None or r.optimizer in optimizers]
  planned = []
  for i in range(len(by_batch[batch_sizes[0]])):  # each run at every batch size, then the next
    for batch in batch_sizes:
      run_b = by_batch[batch][i]
      for seed in (run_b.seeds if run_b.seeds is not None and scale == "cpu" else seeds):
        settings = {**overrides, **preset.per_batch.get(batch, {}),
                    "optim.name": run_b.optimizer, "optim.lr": run_b.lr, "train.seed": seed,
                    **run_b.overrides}
        if batch:
          settings["train.batch_size"] = batch
        settings.update({f"optim.kwargs.{k}": v for k, v in run_b.kwargs.items()})
        batch_size = settings.get("train.batch_size", cfg0["train.batch_size"])
        path = os.path.join(out, "runs", _slug(f"{run_b.label}, batch {batch_size} seed {seed}")
                            + ".json")
        steps = settings.get("train.steps", cfg0["train.steps"])
        planned.append(Planned(run_b, batch_size, seed, settings, path, steps))
  return out, planned, cfg0


def run_preset(name: str, scale: str, out: str | None = None, data_path: str | None = None,
               overrides_extra: dict | None = None,
               optimizers: tuple[str, ...] | None = None) -> list[dict]:
  """Runs every (run, batch, seed) of a preset (skipping those already in ``out/runs``); writes
  table.{md,csv} with the claims' verdicts, runs.csv, curves.{png,json} (and the grid's heat map).

  ``optimizers``: only the runs of these registry names (default: all of the preset's).
  Returns the table's rows (mean and std over seeds per run and batch)."""
  preset = PRESETS[name]
  out, planned, cfg0 = plan(name, scale, out, data_path, overrides_extra, optimizers)
  raw, curves = [], {}
  for p in planned:
    key = f"{p.run.label}, batch {p.batch}"
    done = _run_once(p.settings, preset.config, p.path)
    curves[f"{key}, seed {p.seed}"] = done["history"]
    raw.append({"run": p.run.label, "optimizer": p.run.optimizer, "batch": p.batch,
                "seed": p.seed, "lr": p.run.lr, "steps": p.steps,
                "final train loss": done["train_loss"], "final val loss": done["val_loss"],
                "tokens/s": done["tokens_per_s"],  # the paper's number as printed there
                "paper": None if p.run.paper is None else str(p.run.paper)})
    print(f"{key}, seed {p.seed}: train {done['train_loss']:.4f}, val {done['val_loss']:.4f}",
          file=sys.stderr)
  rows = _aggregate(raw)
  stats = {(r["run"], r["batch"]): V.Stat.of(
      [x[preset.metric] for x in raw if (x["run"], x["batch"]) == (r["run"], r["batch"])])
           for r in rows}
  claims = preset.claims(stats) if preset.claims and optimizers is None else []
  batches = list(dict.fromkeys(p.batch for p in planned))
  seeds = list(dict.fromkeys(p.seed for p in planned))
  steps = sorted({p.steps for p in planned})
  notes = [f"scale: {scale} — model {cfg0['model']}, {'/'.join(map(str, steps))} steps, seq_len "
           f"{cfg0['train.seq_len']}, batch sizes {batches}, seeds {seeds}, corpus "
           f"{cfg0['data.path'] or 'Shakespeare (byte level)'}",
           "final train loss = " + ("the mean loss without dropout over "
                                    f"{cfg0['eval.train_batches']} random train batches "
                                    "(nanoGPT's estimate_loss)" if cfg0["eval.train_batches"]
                                    else "mean of the last 10 steps") +
           "; val loss at the schedule-free average for SF optimizers; mean ± std over seeds; "
           f"claims compare the {preset.metric}; verdict rules in experiments/verdicts.py",
           preset.metric_note]
  os.makedirs(out, exist_ok=True)
  reporting.write_table(os.path.join(out, "table"), rows, title=f"LM comparison: {name}",
                        notes=notes, claims=claims)
  reporting.write_table(os.path.join(out, "runs"), raw, title=f"LM comparison: {name}, every seed",
                        notes=notes[:1])
  plot(curves, os.path.join(out, "curves.png"), title=f"{name} ({scale} scale)")
  if preset.claims is _mada_claims:
    heatmap(stats, os.path.join(out, "heatmap.png"), title=f"final train loss ({scale} scale)")
  with open(os.path.join(out, "curves.json"), "w") as f:  # for notebooks/05_lm_comparison
    json.dump(curves, f)
  return rows


def _aggregate(raw: list[dict]) -> list[dict]:
  rows = []
  for key in dict.fromkeys((r["run"], r["batch"]) for r in raw):
    group = [r for r in raw if (r["run"], r["batch"]) == key]
    train, val = (V.Stat.of([r[m] for r in group]) for m in ("final train loss", "final val loss"))
    rows.append({"run": key[0], "optimizer": group[0]["optimizer"], "batch": key[1],
                 "seeds": len(group), "lr": group[0]["lr"], "steps": group[0]["steps"],
                 "final train loss": train.mean, "train std": train.std,
                 "final val loss": val.mean, "val std": val.std, "paper": group[0]["paper"],
                 "tokens/s": float(np.median([r["tokens/s"] for r in group]))})
  return rows


def plot(curves: dict, path: str, title: str):
  plt = reporting.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
  for key, history in curves.items():
    steps = np.array([r["step"] for r in history])
    loss = np.array([r["loss"] for r in history])
    window = max(1, len(loss) // 50)
    smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
    line, = axes[0].plot(steps[window - 1:], smooth, label=key, lw=1)
    val = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    if val:
      axes[1].plot(*zip(*val), "o-", color=line.get_color(), label=key, ms=3)
  axes[0].set(xlabel="step", ylabel="train loss (smoothed)", title=title)
  axes[1].set(xlabel="step", ylabel="validation loss", title="validation")
  if len(curves) <= 24:
    axes[1].legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def heatmap(stats: dict, path: str, title: str):
  """MADA Fig. 8's picture: final train loss over the (beta1, beta2) grid, one panel a method."""
  plt = reporting.pyplot()
  methods = ("Adam", "HyperAdam", "MADA")
  grids = {m: _grid_points(stats, m) for m in methods}
  b1s = sorted({p[0] for p in grids["Adam"]})
  b2s = sorted({p[1] for p in grids["Adam"]})
  values = {m: np.array([[g.get((b1, b2), np.nan) for b1 in b1s] for b2 in b2s])
            for m, g in grids.items()}
  finite = np.concatenate([v[np.isfinite(v)] for v in values.values()])
  vmin, vmax = np.min(finite), np.percentile(finite, 90)
  fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), layout="constrained")
  for ax, m in zip(axes, methods):
    image = ax.imshow(values[m], origin="lower", cmap="viridis", vmin=vmin, vmax=vmax,
                      aspect="auto")
    for i in range(len(b2s)):
      for j in range(len(b1s)):
        value = values[m][i, j]
        ax.text(j, i, f"{value:.3f}", ha="center", va="center", fontsize=7,
                color="k" if value > (vmin + vmax) / 2 else "w")
    ax.set(xticks=range(len(b1s)), xticklabels=[f"{b:g}" for b in b1s], yticks=range(len(b2s)),
           yticklabels=[f"{b:g}" for b in b2s], xlabel="initial beta1",
           title=f"{m}: grid mean {np.nanmean(values[m]):.4f}")
  axes[0].set_ylabel("initial beta2")
  fig.colorbar(image, ax=axes, shrink=0.9, label=f"{title}; colours clipped at p90")
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _dry_run(args, scale) -> int:
  from experiments.lm import dry_run  # pylint: disable=import-outside-toplevel
  try:
    _, planned, _ = plan(args.preset, scale, data_path=args.data)
    rows = dry_run.dry_run(PRESETS[args.preset].config, planned, topology=args.topology,
                           assume=args.assume, cache_dir=args.cache_dir or dry_run.CACHE)
  except (train_lib.ConfigError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  where = args.assume or args.topology or f"{jax.device_count()}-{jax.devices()[0].platform}"
  out = args.out or os.path.join("results", "scale", "recipes",
                                 f"{args.preset}_{where.replace(':', '-')}")
  print(dry_run.write(rows, out, f"Dry run: {args.preset} ({scale} scale) on {where}"))
  return 0


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="quick", choices=sorted(PRESETS))
  parser.add_argument("--scale", default=None, choices=("full", "cpu"),
                      help="default: full for quick, cpu for the others without an accelerator")
  parser.add_argument("--data", default=None, help="a text file or folder (default Shakespeare)")
  parser.add_argument("--out", default=None)
  parser.add_argument("--dry-run", action="store_true",
                      help="estimate tokens, steps, step time, wall time and memory per run "
                           "(compiles; trains nothing): experiments/lm/dry_run.py")
  parser.add_argument("--topology", default=None,
                      help="with --dry-run: a TPU slice such as v5e:4x4 (deviceless compile)")
  parser.add_argument("--assume", default=None, metavar="DEVICE:N",
                      help="with --dry-run: N GPUs not present (H100, H200, A100), analytic")
  parser.add_argument("--cache-dir", default=None,
                      help="with --dry-run: compiled figures kept here (results/scale/recipes)")
  args = parser.parse_args(argv)
  scale = args.scale or ("full" if args.preset == "quick" or not PRESETS[args.preset].cpu
                         else "cpu")
  if args.dry_run:
    return _dry_run(args, scale)
  # Seeds of one setting compile the same program: keep compiled steps between runs.
  jax.config.update("jax_compilation_cache_dir", str(data_lib.cache_dir() / "xla"))
  try:
    rows = run_preset(args.preset, scale, args.out, args.data)
  except (train_lib.ConfigError, train_lib.CheckpointError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for r in rows:
    print(f"{r['run']:>28s}  batch {r['batch']:>4}  train {r['final train loss']:.4f}  "
          f"val {r['final val loss']:.4f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
