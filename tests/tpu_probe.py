"""Compiles a training step for TPU topologies without a TPU; prints JSON (test_scale, test_attention).

    python tests/tpu_probe.py CONFIG TOPOLOGY[,TOPOLOGY ...] [KEY=VALUE ...] [--normal]

Reports the per-chip FLOPs and temporaries of the step (one microbatch, compiled without the
collective-matmul loops so that the cost analysis counts every matmul; ``--normal``: with them,
as training compiles it), whether any HLO value has
the global batch as its leading dimensions (a replicated activation), and whether every optimizer
state leaf of a parameter's shape carries that parameter's sharding in the compiled step.
"""
import json
import re
import sys

import jax

from experiments.lm import aot
from experiments.lm import config as config_lib
from experiments.lm import step as step_lib

NORMAL = "--normal"


def probe(config, topology, overrides):
  normal = NORMAL in overrides  # the compile training runs, with its collective-matmul loops
  cfg = config_lib.build_config(config, [o for o in overrides if o != NORMAL])
  program = step_lib.build_train_step(cfg, aot.topology_devices(topology))
  with jax.set_mesh(program.mesh):
    compiled = program.step.lower(program.abstract_state, *program.abstract_batch()).compile(
        compiler_options=None if normal else aot.COUNTING_OPTIONS)
  hlo = compiled.as_text()
  batch, seq = program.micro_batch, cfg["train.seq_len"]
  replicated = sorted(set(re.findall(rf"\w+\[{batch},{seq}[,\]][^ ]*", hlo)))
  state_out = compiled.output_shardings[0]
  params = program.abstract_state["params"]
  by_shape = {}
  for leaf, sharding in zip(jax.tree.leaves(params), jax.tree.leaves(state_out["params"])):
    by_shape.setdefault(leaf.shape, set()).add(sharding.spec)
  mismatched = [f"{leaf.shape}: {sharding.spec}" for leaf, sharding in zip(
      jax.tree.leaves(program.abstract_state["opt_state"]),
      jax.tree.leaves(state_out["opt_state"]))
      if leaf.shape in by_shape and sharding.spec not in by_shape[leaf.shape]]
  # T x T float32 values outside fusions (attention scores kept in memory in f32)
  unfused = "\n".join(c for c in hlo.split("\n\n") if not c.lstrip().startswith("%fused"))
  f32_scores = len(re.findall(rf"= f32\[[\d,]*{seq},{seq}\]", unfused))
  sharded_params = sum(any(s is not None for s in sharding.spec)
                       for sharding in jax.tree.leaves(state_out["params"]))
  return {
      "flops": compiled.cost_analysis()["flops"],
      "bytes": compiled.cost_analysis()["bytes accessed"], "f32_scores": f32_scores,
      "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
      "replicated_batch_values": replicated[:10], "mismatched_state": mismatched,
      "sharded_params": sharded_params, "opt_state_leaves": len(jax.tree.leaves(state_out)),
  }


def main(config, topologies, *overrides):
  """One JSON line, topology -> figures (one process for all: libtpu starts once)."""
  print(json.dumps({t: probe(config, t, overrides) for t in topologies.split(",")}))


if __name__ == "__main__":
  main(*sys.argv[1:])
