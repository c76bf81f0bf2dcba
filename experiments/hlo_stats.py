"""Figures read off the entry computation of an optimised HLO module (``compiled.as_text()``).

Used by ``experiments.lm.aot`` and ``benchmarks.step_traffic``. Every instruction of the entry
computation is a kernel or a data movement; fused computations are not looked into.

Why ``hbm_bytes`` next to the cost analysis's "bytes accessed": the TPU compiler's memory-space
assignment may stage a kernel's operands into on-chip memory (VMEM, ``S(1)`` in a layout) with
``copy-start``/``slice-start`` and write results back the same way. "bytes accessed" counts both
sides of each such transfer and the kernel's own on-chip reads again, so it grows with staging
that moves no extra byte over HBM. ``hbm_bytes`` counts each operand and result once, on the HBM
side only (memory space 0): an HBM-to-VMEM transfer is one HBM read, the kernel's read of the
staged copy is free.
"""
from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np

_ITEMSIZE = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2,
             "s16": 2, "u16": 2, "s8": 1, "u8": 1, "pred": 1}
_ARRAY = re.compile("({})".format("|".join(_ITEMSIZE)) + r"\[([\d,]*)\](\{[^}]*\})?")
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?(%\S+) = (.*?) ([a-z][a-z0-9\-]*)\((.*)")
_NOT_KERNELS = ("parameter", "constant", "tuple", "get-tuple-element", "bitcast")
_ASYNC_DONE = ("copy-done", "slice-done")


class Array(NamedTuple):
  elements: int
  nbytes: int
  in_hbm: bool  # memory space 0 (no S(n) in the layout)


class Instruction(NamedTuple):
  name: str
  op: str
  outputs: list  # [Array]
  operands: list  # [[Array], ...] one list per operand (a tuple operand has several)


def arrays(shape: str) -> list:
  out = []
  for dtype, dims, layout in _ARRAY.findall(shape):
    elements = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
    out.append(Array(elements, elements * _ITEMSIZE[dtype], "S(" not in (layout or "")))
  return out


def entry_instructions(hlo: str) -> list:
  """The entry computation's instructions, with operand shapes resolved. The entry is the
  module's last computation; it ends at the text's last closing brace, not its first (a Pallas
  kernel's backend config may hold a line that starts with one)."""
  body = hlo[hlo.index("\nENTRY"):]
  body = body[:body.rindex("\n}")]
  parsed = [m.groups() for m in map(_INSTRUCTION.match, body.splitlines()[1:]) if m]
  shapes = {name: shape for name, shape, _, _ in parsed}
  return [Instruction(name, op, arrays(shape),
                      [arrays(shapes.get(o, "")) for o in re.findall(r"%[\w.\-]+",
                                                                     rest.split(")")[0])])
          for name, shape, op, rest in parsed]


def kernels(instructions: list) -> int:
  """Instructions that run (not parameters, constants, tuples, bitcasts or async completions)."""
  return sum(ins.op not in _NOT_KERNELS + _ASYNC_DONE for ins in instructions)


def large_copies(instructions: list, min_elements: int) -> int:
  """Synchronous ``copy`` kernels of at least ``min_elements`` elements: a value read after its
  buffer was updated in place, or a layout change (a real extra read and write)."""
  return sum(ins.op == "copy" and ins.outputs[0].elements >= min_elements
             for ins in instructions)


def staged_transfers(instructions: list, min_elements: int) -> int:
  """Asynchronous ``copy-start``/``slice-start`` of at least ``min_elements`` elements: operands
  staged into on-chip memory or results written back by memory-space assignment."""
  return sum(ins.op in ("copy-start", "slice-start") and ins.operands
             and ins.operands[0] and ins.operands[0][0].elements >= min_elements
             for ins in instructions)


def hbm_bytes(instructions: list) -> int:
  """Bytes moved to or from HBM by the entry computation's kernels (module docstring)."""
  total = 0
  for ins in instructions:
    if ins.op in _NOT_KERNELS + _ASYNC_DONE:
      continue
    if ins.op == "copy-start":  # (destination, source, context): each side once
      total += sum(a.nbytes for a in ins.outputs[:2] if a.in_hbm)
    elif ins.op == "slice-start":  # ((source), destination, context): the slice is read
      total += ins.outputs[1].nbytes if ins.outputs[0].in_hbm else 0
    else:
      total += sum(a.nbytes for a in ins.outputs if a.in_hbm)
      total += sum(a.nbytes for operand in ins.operands for a in operand if a.in_hbm)
  return total
