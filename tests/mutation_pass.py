"""Mutation pass over the update-rule modules: does each module's own test file catch one-term errors?

    python -m tests.mutation_pass [--per-module 8] [--seed 0] [--out results/mutation.md]

For every module in ``MODULES`` the tool lists each place where one term can be changed (an
arithmetic operator swapped, a comparison made strict or loose, a sign dropped, a numeric constant
changed, a boolean flipped; argument checks that only raise ``ValueError`` are left out), draws
``--per-module`` of them at random (``--seed``), and runs the module's test file against each
mutant in a scratch copy of the repository (``pytest -x``). A mutant is *killed* when the file
fails (or runs past ``--timeout``), *survives* when it passes. The table in ``--out`` gives the
kill rate per module and every survivor with its line, for a person to judge whether it is
equivalent (no observable change) or a gap in the tests. The working tree is never modified.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Each module's own tests: its test file and the pinned defaults of every public factory.
MODULES = {
    "accelerated": ("tests/test_accelerated.py", "tests/test_defaults.py"),
    "schedule_free": ("tests/test_schedule_free.py", "tests/test_defaults.py"),
    "ademamix": ("tests/test_ademamix.py", "tests/test_defaults.py"),
    "mars": ("tests/test_mars.py", "tests/test_defaults.py"),
    "adaptive_memory": ("tests/test_adaptive_memory.py", "tests/test_defaults.py"),
    "mada": ("tests/test_mada.py", "tests/test_defaults.py"),
    "hypergradient": ("tests/test_mada.py", "tests/test_defaults.py"),
}
SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
        ast.Pow: ast.Mult, ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
        ast.Eq: ast.NotEq, ast.NotEq: ast.Eq}


@dataclasses.dataclass(frozen=True)
class Mutant:
  module: str
  index: int  # position in the module's list of candidate places
  line: int
  description: str


def _is_check(node: ast.stmt) -> bool:
  """An argument check: ``C.check_*(...)`` / ``check_*(...)``, or ``if ...: raise ValueError``."""
  if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
    func = node.value.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    return name.startswith("check_")
  if isinstance(node, ast.If):
    return all(isinstance(s, ast.Raise) for s in node.body) and not node.orelse
  return isinstance(node, ast.Raise)


def _candidates(tree: ast.AST) -> list[tuple[ast.AST, str]]:
  """Every mutable node (in a fixed order) with a description of its mutation."""
  skip = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.stmt) and _is_check(node):
      skip.update(id(n) for n in ast.walk(node))
  out = []
  for node in ast.walk(tree):
    if id(node) in skip:
      continue
    if isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in SWAP:
      out.append((node, f"{type(node.op).__name__} -> {SWAP[type(node.op)].__name__}"))
    elif isinstance(node, ast.Compare) and type(node.ops[0]) in SWAP:
      out.append((node, f"{type(node.ops[0]).__name__} -> {SWAP[type(node.ops[0])].__name__}"))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
      out.append((node, "drop unary minus"))
    elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
      out.append((node, f"{node.value!r} -> {_new_constant(node.value)!r}"))
    elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
      out.append((node, f"{node.value} -> {not node.value}"))
  return out


def _new_constant(value):
  if isinstance(value, int):
    return value + 1
  return 2.0 * value if value else 1.0


def _mutate(node: ast.AST):
  if isinstance(node, (ast.BinOp, ast.AugAssign)):
    node.op = SWAP[type(node.op)]()
  elif isinstance(node, ast.Compare):
    node.ops[0] = SWAP[type(node.ops[0])]()
  elif isinstance(node, ast.Constant):
    node.value = (not node.value) if isinstance(node.value, bool) else _new_constant(node.value)


def mutant_source(source: str, index: int) -> str:
  tree = ast.parse(source)
  node = _candidates(tree)[index][0]
  if isinstance(node, ast.UnaryOp):  # replace -x by x in its parent
    for parent in ast.walk(tree):
      for field, value in ast.iter_fields(parent):
        if value is node:
          setattr(parent, field, node.operand)
        elif isinstance(value, list) and node in value:
          value[value.index(node)] = node.operand
  else:
    _mutate(node)
  return ast.unparse(tree)


def list_mutants(module: str) -> list[Mutant]:
  with open(os.path.join(ROOT, "optax_accel", module + ".py")) as f:
    tree = ast.parse(f.read())
  return [Mutant(module, i, node.lineno, text) for i, (node, text) in enumerate(_candidates(tree))]


def _scratch_copy(destination: str):
  for name in ("optax_accel", "tests", "experiments"):
    shutil.copytree(os.path.join(ROOT, name), os.path.join(destination, name),
                    ignore=shutil.ignore_patterns("__pycache__"))
  for name in ("conftest.py", "pyproject.toml"):
    shutil.copy(os.path.join(ROOT, name), destination)


def run_tests(workdir: str, test_files, timeout: float) -> tuple[str, float]:
  """('passed' | 'failed' | 'timeout', seconds) for ``test_files`` in ``workdir``."""
  env = {**os.environ, "PYTHONPATH": workdir, "JAX_PLATFORMS": "cpu"}
  command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-n", "0",
             "--no-header", *test_files]
  start = time.perf_counter()
  try:
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return "timeout", time.perf_counter() - start
  return ("passed" if result.returncode == 0 else "failed"), time.perf_counter() - start


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--modules", nargs="+", default=list(MODULES), choices=list(MODULES))
  parser.add_argument("--per-module", type=int, default=8)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--timeout", type=float, default=600.0)
  parser.add_argument("--only", nargs="+", default=None, metavar="MODULE:INDEX",
                      help="run these mutants only (e.g. the survivors of an earlier pass)")
  parser.add_argument("--out", default=os.path.join(ROOT, "results", "mutation.md"))
  args = parser.parse_args(argv)
  rng = random.Random(args.seed)
  only = {}
  for item in args.only or ():
    module, index = item.split(":")
    only.setdefault(module, []).append(int(index))
  results = []
  with tempfile.TemporaryDirectory() as workdir:
    _scratch_copy(workdir)
    for module in (list(only) if args.only else args.modules):
      test_files = MODULES[module]
      status, seconds = run_tests(workdir, test_files, args.timeout)
      if status != "passed":
        raise SystemExit(f"{test_files} do not pass unmutated ({status}); fix them first")
      path = os.path.join(workdir, "optax_accel", module + ".py")
      with open(path) as f:
        original = f.read()
      mutants = list_mutants(module)
      chosen = ([mutants[i] for i in only[module]] if args.only else
                sorted(rng.sample(mutants, min(args.per_module, len(mutants))),
                       key=lambda m: m.index))
      print(f"{module}: {len(mutants)} places, testing {len(chosen)} ({' '.join(test_files)} "
            f"pass unmutated in {seconds:.0f} s)", file=sys.stderr)
      try:
        for mutant in chosen:
          with open(path, "w") as f:
            f.write(mutant_source(original, mutant.index))
          status, seconds = run_tests(workdir, test_files, args.timeout)
          results.append((mutant, len(mutants), "survived" if status == "passed" else
                          "killed" if status == "failed" else "killed (timeout)"))
          print(f"  {module}:{mutant.index} line {mutant.line}: {mutant.description}: {results[-1][2]} "
                f"({seconds:.0f} s)", file=sys.stderr)
      finally:
        with open(path, "w") as f:
          f.write(original)
  write_report(args, results)


def write_report(args, results):
  lines = ["# Mutation pass over the update-rule modules", "",
           f"- command: `python -m tests.mutation_pass --per-module {args.per_module} "
           f"--seed {args.seed}`",
           "- each mutant changes one term of `optax_accel/<module>.py` (operator swap, strict vs "
           "loose comparison, dropped sign, changed constant, flipped boolean; argument checks "
           "excluded) and runs the module's own test file with `pytest -x`",
           "- mutants are a random sample of each module's places (the places column), so the "
           "kill rate is an estimate; survivors are listed for review below", "",
           "| module | test file | places | sampled | killed | kill rate |", "|---|---|---|---|---|---|"]
  for module in dict.fromkeys(m.module for m, _, _ in results):
    rows = [(m, n, s) for m, n, s in results if m.module == module]
    killed = sum(s.startswith("killed") for _, _, s in rows)
    lines.append(f"| {module} | {', '.join(MODULES[module])} | {rows[0][1]} | {len(rows)} | {killed} | "
                 f"{killed / len(rows):.0%} |")
  killed = sum(s.startswith("killed") for _, _, s in results)
  lines += [f"| all | | | {len(results)} | {killed} | {killed / len(results):.0%} |", "",
            "## Survivors", "", "| mutant | line | mutation |", "|---|---|---|"]
  lines += [f"| {m.module}:{m.index} | {m.line} | {m.description} |"
            for m, _, s in results if s == "survived"]
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
