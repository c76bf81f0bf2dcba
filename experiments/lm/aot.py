"""Compile the exact training step for a TPU slice without a TPU and report what the compiler says.

    python -m experiments.lm.aot --config gpt2-124m --topology v5e:4x4
    python -m experiments.lm.aot --config llama-1b --topology v5e:8x8 --set optim.name=mada
    python -m experiments.lm.aot --matrix            # results/scale/table.{md,csv} (resumable)

Needs libtpu (``pip install -e ".[tpu-aot]"``); run with ``JAX_PLATFORMS=cpu`` on a machine
without a TPU. The step is built by :func:`experiments.lm.train.build_train_step`, the same
builder training uses, and compiled three ways:

1. the step as configured (gradient accumulation included): per-chip HBM from the memory
   analysis (arguments + outputs - aliased + temporaries), collectives and copies in the HLO;
2. one microbatch (``grad_accum=1``): per-chip FLOPs and bytes accessed (the FLOPs of Pallas
   attention kernels, invisible to the cost analysis, added analytically: :func:`kernel_flops`).
   The cost analysis counts a loop body once, so the whole step's figures are
   ``accum x (microbatch - optimizer) + optimizer``; FLOPs efficiency = ideal per-chip FLOPs
   ((6 N + 12 L d T) x tokens / chips) / compiled per-chip FLOPs of the microbatch step;
3. the optimizer update alone on the sharded parameters: its FLOPs and bytes.

The roofline step time is a compiler estimate, not a measurement: for the forward/backward part and
for the optimizer part each, max(FLOPs / peak FLOP/s, bytes / HBM bandwidth), summed; the estimated
MFU is the ideal FLOPs over that time at peak.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time

import jax
import numpy as np
import optax

from experiments import reporting
from experiments.lm import config as config_lib
from experiments.lm import model as model_lib
from experiments.lm import step as step_lib

GIB = 2 ** 30
# Per chip: usable HBM (bytes), peak bf16 FLOP/s, HBM bandwidth (bytes/s); public spec sheets.
CHIPS = {"v5e": (15.75 * GIB, 197e12, 819e9), "v4": (32 * GIB, 275e12, 1228e9),
         "v5p": (95 * GIB, 459e12, 2765e9), "v6e": (32 * GIB, 918e12, 1640e9)}
# The changes to the compiled training step since the matrix was first compiled, oldest first, each
# with the results whose program it changed (None: all). A result records how many it includes
# (``step_revision``); a matrix cell that predates a change to its program is not today's program
# and table.md says so (delete its JSON and rerun --matrix). Append a line whenever the step's
# program changes.
STEP_REVISIONS = (
    ("model.attention", None),  # splash on TPU, bf16 scores on the XLA path (issue 25)
    ("bf16 weight casts and rotate-half rope", None),  # also norm outputs in bf16, splash residuals
    ("splash in its own layout, llama-1b's layers scanned",
     lambda result: result.get("attention") == "splash" or result["config"] == "llama-1b"),
)
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
MATRIX = {"configs": ("gpt2-124m", "llama-1b", "shakespeare-char", "llama-60m"),
          "topologies": ("v5e:4x4", "v5e:8x8", "v5e:2x2", "v4:2x2x4"),
          "optimizers": ("adamw", "ademamix", "schedule_free_adamw", "am_adamw", "mada")}
# Cells whose whole step is compiled for the optimizer too (AdamW's always is); elsewhere the
# optimizer's HBM is estimated from AdamW's (compiling every cell takes hours on a 2-core CPU).
MATRIX_COMPILED = {("gpt2-124m", "v5e:4x4", "mada"), ("llama-1b", "v5e:8x8", "mada")}


def topology_devices(name: str):
  """The devices of a TPU topology such as "v5e:4x4", for compiling only (no TPU needed)."""
  # Compiling needs no TPU, so several processes may load libtpu at once (tests in parallel).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  return topologies.get_topology_desc(topology_name=name, platform="tpu").devices


def hlo_counts(hlo: str) -> dict:
  """Collectives by kind and copies, counted over the optimised per-chip HLO's instructions."""
  ops = collections.Counter(m.group(1) for m in re.finditer(
      r"=\s*\S+\s+([a-z\-]+)(?:-start)?\(", hlo))
  counts = {kind: ops[kind] + ops[kind + "-start"] for kind in COLLECTIVES}
  counts["copy"] = ops["copy"] + ops["copy-start"]
  return counts


# The TPU compiler splits large sharded matmuls into collective-matmul loops ("windowed einsum");
# the cost analysis then counts one iteration. FLOPs are therefore counted on a compile without
# them: the same partitioning and arithmetic, only the overlap of communication is lost.
COUNTING_OPTIONS = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                    "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}


def compile_stats(lowered, *, counting: bool = False) -> dict:
  compiled = lowered.compile(compiler_options=COUNTING_OPTIONS if counting else None)
  cost, memory = compiled.cost_analysis(), compiled.memory_analysis()
  hbm = (memory.argument_size_in_bytes + memory.output_size_in_bytes
         - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
  return {"flops": float(cost.get("flops", 0.0)),
          "bytes": float(cost.get("bytes accessed", 0.0)),
          "argument_bytes": memory.argument_size_in_bytes,
          "output_bytes": memory.output_size_in_bytes, "alias_bytes": memory.alias_size_in_bytes,
          "temp_bytes": memory.temp_size_in_bytes, "hbm_bytes": hbm,
          **hlo_counts(compiled.as_text())}


def optimizer_step_stats(program: step_lib.TrainStep) -> dict:
  """The optimizer update + apply alone, on the sharded parameters and state (both donated)."""
  tx = program.tx

  def update(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params, value=jax.numpy.zeros([]))
    return optax.apply_updates(params, updates), opt_state

  state = program.abstract_state
  with jax.set_mesh(program.mesh):
    lowered = jax.jit(update, donate_argnums=(0, 1)).lower(
        state["params"], state["opt_state"], state["params"])
  return compile_stats(lowered)


def kernel_flops(mc: model_lib.ModelConfig, tokens: int, seq_len: int, chips: int,
                 platform: str = "tpu") -> float:
  """Per-chip FLOPs of a training step's fused attention kernels on ``platform``, which the cost
  analysis does not see inside a Pallas or cuDNN call: 12 L d T per token (QK^T and PV, forward
  and backward; remat "block" and "offload" keep the kernel's output, so it does not run again),
  16 L d T under remat "full" or "dots_saveable" (the forward kernel again). Zero for the XLA path
  (the compiler counts it)."""
  if model_lib.attention_implementation(mc, seq_len, platform, dropout=True) == "xla":
    return 0.0
  reruns = mc.remat not in ("none", *model_lib.REMAT_KEEPING_KERNELS)
  per_token = (16 if reruns else 12) * mc.n_layer * mc.d_model * seq_len
  return per_token * tokens / chips


def per_chip_bytes(abstract_tree) -> int:
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
             for x in jax.tree.leaves(abstract_tree))


def analyse(cfg: dict, topology: str, *, name: str = "", baseline: dict | None = None,
            compile_step: bool = True, devices=None, chip=None) -> dict:
  """Compiles ``cfg``'s step for ``topology``; returns the figures described in the module doc.

  ``baseline``: AdamW's result for the same model, batch and slice; its forward/backward figures
  (which do not depend on the optimizer) are reused. With ``compile_step=False`` the whole step
  is not compiled either: its HBM is estimated as the baseline's plus the difference in per-chip
  optimizer state and in the optimizer step's temporaries (``hbm_source`` says which).
  ``devices`` and ``chip`` (memory, peak FLOP/s, bandwidth per device): other devices than the
  topology's, e.g. the GPUs present (``topology`` is then only a label).
  """
  devices = devices or topology_devices(topology)
  chips = len(devices)
  hbm_limit, peak, bandwidth = chip or CHIPS[topology.split(":")[0]]
  counting = devices[0].platform == "tpu"  # the windowed-einsum options are the TPU compiler's
  started = time.perf_counter()
  program = step_lib.build_train_step(cfg, devices)
  opt = optimizer_step_stats(program)
  state_per_chip = per_chip_bytes(program.abstract_state["opt_state"])
  microbatch_stats = baseline["fwd_bwd"] if baseline else None
  if compile_step or baseline is None:
    with jax.set_mesh(program.mesh):
      full = compile_stats(program.step.lower(program.abstract_state, *program.abstract_batch()))
    full["source"] = "compiled"
  else:
    extra = (state_per_chip - baseline["optimizer_state_bytes_per_chip"]
             + max(0, opt["temp_bytes"] - baseline["optimizer_temp_bytes"]))
    full = {"hbm_bytes": baseline["hbm_gib"] * GIB + extra,
            "temp_bytes": baseline["temp_gib"] * GIB, "argument_bytes": None,
            "output_bytes": None, "source": "estimated from adamw",
            **{k: baseline["collectives"][k] for k in COLLECTIVES}, "copy": baseline["copies"]}
  if microbatch_stats is None:
    # A loop's body would be counted once: a scan over the layers is unrolled for counting.
    scan = program.model_config.scan_layers
    micro_program = step_lib.build_train_step(
        {**cfg, "train.batch_size": program.micro_batch, "train.grad_accum": 1,
         "model.scan_layers": "unrolled" if scan == "loop" else scan}, devices)
    with jax.set_mesh(micro_program.mesh):
      micro = compile_stats(micro_program.step.lower(micro_program.abstract_state,
                                                     *micro_program.abstract_batch()),
                            counting=counting)
    kernel = kernel_flops(program.model_config, program.micro_batch * cfg["train.seq_len"],
                          cfg["train.seq_len"], chips, devices[0].platform)
    microbatch_stats = {"flops": micro["flops"] - opt["flops"] + kernel, "kernel_flops": kernel,
                        "bytes": micro["bytes"] - opt["bytes"], "temp_bytes": micro["temp_bytes"],
                        "hbm_bytes": micro["hbm_bytes"]}
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(program.abstract_state["params"]))
  tokens = program.micro_batch * cfg["train.seq_len"]
  ideal_micro = model_lib.flops_per_token(program.model_config, n_params,
                                          cfg["train.seq_len"]) * tokens / chips
  fwd_bwd = microbatch_stats
  accum = program.grad_accum
  t_fwd_bwd = max(fwd_bwd["flops"] / peak, fwd_bwd["bytes"] / bandwidth)
  t_opt = max(opt["flops"] / peak, opt["bytes"] / bandwidth)
  step_time = accum * t_fwd_bwd + t_opt
  state_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize
                    for x in jax.tree.leaves(program.abstract_state["opt_state"]))
  return {
      "config": name or cfg["model"], "topology": topology, "chips": chips,
      "optimizer": cfg["optim.name"], "params": n_params,
      "global_batch": cfg["train.batch_size"], "seq_len": cfg["train.seq_len"],
      "grad_accum": accum, "microbatch": program.micro_batch, "remat": cfg["model.remat"],
      "attention": model_lib.attention_implementation(
          program.model_config, cfg["train.seq_len"], devices[0].platform, dropout=True),
      "hbm_gib": full["hbm_bytes"] / GIB, "hbm_limit_gib": hbm_limit / GIB,
      "fits": full["hbm_bytes"] <= hbm_limit, "temp_gib": full["temp_bytes"] / GIB,
      "hbm_source": full["source"],
      "optimizer_state_bytes_per_param": state_bytes / n_params,
      "optimizer_state_bytes_per_chip": state_per_chip, "optimizer_temp_bytes": opt["temp_bytes"],
      "micro_flops_per_chip": fwd_bwd["flops"] + opt["flops"],
      "ideal_micro_flops_per_chip": ideal_micro,
      "flops_efficiency": ideal_micro / (fwd_bwd["flops"] + opt["flops"]),
      "step_flops_per_chip": accum * fwd_bwd["flops"] + opt["flops"],
      "step_bytes_per_chip": accum * fwd_bwd["bytes"] + opt["bytes"],
      "optimizer_flops_per_chip": opt["flops"], "optimizer_bytes_per_chip": opt["bytes"],
      "optimizer_copies": opt["copy"],
      "roofline_step_s": step_time, "roofline_optimizer_s": t_opt,
      "roofline_microbatch_s": t_fwd_bwd,
      "estimated_mfu": accum * ideal_micro / (step_time * peak),
      "collectives": {k: full[k] for k in COLLECTIVES}, "copies": full["copy"],
      "fwd_bwd": fwd_bwd, "compile_s": time.perf_counter() - started,
      "step_revision": len(STEP_REVISIONS),
  }


ROW_COLUMNS = ("config", "topology", "optimizer", "global_batch", "grad_accum", "remat",
               "attention", "fits",
               "hbm_gib", "hbm_source", "temp_gib", "flops_efficiency", "estimated_mfu", "roofline_step_s",
               "optimizer_share")


def staleness(result: dict) -> str | None:
  """Why ``result`` is not today's step (the first change it predates), or None."""
  # Cells from before model.attention have no "attention"; those of revision 1 no revision.
  revision = result.get("step_revision", 1 if "attention" in result else 0)
  return next((f"stale: before {change}" for change, changed in STEP_REVISIONS[revision:]
               if changed is None or changed(result)), None)


def row(result: dict) -> dict:
  out = {k: result.get(k) for k in ROW_COLUMNS}
  stale = staleness(result)
  out["attention"] = result.get("attention", "jax.nn") + (f" ({stale})" if stale else "")
  out["optimizer_share"] = result["roofline_optimizer_s"] / result["roofline_step_s"]
  return out


def run_matrix(out_dir: str, configs, topologies, optimizers) -> list[dict]:
  """Every (config, topology, optimizer); one JSON per cell (kept: a rerun resumes).

  AdamW's whole step is compiled; the other optimizers reuse AdamW's forward/backward figures
  and, outside ``MATRIX_COMPILED``, its HBM (see :func:`analyse`).
  """
  os.makedirs(out_dir, exist_ok=True)
  results = []
  for name in configs:
    for topology in topologies:
      chips = len(topology_devices(topology))
      baseline = None
      for optimizer in optimizers:
        path = os.path.join(out_dir, f"{name}_{topology.replace(':', '-')}_{optimizer}.json")
        if os.path.exists(path):
          with open(path) as f:
            result = json.load(f)
        else:
          cfg = config_lib.build_config(name, {"optim.name": optimizer})
          per_step = cfg["train.device_batch"] or 1
          # The paper batch where the slice divides it, else the next multiple that does.
          multiple = chips * per_step
          cfg["train.batch_size"] = -(-cfg["train.batch_size"] // multiple) * multiple
          result = analyse(cfg, topology, name=name, baseline=baseline,
                           compile_step=(name, topology, optimizer) in MATRIX_COMPILED)
          reporting.write_json(path, result, indent=1)
        if optimizer == "adamw":
          baseline = result
        results.append(result)
        print(json.dumps(row(result)), file=sys.stderr, flush=True)
        matrix_table(out_dir)
  return results


def matrix_table(out_dir: str):
  """results/scale/table.{md,csv} from every cell's JSON there."""
  results = []
  for path in sorted(os.listdir(out_dir)):
    if path.endswith(".json"):
      with open(os.path.join(out_dir, path)) as f:
        results.append(json.load(f))
  baseline = {(r["config"], r["topology"]): r for r in results if r["optimizer"] == "adamw"}
  rows = []
  for r in results:
    base = baseline.get((r["config"], r["topology"]))
    entry = row(r)
    entry["added_bytes_share"] = ((r["step_bytes_per_chip"] - base["step_bytes_per_chip"])
                                  / base["step_bytes_per_chip"]) if base else None
    entry["added_flops_share"] = ((r["step_flops_per_chip"] - base["step_flops_per_chip"])
                                  / base["step_flops_per_chip"]) if base else None
    entry["step_overhead_vs_adamw"] = (r["roofline_step_s"] / base["roofline_step_s"] - 1
                                       ) if base else None
    rows.append(entry)
  reporting.write_table(os.path.join(out_dir, "table"), rows, title="Training step compiled for "
                        "TPU slices (deviceless, compiler figures)", notes=[
      "every figure is the XLA TPU compiler's own (cost and memory analysis of the compiled "
      "per-chip program); nothing ran on a TPU. Step time and MFU are roofline estimates",
      "global batch: the preset's (paper) batch, rounded up to a multiple of chips x "
      "train.device_batch where the slice does not divide it; grad_accum from the preset",
      "flops_efficiency = (6N + 12 L d T) x microbatch tokens / chips over compiled per-chip "
      "FLOPs of one microbatch step (grad_accum=1, no loop), plus the attention kernel's FLOPs "
      "counted analytically where the step runs one (the cost analysis cannot see them)",
      "attention: the path the step compiled to (model.attention=auto: 'splash', the Pallas "
      "kernel, on TPU; 'jax.nn': jax.nn.dot_product_attention, f32 scores, before "
      "model.attention existed). Rows marked 'stale: before X' were compiled before change X to "
      "the step (experiments.lm.aot.STEP_REVISIONS) and are not today's program: delete their "
      "JSON and rerun --matrix to recompile them",
      "added_*_share / step_overhead_vs_adamw: the optimizer's extra compiled bytes/FLOPs/"
      "roofline time over AdamW's whole step, same preset and slice"])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="shakespeare-char", help=", ".join(config_lib.PRESETS))
  parser.add_argument("--topology", default="v5e:2x2", help="e.g. v5e:4x4, v4:2x2x4")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  parser.add_argument("--out", default=None, help="JSON path (default: print only)")
  parser.add_argument("--matrix", action="store_true",
                      help="the results/scale matrix (configs x slices x optimizers)")
  parser.add_argument("--out-dir", default="results/scale")
  args = parser.parse_args(argv)
  try:
    if args.matrix:
      run_matrix(args.out_dir, MATRIX["configs"], MATRIX["topologies"], MATRIX["optimizers"])
      matrix_table(args.out_dir)
      return 0
    result = analyse(config_lib.build_config(args.config, args.set), args.topology,
                     name=args.config)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
  print(json.dumps(result, indent=1))
  r = row(result)
  print("| " + " | ".join(ROW_COLUMNS) + " |\n|" + "---|" * len(ROW_COLUMNS) + "\n| "
        + " | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k])
                     for k in ROW_COLUMNS) + " |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
