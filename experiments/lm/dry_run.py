"""What a comparison will cost, before anything is rented or trained (``compare --dry-run``).

    python -m experiments.lm.compare --preset mada-gpt2-owt --dry-run --topology v5e:4x4
    python -m experiments.lm.compare --preset am-llama-60m-c4 --dry-run        # devices present
    python -m experiments.lm.compare --preset mada-gpt2-owt --dry-run --assume H100:1

For every distinct program of a preset (an optimizer at a batch size), the training step is built
as training builds it and compiled, for the devices present or deviceless for a TPU topology
(``experiments.lm.aot``, libtpu), and the compiler's figures become per-run estimates:

- tokens and steps, from the configuration;
- the roofline step time: max(FLOPs / peak, bytes / bandwidth) for the forward/backward of a
  microbatch and for the optimizer update, as ``experiments.lm.aot`` computes it;
- the wall time of a run at that roofline (a lower bound for the program as compiled): steps x
  step time, plus the validation passes (``eval.tokens`` every ``eval.interval`` steps, at most
  the split holds, forward only: a third of a training microbatch's time per token) and the final
  train-split estimate (``eval.train_batches``); and the model's FLOPs at 40% MFU, the usual rule
  of thumb (optimistic where the compiled step's roofline MFU is lower: memory-bound steps);
- the memory per device of the compiled step (arguments + outputs - aliased + temporaries).

``--assume DEVICE:N`` estimates for N devices that are not here (H100, H200, A100; no compile):
the model's FLOPs at 40% MFU (of the TF32 peak for a float32 model, as the GPUs run float32
matmuls), and the memory of parameters, gradients and optimizer state only.

Compiled figures are kept per program in ``results/scale/recipes/`` under a digest of the lowered
program, the devices and the jax version: a dry run of an unchanged program reads them instead of
compiling again (the committed ones are those docs/reproductions.md quotes).
"""
from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import re
import sys

import jax
import numpy as np

from experiments import reporting
from experiments.lm import aot
from experiments.lm import config as config_lib
from experiments.lm import model as model_lib
from experiments.lm import step as step_lib

GIB = 2 ** 30
ASSUMED_MFU = 0.4
# Per GPU: memory (bytes), peak dense bf16 FLOP/s, HBM bandwidth (bytes/s), peak dense TF32
# FLOP/s (float32 matmuls); public spec sheets (SXM parts).
GPUS = {"H100": (80 * GIB, 989e12, 3.35e12, 495e12), "H200": (141 * GIB, 989e12, 4.8e12, 495e12),
        "A100": (80 * GIB, 312e12, 2.0e12, 156e12)}
CACHE = os.path.join("results", "scale", "recipes")


def _present_chip(devices):
  """(memory, peak FLOP/s, bandwidth) of the devices present, by their kind."""
  kind = devices[0].device_kind
  for name, spec in {**GPUS, **{f"TPU {k}": v for k, v in aot.CHIPS.items()}}.items():
    if name.lower() in kind.lower():
      return spec[:3]
  cores = os.cpu_count() or 1  # a CPU: the AVX2 FMA rate and a DDR4 channel pair
  return 16 * GIB, cores * 2.5e9 * 32 / len(devices), 40e9


# A Pallas (Mosaic) kernel's serialized body in the lowered text, base64.
_KERNEL_BODY = re.compile(r"(\\22body\\22: \\22)([A-Za-z0-9+/=]+)")


def _portable(text: str) -> str:
  """The lowered program without where JAX is installed: a Pallas kernel's serialized body (MLIR
  bytecode) names its source file by absolute path, and the bytecode's lengths change with it. So
  each body is replaced by a digest of its strings (op names, attributes, that path made
  relative); the kernel's operand shapes and name stay in the text around it. The same program
  then digests alike in any checkout and virtual environment."""
  root = os.path.dirname(os.path.dirname(jax.__file__)).encode()

  def strip(match):
    body = base64.b64decode(match.group(2) + "=" * (-len(match.group(2)) % 4))
    strings = b"\n".join(re.findall(rb"[ -~]{4,}", body)).replace(root, b"")
    return match.group(1) + hashlib.sha256(strings).hexdigest()
  return _KERNEL_BODY.sub(strip, text)


def _cache_key(cfg: dict, devices, label: str) -> str:
  program = step_lib.build_train_step(cfg, devices)
  with jax.set_mesh(program.mesh):
    text = program.step.lower(program.abstract_state, *program.abstract_batch()).as_text()
  return hashlib.sha256("\n".join([label, jax.__version__, _portable(text)]).encode()
                        ).hexdigest()[:16]


def compiled_figures(cfg: dict, label: str, devices, chip, baseline: dict | None,
                     cache_dir: str | None) -> dict:
  """``aot.analyse`` of ``cfg`` on ``devices``, read from ``cache_dir`` when the same program
  was compiled before (``source``: "compiled" or "cached")."""
  key = _cache_key(cfg, devices, label)
  path = cache_dir and os.path.join(cache_dir, f"{cfg['model']}_{cfg['optim.name']}_{key}.json")
  if path and os.path.exists(path):
    with open(path) as f:
      return {**json.load(f), "source": "cached"}
  result = aot.analyse(cfg, label, name=cfg["model"], baseline=baseline,
                       compile_step=baseline is None, devices=devices, chip=chip)
  result["program_key"] = key
  if path:
    os.makedirs(cache_dir, exist_ok=True)
    with open(path, "w") as f:
      json.dump(result, f, indent=1)
  return {**result, "source": "compiled"}


def wall_seconds(cfg: dict, figures: dict, micro_batch: int) -> float:
  """Steps at the roofline step time, plus validation and the train-split estimate."""
  seq, interval = cfg["train.seq_len"], cfg["eval.interval"]
  evals = math.ceil(cfg["train.steps"] / interval)
  eval_batches = math.ceil(math.ceil(cfg["eval.tokens"] / seq) / micro_batch)
  train_eval_batches = cfg["eval.train_batches"] * cfg["train.batch_size"] // micro_batch
  forward = figures["roofline_microbatch_s"] / 3
  return (cfg["train.steps"] * figures["roofline_step_s"]
          + (evals * eval_batches + train_eval_batches) * forward)


def _ideal_step_flops(cfg: dict) -> tuple[float, int]:
  mc = config_lib.model_config(cfg)
  n_params = model_lib.parameter_count(mc)
  tokens = cfg["train.batch_size"] * cfg["train.seq_len"]
  return model_lib.flops_per_token(mc, n_params, cfg["train.seq_len"]) * tokens, n_params


def _assumed(cfg: dict, device: str, count: int, step_flops: float, n_params: int) -> dict:
  """Analytic estimates for ``count`` GPUs of kind ``device`` (nothing compiled) from the step's
  ideal FLOPs; float32 models at the TF32 peak."""
  memory, bf16_peak, _, tf32_peak = GPUS[device]
  peak = tf32_peak if cfg["model.compute_dtype"] == "float32" else bf16_peak
  step_s = step_flops / (count * peak * ASSUMED_MFU)
  program = step_lib.build_train_step(cfg, jax.devices("cpu")[:1])
  state_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize
                    for x in jax.tree.leaves(program.abstract_state))
  grads = sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(program.abstract_state["params"]))
  return {"params": n_params, "devices": f"{count} x {device} (assumed)", "grad_accum": None,
          "memory_gib": (state_bytes + grads) / count / GIB, "memory_note": "state only",
          "fits": (state_bytes + grads) / count < memory, "roofline_step_s": None,
          "estimated_mfu": ASSUMED_MFU, "wall_h_roofline": None,
          "wall_h_at_40pct_mfu": cfg["train.steps"] * step_s * (1 + _eval_share(cfg)) / 3600,
          "source": "analytic"}


def _eval_share(cfg: dict) -> float:
  """Validation tokens (forward only, a third of a training token's cost) per training token."""
  per_run = (math.ceil(cfg["train.steps"] / cfg["eval.interval"]) * cfg["eval.tokens"]
             + cfg["eval.train_batches"] * cfg["train.batch_size"] * cfg["train.seq_len"])
  return per_run / (3 * cfg["train.steps"] * cfg["train.batch_size"] * cfg["train.seq_len"])


def _labels(runs) -> str:
  labels = list(dict.fromkeys(p.run.label for p in runs))
  return labels[0] + (f" and {len(labels) - 1} more" if len(labels) > 1 else "")


def dry_run(preset_config: str, planned: list, *, topology: str | None = None,
            assume: str | None = None, cache_dir: str | None = CACHE) -> list[dict]:
  """One row per distinct program of ``planned`` (compare.plan's runs): the estimates above."""
  if assume:
    device, _, count = assume.partition(":")
    if device not in GPUS or not count.isdigit() or int(count) < 1:
      raise config_lib.ConfigError(f"--assume must be DEVICE:N with DEVICE one of "
                                   f"{', '.join(GPUS)}, got {assume!r}")
  elif topology:
    devices, chip, label = aot.topology_devices(topology), None, topology
  else:
    devices = jax.devices()
    chip, label = _present_chip(devices), f"{len(devices)} x {devices[0].device_kind}"
  groups: dict[tuple, list] = {}
  for p in planned:
    groups.setdefault((p.run.optimizer, p.batch), []).append(p)
  rows, baselines = [], {}
  for (optimizer, batch), runs in sorted(groups.items(), key=lambda g: (g[0][1], g[0][0] != "adamw")):
    cfg = config_lib.build_config(preset_config, {**runs[0].settings, "data.path": None})
    step_flops, n_params = _ideal_step_flops(cfg)
    row = {"optimizer": optimizer, "runs": len(runs),
           "labels": _labels(runs), "batch": batch,
           "steps": cfg["train.steps"],
           "tokens": cfg["train.steps"] * batch * cfg["train.seq_len"],
           "step_pflop": step_flops / 1e15}
    try:
      if assume:
        row.update(_assumed(cfg, device, int(count), step_flops, n_params))
      else:
        figures = compiled_figures(cfg, label, devices, chip, baselines.get(batch), cache_dir)
        if optimizer == "adamw" or batch not in baselines:
          baselines.setdefault(batch, figures)
        peak = (chip or aot.CHIPS[topology.split(":")[0]])[1]
        mfu_step = step_flops / (len(devices) * peak * ASSUMED_MFU)
        row.update({"params": figures["params"], "devices": label,
                    "grad_accum": figures["grad_accum"], "memory_gib": figures["hbm_gib"],
                    "memory_note": figures["hbm_source"], "fits": figures["fits"],
                    "roofline_step_s": figures["roofline_step_s"],
                    "estimated_mfu": figures["estimated_mfu"],
                    "wall_h_roofline": wall_seconds(cfg, figures, figures["microbatch"]) / 3600,
                    "wall_h_at_40pct_mfu": cfg["train.steps"] * mfu_step
                    * (1 + _eval_share(cfg)) / 3600,
                    "source": figures["source"], "program": figures["program_key"]})
    except config_lib.ConfigError as e:
      row.update({"devices": label if not assume else assume, "source": f"error: {e}"})
    rows.append(row)
    print(json.dumps(row), file=sys.stderr, flush=True)
  return rows


def write(rows: list[dict], path: str, title: str) -> str:
  """``path``.{md,csv}; returns the Markdown."""
  totals = {k: sum(r[k] * r["runs"] for r in rows if r.get(k) is not None)
            for k in ("wall_h_roofline", "wall_h_at_40pct_mfu")}
  return reporting.write_table(path, rows, title=title, notes=[
      "estimates before training, per run, validation passes included: wall_h_roofline is the "
      "compiled step at its roofline (max of FLOPs / peak and bytes / bandwidth; a lower bound "
      "for this program), wall_h_at_40pct_mfu the model's FLOPs at 40% MFU (the usual rule of "
      "thumb; optimistic where the roofline MFU, estimated_mfu, is lower); memory_gib per "
      "device (for assumed devices: parameters, gradients and state only)",
      "whole comparison (every run and seed): " + (
          f"{totals['wall_h_roofline']:.1f} h at the roofline, " if any(
              r.get("wall_h_roofline") for r in rows) else "")
      + f"{totals['wall_h_at_40pct_mfu']:.1f} h at 40% MFU"])
