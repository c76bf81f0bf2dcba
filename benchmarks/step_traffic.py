"""Memory traffic of one optimizer step as the compiler counts it (TPU v5e, deviceless, and CPU).

    python -m benchmarks.step_traffic                  # GPT-2 124M shapes, f32
    python -m benchmarks.step_traffic --size 15m --backends cpu

For every registered optimizer and optax's own versions of the same algorithms, the step
``params, state <- apply(update(grads, state, params))`` (params and state donated) is compiled
for one TPU v5e chip (libtpu from the ``tpu-aot`` extra; nothing runs) and for the host CPU, and
the compiler's figures are reported: bytes accessed per parameter and as a ratio to
``optax.adamw`` compiled the same way, the streaming lower bound of that ratio (each parameter-
sized buffer read once and written once: (3 + 2 S) / 7 for S state buffers), copies of
parameter-sized buffers, kernels (top-level instructions that are not parameters, constants,
tuples or bitcasts), and state bytes per parameter. The figures are deterministic (no timing).
Writes ``results/benchmarks/step_traffic.{md,csv}``.
"""
from __future__ import annotations

import argparse
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_accel as oa
from benchmarks.optimizer_step import SIZES, gpt2_shaped_params
from experiments import reporting

LEARNING_RATE = 1e-3
OPTAX_OWN = {
    "optax.adamw": lambda: optax.adamw(LEARNING_RATE),
    "optax.sgd(momentum=0.9)": lambda: optax.sgd(LEARNING_RATE, momentum=0.9),
    "optax.lion": lambda: optax.lion(LEARNING_RATE),
    "optax.adan": lambda: optax.adan(LEARNING_RATE),
    "optax.contrib.ademamix": lambda: optax.contrib.ademamix(LEARNING_RATE),
    "optax.contrib.simplified_ademamix": lambda: optax.contrib.simplified_ademamix(LEARNING_RATE),
    "optax.contrib.schedule_free_adamw": lambda: optax.contrib.schedule_free_adamw(LEARNING_RATE),
    "optax.contrib.schedule_free_sgd": lambda: optax.contrib.schedule_free_sgd(LEARNING_RATE),
}
LARGE = 100_000  # elements: a "parameter-sized" buffer (the smallest GPT-2 matrix is 589k)
SKIPPED_OPS = ("parameter", "constant", "tuple", "get-tuple-element", "bitcast")


def factories() -> dict:
  ours = {name: (lambda name=name: oa.get_optimizer(name, LEARNING_RATE))
          for name in oa.list_optimizers()}
  return {**OPTAX_OWN, **ours}


def target_device(backend: str):
  if backend == "cpu":
    return jax.devices("cpu")[0]
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  return topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices[0]


def hlo_figures(hlo: str) -> dict:
  """Copies of large buffers and kernels, in the entry computation of the optimised HLO."""
  entry = hlo[hlo.index("ENTRY"):]
  entry = entry[:entry.index("\n}")]
  copies = kernels = 0
  for line in entry.splitlines()[1:]:
    match = re.match(r"\s*(?:ROOT )?%\S+ = (\S+) ([a-z\-]+)\(", line)
    if not match:
      continue
    shape, op = match.groups()
    if op in SKIPPED_OPS:
      continue
    kernels += 1
    dims = re.search(r"\[([\d,]*)\]", shape)
    size = int(np.prod([int(d) for d in dims.group(1).split(",") if d])) if dims else 0
    copies += op.startswith("copy") and size >= LARGE
  return {"copies": copies, "kernels": kernels}


def compile_step(opt: optax.GradientTransformation, params, device) -> dict:
  sharding = jax.sharding.SingleDeviceSharding(device)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          params)
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                       jax.eval_shape(opt.init, params))

  def step(params, state, grads):
    updates, state = opt.update(grads, state, params, value=jnp.zeros([]))
    return optax.apply_updates(params, updates), state

  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(abstract, state, abstract).compile()
  n = sum(x.size for x in jax.tree.leaves(params))
  large_state = [x for x in jax.tree.leaves(state) if x.size >= LARGE]
  return {"bytes_per_param": compiled.cost_analysis()["bytes accessed"] / n,
          "state_bytes_per_param": sum(x.size * x.dtype.itemsize
                                       for x in jax.tree.leaves(state)) / n,
          "state_buffers": sum(x.size for x in large_state) / sum(
              x.size for x in jax.tree.leaves(params) if x.size >= LARGE),
          **hlo_figures(compiled.as_text())}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", default="124m", choices=sorted(SIZES))
  parser.add_argument("--backends", nargs="+", default=["tpu", "cpu"], choices=("tpu", "cpu"))
  parser.add_argument("--out", default="results/benchmarks/step_traffic")
  args = parser.parse_args(argv)
  params = jax.eval_shape(lambda: gpt2_shaped_params(*SIZES[args.size]))
  rows = []
  for name, factory in factories().items():
    row = {"optimizer": name}
    for backend in args.backends:
      figures = compile_step(factory(), params, target_device(backend))
      for key in ("bytes_per_param", "copies", "kernels"):
        row[f"{backend} {key}"] = figures[key]
      row["state bytes/param"] = figures["state_bytes_per_param"]
      row["ideal ratio"] = (3 + 2 * figures["state_buffers"]) / 7
    rows.append(row)
    print(row, flush=True)
  for backend in args.backends:
    base = next(r for r in rows if r["optimizer"] == "optax.adamw")[f"{backend} bytes_per_param"]
    for row in rows:
      row[f"{backend} ratio to adamw"] = row[f"{backend} bytes_per_param"] / base
  reporting.write_table(args.out, rows, title=f"Optimizer step traffic, GPT-2 {args.size} "
                        "shapes (f32), compiler figures", notes=[
      "step = update + apply, params and state donated; TPU: one v5e chip compiled without a "
      "TPU (libtpu); CPU: XLA:CPU on this machine. Deterministic compiler counts, not timings",
      "ideal ratio: every parameter-sized buffer read once and written once, (3 + 2 S) / 7 for "
      "S state buffers per parameter (AdamW: S = 2); methods with a reduction pass (AM, MARS "
      "clipping, MADA's hypergradients) need one more read of the buffers they reduce over",
      "copies: copy instructions on parameter-sized buffers (a value read after its buffer was "
      "updated in place)"])


if __name__ == "__main__":
  main()
