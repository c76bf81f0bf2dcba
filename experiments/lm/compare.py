"""Optimizer grids on the LM task: tables (CSV + Markdown) and curves, with the papers' numbers.

    python -m experiments.lm.compare --preset quick                 # the README's main job
    python -m experiments.lm.compare --preset accel-batch --scale cpu

Presets: ``quick`` (tiny GPT on Shakespeare, one run per optimizer family, CPU minutes),
``mada-shakespeare`` (Adam vs HyperAdam vs MADA over a beta1 x beta2 grid subset; MADA Fig. 8),
``accel-batch`` (AdamW, AdEMAMix, Simplified-AdEMAMix, SF-AdamW, MARS, Lion at a small and a large
batch; Morwani et al.), ``am-warmup`` (LLaMA, AdamW and AM-AdamW with and without warmup;
Topollai & Choromanska Table 6). ``--scale full`` is the paper-like setting (for an accelerator);
``--scale cpu`` shrinks model, steps and batches so that it runs on a laptop CPU. Results go to
``results/lm/<preset>`` (``results/lm/<preset>-cpu`` at CPU scale): table.{md,csv}, curves.png
and curves.json; every table states its scale, the command and, where a paper published a number
for the setting, that number.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

import numpy as np

from experiments import reporting
from experiments.lm import train as train_lib


@dataclasses.dataclass
class Run:
  label: str
  optimizer: str
  lr: float
  kwargs: dict = dataclasses.field(default_factory=dict)
  overrides: dict = dataclasses.field(default_factory=dict)
  paper: Any = None  # the paper's number for this setting, if any


@dataclasses.dataclass
class Preset:
  config: str
  overrides: dict
  runs: list
  batch_sizes: tuple = (None,)
  seeds: tuple = (0,)
  metric_note: str = ""
  cpu: dict = dataclasses.field(default_factory=dict)  # overrides at --scale cpu
  cpu_lr: dict = dataclasses.field(default_factory=dict)  # optimizer -> lr at --scale cpu


def _quick_runs():
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


def _mada_grid():
  runs = []
  for b1, b2 in ((0.9, 0.99), (0.9, 0.95), (0.7, 0.8), (0.5, 0.95), (0.99, 0.501)):
    kw = {"b1": b1, "b2": b2}
    runs += [Run(f"Adam b=({b1},{b2})", "adamw", 1e-3, dict(kw)),
             Run(f"HyperAdam b=({b1},{b2})", "hyperadam", 1e-3,
                 {**kw, "hyper_lr": 2.5e-3, "hyper_momentum": 0.5}),
             Run(f"MADA b=({b1},{b2})", "mada", 1e-3,
                 {**kw, "hyper_lr": 2.5e-3, "hyper_momentum": 0.5})]
  return runs


PRESETS = {
    "quick": Preset("tiny", {"train.steps": 300, "eval.interval": 100, "eval.batches": 8},
                    _quick_runs(), metric_note="no paper number at this scale"),
    "mada-shakespeare": Preset(
        "shakespeare-char", {"optim.kwargs.eps": 1e-8}, _mada_grid(),
        metric_note=("paper (MADA Fig. 8, 275-point grid, final train loss): mean Adam 0.812, "
                     "HyperAdam 0.698, MADA 0.684; best Adam 0.604 at (0.875, 0.99), best MADA "
                     "0.595 at (0.80, 0.99); Adam at (0.99, 0.501): 2.003"),
        cpu={"model": "tiny", "train.steps": 400, "train.batch_size": 16, "train.seq_len": 64,
             "eval.interval": 100, "eval.batches": 8, "optim.warmup": 20}),
    "accel-batch": Preset(
        "gpt2-124m", {"train.steps": 20_000},
        [Run("AdamW", "adamw", 6e-4), Run("AdEMAMix", "ademamix", 6e-4, {"alpha": 8.0}),
         Run("Simplified-AdEMAMix", "simplified_ademamix", 1e-5, {"b1": 0.99, "alpha": 100.0}),
         Run("SF-AdamW", "schedule_free_adamw", 2e-3), Run("MARS-AdamW", "mars_adamw", 3e-3),
         Run("Lion", "lion", 1.5e-4)],
        batch_sizes=(32, 512),
        metric_note=("Morwani et al. report curves, not numbers: "
                     "accelerated methods lead at small batch, the gap shrinks at large batch, "
                     "SF-AdamW is weak at large batch"),
        cpu={"model": "tiny", "train.steps": 400, "train.seq_len": 64, "eval.interval": 100,
             "eval.batches": 8, "optim.warmup": 20, "batch_sizes": (8, 64)},
        cpu_lr={"adamw": 3e-3, "ademamix": 3e-3, "simplified_ademamix": 3e-5,
                "schedule_free_adamw": 5e-3, "mars_adamw": 3e-3, "lion": 1e-3}),
    "am-warmup": Preset(
        "llama-60m", {},
        [Run("AdamW, warmup", "adamw", 1e-3, paper=4.02),
         Run("AdamW, no warmup", "adamw", 1e-3, overrides={"optim.warmup": 0}),
         Run("AM-AdamW, warmup", "am_adamw", 1e-3, paper=3.95),
         Run("AM-AdamW, no warmup", "am_adamw", 1e-3, overrides={"optim.warmup": 0})],
        metric_note=("paper Table 6 (LLaMA-60M, C4, 1B tokens, warmup regime not stated; "
                     "validation loss): AdamW 4.02, AM-AdamW 3.95; ours is a different corpus "
                     "and scale, so compare orderings, not values"),
        cpu={"model": "tiny-llama", "train.steps": 400, "train.batch_size": 16,
             "train.seq_len": 64, "eval.interval": 100, "eval.batches": 8,
             "optim.warmup": 40, "optim.lr": 1e-2}),
}


def run_preset(name: str, scale: str, out: str | None = None, data_path: str | None = None,
               overrides_extra: dict | None = None,
               optimizers: tuple[str, ...] | None = None) -> list[dict]:
  """Runs every (run, batch, seed) of a preset; writes table.{md,csv} and curves.png.

  ``optimizers``: only the runs of these registry names (default: all of the preset's)."""
  preset = PRESETS[name]
  overrides = dict(preset.overrides)
  batch_sizes = preset.batch_sizes
  if scale == "cpu":
    cpu = dict(preset.cpu)
    batch_sizes = cpu.pop("batch_sizes", batch_sizes)
    overrides.update(cpu)
  overrides.update(overrides_extra or {})
  if data_path:
    overrides["data.path"] = data_path
  rows, curves = [], {}
  runs = [r for r in preset.runs if optimizers is None or r.optimizer in optimizers]
  for run in runs:
    for batch in batch_sizes:
      for seed in preset.seeds:
        settings = {**overrides, "optim.name": run.optimizer, "train.seed": seed,
                    "log.progress": sys.stderr.isatty(), **run.overrides}
        if "optim.lr" not in run.overrides and "optim.lr" not in (preset.cpu if scale == "cpu"
                                                                   else {}):
          settings["optim.lr"] = (preset.cpu_lr.get(run.optimizer, run.lr) if scale == "cpu"
                                  else run.lr)
        if batch:
          settings["train.batch_size"] = batch
        settings.update({f"optim.kwargs.{k}": v for k, v in run.kwargs.items()})
        cfg = train_lib.build_config(preset.config, settings)
        cfg["log.metrics"] = None
        summary = train_lib.train(cfg)
        key = f"{run.label}, batch {cfg['train.batch_size']}, seed {seed}"
        curves[key] = summary["history"]
        rows.append({"run": run.label, "optimizer": run.optimizer,
                     "batch": cfg["train.batch_size"], "seed": seed, "lr": cfg["optim.lr"],
                     "steps": cfg["train.steps"], "final train loss": summary["train_loss"],
                     "final val loss": summary["val_loss"], "paper": run.paper,
                     "tokens/s": summary["tokens_per_s"]})
        print(f"{key}: train {summary['train_loss']:.4f}, val {summary['val_loss']:.4f}",
              file=sys.stderr)
  out = out or os.path.join("results", "lm", name + ("-cpu" if scale == "cpu" else ""))
  cfg0 = train_lib.build_config(preset.config, overrides)
  notes = [f"scale: {scale} — model {cfg0['model']}, {cfg0['train.steps']} steps, seq_len "
           f"{cfg0['train.seq_len']}, batch sizes {list(b or cfg0['train.batch_size'] for b in batch_sizes)}, "
           f"corpus {'Shakespeare (byte level)' if not data_path else data_path}",
           "final train loss = mean of the last 10 steps; val loss at the schedule-free average "
           "for SF optimizers", preset.metric_note]
  os.makedirs(out, exist_ok=True)
  reporting.write_table(os.path.join(out, "table"), rows, title=f"LM comparison: {name}",
                        notes=notes)
  plot(curves, os.path.join(out, "curves.png"), title=f"{name} ({scale} scale)")
  with open(os.path.join(out, "curves.json"), "w") as f:  # for notebooks/05_lm_comparison
    json.dump({k: [{m: r[m] for m in ("step", "loss", "val_loss") if m in r} for r in h]
               for k, h in curves.items()}, f)
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
  axes[1].legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="quick", choices=sorted(PRESETS))
  parser.add_argument("--scale", default=None, choices=("full", "cpu"),
                      help="default: full for quick, cpu for the others without an accelerator")
  parser.add_argument("--data", default=None, help="a text file or folder (default Shakespeare)")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  scale = args.scale or ("full" if args.preset == "quick" else "cpu")
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
