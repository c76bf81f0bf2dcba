"""Builds every recipe's step for its TPU slice without a TPU; prints JSON (run by test_recipes.py).

    python tests/recipe_probe.py [COMPILE_RECIPE]

Every recipe's step, at the recipe's depth, batch and slice, is built and lowered (traced and
sharded: the batch divides over the chips, every parameter and state leaf has its sharding); the
one named is also compiled with one block (the compile of a full depth takes minutes per recipe on
a 2-core CPU: ``compare --dry-run`` does that, and its figures are in results/scale/recipes/).
"""
import json
import sys

import jax

from experiments.lm import aot, recipes
from experiments.lm import config as config_lib
from experiments.lm import step as step_lib


def lowered(name: str, overrides: dict):
  recipe = recipes.RECIPES[name]
  program = step_lib.build_train_step(config_lib.build_config(name, overrides),
                                      aot.topology_devices(recipe.topology))
  with jax.set_mesh(program.mesh):
    return program, program.step.lower(program.abstract_state, *program.abstract_batch())


def main(compile_recipe=None):
  out = {}
  for name in recipes.RECIPES:
    program, _ = lowered(name, {})
    out[name] = {"chips": program.mesh.size, "grad_accum": program.grad_accum,
                 "micro_batch": program.micro_batch,
                 "sharded_params": sum(any(s is not None for s in x.sharding.spec)
                                       for x in jax.tree.leaves(program.abstract_state["params"]))}
  if compile_recipe:
    program, step = lowered(compile_recipe, {"model.n_layer": 1})
    stats = aot.compile_stats(step)
    out[compile_recipe]["one_block"] = {"hbm_bytes": stats["hbm_bytes"], "flops": stats["flops"]}
  print(json.dumps(out))


if __name__ == "__main__":
  main(*sys.argv[1:])
