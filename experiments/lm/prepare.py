"""Tokenize a corpus into token shards for the training script.

    python -m experiments.lm.prepare --input ~/texts --tokenizer gpt2 --out ~/data/texts-gpt2
    python -m experiments.lm.prepare --input web.jsonl --tokenizer sp:t5.model --out ~/data/web
    python -m experiments.lm.prepare --dataset allenai/c4 en --val-split validation \\
        --tokenizer hf:t5/tokenizer.json --max-train-tokens 1_100_000_000 --out ~/data/c4-t5
    python -m experiments.lm.prepare --verify ~/data/c4-t5

Inputs: text files and folders (``*.txt``, each file one document), JSONL files (one document per
line, ``--text-field``), or a Hugging Face dataset name streamed with ``datasets`` (the ``data``
extra; the only step that may reach the network). Output, in ``--out``: llm.c-format shards
``tokens_{train,val}_NNNNNN.bin`` (256 x int32 header; uint16 ids when the vocabulary fits, else
uint32), each with its documents' starts (``.docs.npy``), and ``meta.json`` (tokenizer, vocabulary,
special ids, token and document counts per split, largest id, a blake2b digest per shard).
A tokenizer with an end-of-text token has it appended to every document.

Validation: a dataset's own split (``--val-split``), else every document whose index i has
floor((i + 1) f) > floor(i f), for ``--val-fraction`` f (spread evenly, streaming-safe:
``--split docs``, the default for JSONL and datasets), or the last fraction f of the token stream
(``--split tail``, the default for text files; as nanoGPT's character-level prepare and this
script's text loader split, so the result trains exactly as the text itself does).

Resumable: shards are written whole (renamed into place) and ``progress.json`` records, per split,
the last document each holds; the same command started again continues from there and writes the
same shards as an uninterrupted run. Tokenization runs on ``--workers`` processes.
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import pathlib
import sys
from collections.abc import Iterator

import numpy as np

from experiments.lm import data as data_lib
from experiments.lm import tokenization

PROGRESS = "progress.json"
DOCS_PER_TASK = 64


def _iter_inputs(paths: list[str], text_field: str) -> Iterator[str | bytes]:
  """The documents of text files, folders and JSONL files, in the order given."""
  for raw in paths:
    path = pathlib.Path(raw).expanduser()
    if path.is_dir():
      files = sorted(path.rglob("*.txt"))
      if not files:
        raise data_lib.DataError(f"no .txt files in {path}")
      for file in files:
        yield file.read_bytes()
    elif path.name.endswith((".jsonl", ".jsonl.gz")):
      opener = gzip.open if path.name.endswith(".gz") else open
      with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
          if not line.strip():
            continue
          try:
            yield json.loads(line)[text_field]
          except (json.JSONDecodeError, KeyError, TypeError):
            raise data_lib.DataError(f"{path}:{number} is not a JSON object with a "
                                     f"{text_field!r} field") from None
    elif path.is_file():
      yield path.read_bytes()
    else:
      raise data_lib.DataError(f"input {path} does not exist")


def _iter_dataset(name: list[str], split: str, text_field: str, skip: int) -> Iterator[str]:
  try:
    import datasets  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise data_lib.DataError('--dataset needs the datasets package: pip install -e '
                             '".[experiments,data]"') from None
  stream = datasets.load_dataset(*name, split=split, streaming=True)
  if skip:
    stream = stream.skip(skip)
  for record in stream:
    yield record[text_field]


# Tokenization in worker processes (the tokenizer is built once per process from its spec).
_WORKER_TOKENIZER = None


def _init_worker(spec: str):
  global _WORKER_TOKENIZER  # pylint: disable=global-statement
  _WORKER_TOKENIZER = tokenization.get_tokenizer(spec)


def _encode_many(docs: list) -> list[np.ndarray]:
  return [data_lib.encode(_WORKER_TOKENIZER, d) for d in docs]


@contextlib.contextmanager
def _pool(workers: int, spec: str):
  """An ordered ``imap`` over a process pool that tokenizes (in this process for one worker)."""
  if workers == 1:
    _init_worker(spec)
    yield map
    return
  with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker,
                                                 initargs=(spec,)) as pool:
    yield pool.imap


def _batched(items, n):
  iterator = iter(items)
  while batch := list(itertools.islice(iterator, n)):
    yield batch


def is_val(index: int, fraction: float) -> bool:
  """Document ``index`` belongs to validation: fraction f of the documents, spread evenly."""
  return math.floor((index + 1) * fraction) > math.floor(index * fraction)


class ShardWriter:
  """Buffers one split's documents and writes a shard whenever ``shard_tokens`` are buffered."""

  def __init__(self, out: pathlib.Path, split: str, dtype, shard_tokens: int, done: dict):
    self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
    self.shards = list(done.get("shards", []))
    self.last_doc = done.get("last_doc", -1)  # index of the last document on disk
    self.pieces, self.buffered, self.pending_last = [], 0, self.last_doc

  def add(self, index: int, tokens: np.ndarray, tokenizer) -> bool:
    """Adds document ``index`` (its ids, separator added here); True when a shard was written."""
    if index <= self.last_doc:
      return False  # already on disk (a resumed run)
    tokens = data_lib.with_separator(tokenizer, tokens, first=not (self.shards or self.pieces))
    self.pieces.append(tokens)
    self.buffered += len(tokens)
    self.pending_last = index
    if self.buffered >= self.shard_tokens:
      self.flush()
      return True
    return False

  def flush(self):
    if not self.pieces:
      return
    tokens = np.concatenate(self.pieces).astype(self.dtype)
    starts = np.cumsum([0] + [len(p) for p in self.pieces[:-1]]).astype(np.int64)
    name = f"tokens_{self.split}_{len(self.shards):06d}"
    path = self.out / f"{name}.bin"
    data_lib.write_llmc_shard(path, tokens)
    np.save(self.out / f"{name}.docs.npy", starts)
    self.shards.append({"file": path.name, "documents_file": f"{name}.docs.npy",
                        "tokens": int(len(tokens)), "documents": int(len(starts)),
                        "max_id": int(tokens.max()) if len(tokens) else -1,
                        "blake2b": file_digest(path)})
    self.last_doc, self.pieces, self.buffered = self.pending_last, [], 0

  def state(self) -> dict:
    return {"shards": self.shards, "last_doc": self.last_doc}

  def summary(self) -> dict:
    return {"shards": self.shards, "tokens": sum(s["tokens"] for s in self.shards),
            "documents": sum(s["documents"] for s in self.shards),
            "max_id": max((s["max_id"] for s in self.shards), default=-1)}


def file_digest(path: pathlib.Path) -> str:
  digest = hashlib.blake2b(digest_size=16)
  with open(path, "rb") as f:
    while chunk := f.read(1 << 24):
      digest.update(chunk)
  return digest.hexdigest()


def _write_json(path: pathlib.Path, value: dict):
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(value, indent=1))
  os.replace(tmp, path)


def _progress_bar(enabled: bool):
  if not enabled:
    return None
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(unit=" docs", file=sys.stderr, dynamic_ncols=True)


def prepare(args) -> dict:
  """Writes the shards and meta.json; returns the metadata."""
  tokenizer = tokenization.get_tokenizer(args.tokenizer)
  out = pathlib.Path(args.out).expanduser()
  identity = {"inputs": [str(pathlib.Path(p).expanduser().resolve()) for p in args.input or []],
              "dataset": args.dataset, "val_split": args.val_split, "tokenizer": args.tokenizer,
              "split": args.split, "val_fraction": args.val_fraction,
              "shard_tokens": args.shard_tokens, "text_field": args.text_field,
              "max_train_tokens": args.max_train_tokens, "max_val_tokens": args.max_val_tokens}
  if (out / data_lib.META).is_file():
    meta = data_lib.read_json(out / data_lib.META)
    if meta.get("source") != identity:
      raise data_lib.DataError(f"{out} already holds tokens prepared with other settings; choose "
                               "another --out (nothing was changed)")
    print(f"{out} is already prepared ({meta['splits']['train']['tokens']} train tokens)",
          file=sys.stderr)
    return meta
  out.mkdir(parents=True, exist_ok=True)
  progress = data_lib.read_json(out / PROGRESS) if (out / PROGRESS).is_file() else {
      "source": identity, "splits": {}}
  if progress["source"] != identity:
    raise data_lib.DataError(f"{out} holds a partial prepare with other settings; choose another "
                             "--out or delete it")
  dtype = data_lib.token_dtype(tokenizer.vocab_size)
  limits = {"train": args.max_train_tokens, "val": args.max_val_tokens}
  writers = {s: ShardWriter(out, s, dtype, args.shard_tokens, progress["splits"].get(s, {}))
             for s in ("train", "val")}

  def save_progress():
    _write_json(out / PROGRESS, {"source": identity,
                                 "splits": {s: w.state() for s, w in writers.items()}})

  def full(split):
    limit = limits[split]
    written = sum(s["tokens"] for s in writers[split].shards) + writers[split].buffered
    return limit is not None and written >= limit

  # Streams of (split or None, documents); None: assigned by index with the val fraction.
  if args.dataset:
    streams = [("train" if args.val_split else None, args.train_split)]
    streams += [("val", args.val_split)] if args.val_split else []
  else:
    streams = [(None, None)]
  bar = _progress_bar(args.progress)
  with _pool(args.workers, args.tokenizer) as imap:
    for fixed, hf_split in streams:
      splits = [fixed] if fixed else ["train", "val"]
      skip = min(writers[s].last_doc for s in splits) + 1
      if args.dataset:
        docs = _iter_dataset(args.dataset, hf_split, args.text_field, skip)
      else:
        docs = itertools.islice(_iter_inputs(args.input, args.text_field), skip, None)
      index = skip
      for encoded in imap(_encode_many, _batched(docs, DOCS_PER_TASK)):
        for tokens in encoded:
          split = fixed or ("val" if args.split == "docs" and is_val(index, args.val_fraction)
                            else "train")
          if not full(split) and writers[split].add(index, tokens, tokenizer):
            save_progress()
          index += 1
        if bar is not None:
          bar.update(len(encoded))
          bar.set_postfix(train=writers["train"].buffered + sum(
              s["tokens"] for s in writers["train"].shards), refresh=False)
        if all(full(s) for s in splits):
          break
  if bar is not None:
    bar.close()
  if args.split == "tail" and not args.dataset:
    _split_tail(writers, args.val_fraction)
  for writer in writers.values():
    writer.flush()
  meta = {"format": "optax_accel tokens", "version": 1, "tokenizer": tokenizer.describe(),
          "dtype": np.dtype(dtype).name, "source": identity,
          "splits": {s: w.summary() for s, w in writers.items()}}
  for split, info in meta["splits"].items():
    if not info["tokens"]:
      for writer in writers.values():  # this run's files go: a corrected command starts afresh
        for shard in writer.shards:
          (out / shard["file"]).unlink(missing_ok=True)
          (out / shard["documents_file"]).unlink(missing_ok=True)
      (out / PROGRESS).unlink(missing_ok=True)
      if not any(out.iterdir()):
        out.rmdir()
      raise data_lib.DataError(f"the {split} split is empty (raise --val-fraction or give more "
                               "input); nothing was written")
  _write_json(out / data_lib.META, meta)
  (out / PROGRESS).unlink(missing_ok=True)
  return meta


def _split_tail(writers: dict, fraction: float):
  """Moves the last ``fraction`` of the (still buffered) token stream to validation."""
  train = writers["train"]
  if train.shards:
    raise data_lib.DataError("--split tail keeps the corpus in memory: raise --shard-tokens above "
                             "the corpus size or use --split docs")
  lengths = [len(p) for p in train.pieces]
  tokens = np.concatenate(train.pieces) if train.pieces else np.zeros(0, train.dtype)
  starts = np.cumsum([0] + lengths[:-1])
  cut = int(len(tokens) * (1 - fraction))
  train.pieces = [tokens[a:b] for a, b in zip(starts, [*starts[1:], len(tokens)]) if a < cut]
  if train.pieces:
    train.pieces[-1] = train.pieces[-1][:cut - starts[starts < cut][-1]]
  val_starts = [cut] + [int(a) for a in starts if a > cut]
  writers["val"].pieces = [tokens[a:b] for a, b in zip(val_starts, [*val_starts[1:], len(tokens)])]
  train.buffered, writers["val"].buffered = cut, len(tokens) - cut
  train.pending_last = writers["val"].pending_last = train.pending_last


def verify(folder: str) -> list[str]:
  """Shards whose digest or size differs from meta.json (empty: all intact)."""
  folder = pathlib.Path(folder).expanduser()
  meta = data_lib.read_json(folder / data_lib.META)
  bad = []
  for info in meta["splits"].values():
    for shard in info["shards"]:
      path = folder / shard["file"]
      if not path.is_file() or file_digest(path) != shard["blake2b"]:
        bad.append(shard["file"])
  return bad


def _int(text: str) -> int:
  value = int(text.replace("_", ""))
  if value <= 0:
    raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
  return value


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split("\n", 2)[2])
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--input", nargs="+", help="text files, folders of *.txt, JSONL files")
  source.add_argument("--dataset", nargs="+", metavar=("NAME", "CONFIG"),
                      help="a Hugging Face dataset (streamed), e.g. allenai/c4 en")
  source.add_argument("--verify", metavar="DIR", help="check every shard's digest and exit")
  parser.add_argument("--out", help="output folder")
  parser.add_argument("--tokenizer", default="gpt2", help="bytes, gpt2[:DIR], hf:PATH, sp:PATH")
  parser.add_argument("--text-field", default="text")
  parser.add_argument("--train-split", default="train", help="the dataset's training split")
  parser.add_argument("--val-split", default=None, help="the dataset's validation split, if any")
  parser.add_argument("--split", choices=("docs", "tail"), default=None,
                      help="how validation is taken without --val-split (default: tail for text "
                           "files and folders, docs otherwise)")
  parser.add_argument("--val-fraction", type=float, default=None,
                      help="default 0.1 with --split tail, 0.0005 with docs (nanoGPT's OWT)")
  parser.add_argument("--shard-tokens", type=_int, default=100_000_000)
  parser.add_argument("--max-train-tokens", type=_int, default=None)
  parser.add_argument("--max-val-tokens", type=_int, default=None)
  parser.add_argument("--workers", type=_int, default=max(1, (os.cpu_count() or 2) - 1))
  parser.add_argument("--no-progress", dest="progress", action="store_false")
  args = parser.parse_args(argv)
  try:
    if args.verify:
      bad = verify(args.verify)
      if bad:
        print(f"error: {len(bad)} shard(s) differ from meta.json: {', '.join(bad[:5])}",
              file=sys.stderr)
        return 2
      print(f"{args.verify}: every shard matches its digest")
      return 0
    if not args.out:
      parser.error("--out is required")
    text_only = args.input and all(not p.endswith((".jsonl", ".jsonl.gz")) for p in args.input)
    args.split = args.split or ("tail" if text_only else "docs")
    if args.split == "tail" and not text_only:
      raise data_lib.DataError("--split tail is for text files and folders; use --split docs")
    if args.val_fraction is None:
      args.val_fraction = 0.1 if args.split == "tail" else 0.0005
    if not 0 < args.val_fraction < 1 and not (args.dataset and args.val_split):
      raise data_lib.DataError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    if args.dataset and len(args.dataset) > 2:
      raise data_lib.DataError("--dataset takes a name and at most one config")
    meta = prepare(args)
  except (data_lib.DataError, tokenization.TokenizerError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  counts = ", ".join(f"{s} {v['tokens']} tokens in {len(v['shards'])} shard(s)"
                     for s, v in meta["splits"].items())
  print(f"{args.out}: {counts} ({meta['tokenizer']['spec']}, vocabulary "
        f"{meta['tokenizer']['vocab_size']})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
