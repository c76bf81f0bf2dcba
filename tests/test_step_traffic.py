"""Memory traffic of every optimizer step, compiled for one TPU v5e chip without a TPU (issue 10).

The figures are the compiler's and deterministic (``benchmarks/step_traffic.py``; libtpu from the
``tpu-aot`` extra, in a subprocess). Two measures of bytes per parameter:

- "bytes accessed" of the cost analysis, GPT-2 124M shapes, as compiled by default: optimizers
  that optax also implements must be within 2% of optax's version, AM-AdamW and AVGrad within
  their issue-10 bounds. This count includes both sides of every transfer the compiler's
  memory-space assignment makes into on-chip memory, so it is only comparable at the same shapes;
  small pytrees are staged wholesale and read 3x higher.
- the same chip with memory-space assignment off ("tpu-unstaged"), on two GPT-2 blocks: then
  bytes accessed is exactly the HBM traffic of the step as fused. Every registered optimizer and
  the forward-mode hypergradient path move at most their streaming ideal (every buffer read and
  written once, plus the reads the update repeats after a reduction pass), or, where they are
  known to move more, at most what they moved when this was written; no step copies a
  parameter-sized buffer (optax.adamw copies none) except MARS's stored gradient.
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
from experiments import hlo_stats

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCALARS = 0.1  # bytes per parameter of scalar state and step counts (AM's per-tensor betas: 0.05)
# Over their ideal, measured at two GPT-2 blocks and pinned so that they cannot grow
# (docs/performance.md §2), as (bytes per parameter, copies): MARS copies the stored gradient
# (one copy per large leaf; written by the update kernel instead, the default TPU compile moved
# more); MADA's update kernel writes 8 of its 9 outputs and a second kernel reads g again to write
# the stored gradient; the forward-mode path reads the step's inputs again for its tangents (two
# names) or forms the new Adam moments and the tangent in one kernel and the parameter update in
# a second that reads them back (one name).
KNOWN_EXCESS = {"mars_adamw": (48.0, 10), "mars_lion": (40.0, 10),
                "mada": (108.0, 0),
                "hypergradient(optax.adam; b1)": (48.0, 0),
                "hypergradient(optax.adam; b1, b2)": (60.0, 0)}


def _measure(size, names, backend="tpu"):
  pytest.importorskip("libtpu", reason="needs the tpu-aot extra (libtpu), as .ci/run installs")
  out = subprocess.run(
      [sys.executable, "-m", "benchmarks.step_traffic", "--size", size, "--backends", backend,
       "--json", "--only", *names],
      cwd=ROOT, capture_output=True, text=True, timeout=900, check=False,
      env={**os.environ, "JAX_PLATFORMS": "cpu", "JAX_ENABLE_COMPILATION_CACHE": "false",
           "XLA_FLAGS": ""})
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


# The issue-10 targets on bytes accessed that are met (124M, default compile), in two groups of
# about the same compile time so that the two test processes can take one each: within 2% of
# optax's version where optax has the same algorithm, else at most 1.10 x the ideal-bytes ratio.
# sgd and lion are optax's own. The targets not met (AM-SGD, HyperAdam, MARS, MADA: staging, and
# MADA's reduction pass; docs/performance.md §2) are not asserted here; their step's own traffic
# is, unstaged, below. At two blocks every operand is staged and neither earlier excess of
# Schedule-Free AdamW or AdEMAMix over optax's showed, hence 124M.
MET_TARGETS = {"schedule_free_simplified": ["schedule_free_adamw", "schedule_free_sgd",
                                            "simplified_ademamix"],
               "ademamix_am_avgrad": ["ademamix", "am_adamw", "avgrad"]}


@pytest.mark.parametrize("group", sorted(MET_TARGETS))
def test_met_bytes_targets_stay_met_and_no_step_copies_more_than_adamw(group):
  ours = MET_TARGETS[group]
  rows = _measure("124m", ours + [step_traffic.OPTAX_VERSION[n] for n in ours
                                  if n in step_traffic.OPTAX_VERSION])
  for name in ours:
    goal = step_traffic.target(name, rows)
    assert goal is not None, name
    assert rows[name]["tpu ratio"] <= goal, (name, rows[name]["tpu ratio"], goal)
    assert rows[name]["tpu copies"] <= rows["optax.adamw"]["tpu copies"], name


# optax's own (adamw, sgd, lion) and the canonical-form variants that compile the same transform
# as accelerated_sgd with other constants (accsgd, mass_sgd, agnes) are left out.
OURS = [n for n in oa.list_optimizers()
        if n not in ("adamw", "sgd", "lion", "accsgd", "mass_sgd", "agnes")]
# In two halves of about the same compile time, so that the two test processes can take one each:
# AM, MARS and the MADA family (avgrad included), then the others with the forward-mode path.
AM_MARS_MADA = [n for n in OURS if n.startswith(("am_", "mars_")) or n in (
    "mada", "hyperadam", "avgrad")]
HALVES = {"am_mars_mada": AM_MARS_MADA,
          "others": [n for n in OURS if n not in AM_MARS_MADA] + list(step_traffic.FORWARD_MODE)}


@pytest.mark.parametrize("half", sorted(HALVES))
def test_every_step_moves_its_streaming_ideal_and_copies_nothing_unless_pinned(half):
  rows = _measure("2block", HALVES[half], backend="tpu-unstaged")
  for name, row in rows.items():
    moved, copies = row["tpu-unstaged bytes_per_param"], row["tpu-unstaged copies"]
    ideal = row["ideal hbm_bytes_per_param"]
    pinned_bytes, pinned_copies = KNOWN_EXCESS.get(name, (ideal, 0))
    assert moved <= pinned_bytes + SCALARS and copies <= pinned_copies, (name, moved, copies)
    if name in KNOWN_EXCESS:  # a pin that is no longer needed must go
      assert moved > ideal + SCALARS, (name, moved, "now at its ideal: drop it from KNOWN_EXCESS")
  assert rows["optax.adamw"]["tpu-unstaged copies"] == 0


def test_entry_instructions_read_past_a_closing_brace_inside_a_kernels_config():
  """A splash kernel's backend config spans lines, one of which starts with '}': every entry
  instruction after it is still read (the parser once stopped there)."""
  hlo = ("%fused (p: f32[4]) -> f32[4] {\n  ROOT %p = f32[4]{0} parameter(0)\n}\n\n"
         "ENTRY %main (a: f32[4]) -> f32[4] {\n"
         "  %a = f32[4]{0} parameter(0)\n"
         '  %custom-call.1 = f32[4]{0} custom-call(%a), backend_config="{\\"m\\": \\"\n'
         '}\\"}"\n'
         "  ROOT %fusion.2 = f32[4]{0} fusion(%custom-call.1), kind=kLoop, calls=%fused\n}\n")
  ops = [(i.name, i.op) for i in hlo_stats.entry_instructions(hlo)]
  assert ops == [("%a", "parameter"), ("%custom-call.1", "custom-call"),
                 ("%fusion.2", "fusion")], ops
  assert hlo_stats.entry_instructions(hlo)[-1].operands == [[hlo_stats.Array(4, 16, True)]]
