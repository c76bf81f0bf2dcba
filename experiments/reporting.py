"""Writing reproduction results: a CSV, a Markdown table (with the command and the scale), plots."""
from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from typing import Any

import jax


def command_line() -> str:
  """The command that is running, as a user would type it."""
  argv = list(sys.argv)
  if argv and argv[0].endswith(".py") and os.sep in argv[0]:
    module = os.path.relpath(argv[0]).removesuffix(".py").replace(os.sep, ".")
    return "python -m " + " ".join([module] + [shlex.quote(a) for a in argv[1:]])
  return " ".join(shlex.quote(a) for a in argv)


def environment() -> str:
  device = jax.devices()[0]
  return (f"{datetime.date.today()}, {device.platform} ({os.cpu_count()} CPU threads, "
          f"{platform.machine()}), jax {jax.__version__}")


def _fmt(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:.4g}"
  return "" if value is None else str(value)


def write_json(path: str, value: Any, *, indent: int | None = None):
  """``value`` as JSON at ``path``, whole or not at all: written beside it, then renamed over it,
  so a run killed mid-write leaves no partial file for a resume to trip on."""
  with open(path + ".tmp", "w") as f:
    json.dump(value, f, indent=indent)
  os.replace(path + ".tmp", path)


def _write_csv(path: str, rows: Sequence[dict]):
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)


def _markdown(rows: Sequence[dict]) -> list[str]:
  columns = list(rows[0])
  return (["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
          + ["| " + " | ".join(_fmt(r[c]).replace("|", "/") for c in columns) + " |"
             for r in rows])


def write_table(path_stem: str, rows: Sequence[dict], *, title: str, notes: Sequence[str] = (),
                claims: Sequence[dict] | None = None) -> str:
  """Writes ``path_stem``.csv and ``path_stem``.md; returns the Markdown text.

  ``claims``: rows of :func:`experiments.verdicts.claim_row` (the paper's claims with our verdict);
  they head the Markdown file and are written to ``path_stem``_claims.csv. A reproduction passes
  them (an empty list says in the file that it tests no claim)."""
  os.makedirs(os.path.dirname(path_stem) or ".", exist_ok=True)
  _write_csv(path_stem + ".csv", rows)
  lines = [f"# {title}", "", f"- command: `{command_line()}`", f"- run: {environment()}"]
  lines += [f"- {n}" for n in notes]
  if claims is not None:
    lines += ["", "## Claims and verdicts", ""]
    if claims:
      _write_csv(path_stem + "_claims.csv", claims)
      lines += _markdown(claims)
    else:
      lines.append("No paper claim is tested by this table.")
    lines += ["", "## Measurements"]
  lines += [""] + _markdown(rows)
  text = "\n".join(lines) + "\n"
  with open(path_stem + ".md", "w") as f:
    f.write(text)
  return text


def pyplot():
  """matplotlib.pyplot with a non-interactive backend."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt
