"""Memory traffic of every optimizer step, compiled for one TPU v5e chip without a TPU (issue 10).

The figures are the compiler's and deterministic (``benchmarks/step_traffic.py``; libtpu from the
``tpu-aot`` extra, in a subprocess). Two measures of bytes per parameter:

- "bytes accessed" of the cost analysis, GPT-2 124M shapes: optimizers that optax also implements
  must be within 2% of optax's version. This count also includes both sides of every transfer the
  compiler's memory-space assignment makes into on-chip memory, so it is only comparable at the
  same shapes; small pytrees are staged wholesale and read 3x higher.
- bytes over HBM (each operand and result once, ``experiments/hlo_stats.py``), on two GPT-2
  blocks: every optimizer at or below its streaming ideal (state read and written once, plus the
  reads of its reduction pass), and no synchronous copy of a parameter-sized buffer except where
  the step stores the raw gradient (MARS, MADA/HyperAdam: one copy per large leaf).
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

import optax_accel as oa
from benchmarks import step_traffic

ROOT = pathlib.Path(__file__).resolve().parents[1]
STORES_GRADIENT = {"mars_adamw", "mars_lion", "mada", "hyperadam"}
LARGE_LEAVES_2BLOCK = 10  # wte, wpe and 4 matrices per block


def _measure(size, names):
  pytest.importorskip("libtpu", reason="needs the tpu-aot extra (libtpu), as .ci/run installs")
  out = subprocess.run(
      [sys.executable, "-m", "benchmarks.step_traffic", "--size", size, "--backends", "tpu",
       "--json", "--only", *names],
      cwd=ROOT, capture_output=True, text=True, timeout=900, check=False,
      env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_same_algorithm_as_optax_moves_at_most_2_percent_more_bytes():
  # sgd and lion are optax's own; schedule_free_sgd (1.130 vs optax's 1.130) is in the results
  # table, left out here for the CI budget (two more 124M compiles).
  ours = ["schedule_free_adamw", "simplified_ademamix", "ademamix"]
  rows = _measure("124m", ours + [step_traffic.OPTAX_VERSION[n] for n in ours])
  for name in ours:
    goal = step_traffic.target(name, rows)
    assert rows[name]["tpu ratio"] <= goal, (name, rows[name]["tpu ratio"], goal)


# optax's own (adamw, sgd, lion) and the canonical-form variants that compile the same transform
# as accelerated_sgd with other constants (accsgd, mass_sgd, agnes) are left out.
OURS = [n for n in oa.list_optimizers()
        if n not in ("adamw", "sgd", "lion", "accsgd", "mass_sgd", "agnes")]


def test_every_step_is_at_its_streaming_ideal_over_hbm():
  rows = _measure("2block", OURS)
  for name in OURS:
    row = rows[name]
    assert row["tpu hbm_bytes_per_param"] <= 1.005 * row["ideal hbm_bytes_per_param"], (
        name, row["tpu hbm_bytes_per_param"], row["ideal hbm_bytes_per_param"])
    allowed = LARGE_LEAVES_2BLOCK if name in STORES_GRADIENT else rows["optax.adamw"]["tpu copies"]
    assert row["tpu copies"] <= allowed, (name, row["tpu copies"])
