"""The dry run of every recipe's AdamW step on v5e:4x4, from a cache folder; prints JSON
(run by test_recipes.py, in a subprocess: libtpu loads once).

    python tests/recipe_probe.py CACHE_DIR

Each step is built and lowered for the slice exactly as training builds it; a row whose program
digest is in CACHE_DIR says "cached": the committed deviceless compile is of this very program.
"""
import json
import sys

from experiments.lm import compare, dry_run, recipes

TOPOLOGY = "v5e:4x4"


def main(cache_dir):
  out = {}
  for preset in recipes.COMPARISONS:
    _, planned, _ = compare.plan(preset, "full", optimizers=("adamw",))
    out[preset] = dry_run.dry_run(compare.PRESETS[preset].config, planned, topology=TOPOLOGY,
                                  cache_dir=cache_dir)
  print(json.dumps(out))


if __name__ == "__main__":
  main(*sys.argv[1:])
