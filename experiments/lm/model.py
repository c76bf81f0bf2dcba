"""GPT-2 and LLaMA decoder-only language models in Flax NNX, with size presets.

GPT-2 (nanoGPT's model): learned positions, pre-LayerNorm blocks, GELU MLP (4d), biases (or
none: ``bias=False``, nanoGPT's option), output layer tied to the token embedding. LLaMA: RMSNorm,
rotary position embeddings, SwiGLU MLP, no biases, untied output layer. Both are built from the
same parts (attention, norms, MLPs) and read top to bottom in their ``__call__``.

Dropout (``dropout`` > 0, nanoGPT's four places: the input embedding, the attention weights, and
the output of each attention and MLP before it joins the residual stream) applies only when the
loss is given a ``dropout_key``: training passes one per step and microbatch, evaluation none.

Scale features, all numerically neutral:

- the vocabulary is padded to a multiple of 128 (GPT-2: 50257 -> 50304, as nanoGPT does) so that
  the embedding and output layer shard evenly; padded logits are masked out of softmax and loss;
- activations are constrained to the batch sharding over the mesh axes ``("data", "fsdp")`` at
  every block boundary when such a mesh is active, so the compiler never replicates the batch;
- ``remat``: "none", "block" (keep each block's input and, where a fused kernel runs, the
  attention output and its softmax statistics), "offload" (what "block" keeps, moved to host
  memory in the forward pass and back in the backward pass; with ``scan_layers`` "loop" or
  "unrolled", each block's input too), "full" (keep only each block's input) or "dots_saveable"
  (keep matmul outputs, recompute the elementwise rest);
- ``lookup_sharding``: "vocab" (default: the input embedding is looked up in the table as its
  parameter is sharded, over the vocabulary, which gathers the whole table and all-reduces its
  whole gradient) or "d_model" (looked up in a compute-dtype copy sharded over d_model: each
  device gathers its columns of every row asked for, and the gradient is summed per column
  shard; two small all-to-alls instead);
- ``attention``: "auto" (default) runs the fused kernel of the platform (TPU: Pallas splash
  attention, from 512 tokens; GPU: cuDNN flash attention, in half precision) and XLA elsewhere,
  where the T x T scores live in the compute dtype, never f32 (:func:`xla_attention`);
- ``scan_layers``: "none" (default: the blocks unrolled), "loop" (one ``lax.scan`` over the
  blocks' weights stacked at run time, so the compiler plans one block's buffers for all; the
  parameters keep their per-block layout) or "unrolled" (the same scan unrolled: what the cost
  analysis counts, since it counts a loop body once);
- :func:`softmax_cross_entropy` fuses the output layer with the loss and forms the logits'
  gradient in the forward pass, ``loss_chunk`` sequence positions at a time, so the f32 logits
  of a whole microbatch are never alive at once (and nothing is recomputed);
  ``serial_loss_chunks``: an optimization barrier between the chunks, so that the compiler cannot
  overlap them either (fewer chunks' logits alive at once).

Parameters are float32; ``compute_dtype="bfloat16"`` runs the matmuls in bf16.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

BATCH_AXES = ("data", "fsdp")  # the mesh axes the batch dimension is split over
# The name the splash kernel gives its residuals (its output and the softmax statistics), and the
# primitives of cuDNN's forward kernel (as traced, and inside).
SPLASH_RESIDUALS = "splash_residuals"
CUDNN_KERNELS = ("dot_product_attention_fwd_wrapper", "dot_product_attention_fwd")


def _cudnn_kernels(prim, *_, **__) -> bool:
  return prim.name in CUDNN_KERNELS


# Remat policy "block": keep only the fused attention kernels' residuals, so the backward pass does
# not run the forward kernel again. For splash these are its output and its log-sum-exp per query
# (f32, heads x T), not the kernel's raw statistics output, which repeats each value over 128 lanes
# (32 MiB per layer per chip for LLaMA-1B at 2048 tokens, against 256 KiB).
save_attention_kernels = jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.save_only_these_names(SPLASH_RESIDUALS), _cudnn_kernels)

# Remat policy "offload": the values "block" keeps, and each scanned block's input (named
# BLOCK_INPUT in run_blocks), moved to pinned host memory as the forward pass makes them and back
# for the backward pass, so the device does not hold every layer's residuals at once. cuDNN's
# residuals (not named) stay on the device.
BLOCK_INPUT = "block_input"
_offload_named = jax.checkpoint_policies.save_and_offload_only_these_names(
    names_which_can_be_saved=[], names_which_can_be_offloaded=[SPLASH_RESIDUALS, BLOCK_INPUT],
    offload_src="device", offload_dst="pinned_host")


def offload_attention_kernels(prim, *args, **params):
  return True if _cudnn_kernels(prim) else _offload_named(prim, *args, **params)


REMAT_POLICIES = {"none": None, "block": save_attention_kernels,
                  "offload": offload_attention_kernels,
                  "full": jax.checkpoint_policies.nothing_saveable,
                  "dots_saveable": jax.checkpoint_policies.dots_saveable}
REMAT_KEEPING_KERNELS = ("block", "offload")  # the policies that keep the kernels' residuals
LOOKUP_SHARDING = ("vocab", "d_model")
VOCAB_MULTIPLE = 128
ATTENTION = ("auto", "xla", "splash", "cudnn")
SCAN_LAYERS = ("none", "loop", "unrolled")
SPLASH_BLOCK = 128  # the splash kernel's block along the sequence (seq_len a multiple of it)
# Below this many tokens "auto" keeps the XLA path on TPU: compiled for v5e-16, the kernel's step
# moved more bytes than XLA's at 256 tokens (LLaMA-60M/100M, GPT-2 6 x 384) and fewer from 512 on
# (results/scale/recipes/).
SPLASH_MIN_SEQ = 512
CUDNN_DTYPES = ("bfloat16", "float16")  # cuDNN's flash attention takes half precision only


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  arch: str  # "gpt2" or "llama"
  vocab_size: int
  n_layer: int
  n_head: int
  d_model: int
  context: int
  d_ff: int = 0  # LLaMA's SwiGLU width (GPT-2 uses 4 d_model)
  compute_dtype: str = "float32"
  rope_base: float = 10_000.0
  remat: str = "none"
  loss_chunk: int = 0  # sequence positions per fused output-layer + loss chunk; 0: whole
  bias: bool | None = None  # linear and LayerNorm biases; None: the arch's (GPT-2 yes, LLaMA no)
  dropout: float = 0.0  # rate in [0, 1), in training only
  attention: str = "auto"  # "auto", "xla", "splash" (Pallas TPU kernel), "cudnn" (GPU kernel)
  scan_layers: str = "none"  # "none", "loop" or "unrolled" (see run_blocks)
  lookup_sharding: str = "vocab"  # the input embedding's lookup: "vocab" or "d_model" (above)
  serial_loss_chunks: bool = False  # the loss chunks one after another (above)

  def __post_init__(self):
    if self.arch not in ("gpt2", "llama"):
      raise ValueError(f"model arch must be 'gpt2' or 'llama', got {self.arch!r}")
    if self.bias not in (None, True, False):
      raise ValueError(f"model bias must be true, false or none, got {self.bias!r}")
    if self.arch == "llama" and self.bias:
      raise ValueError("model bias: LLaMA has no biases")
    if (isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float))
        or not 0 <= self.dropout < 1):
      raise ValueError(f"model dropout must be a rate in [0, 1), got {self.dropout!r}")
    if self.attention not in ATTENTION:
      raise ValueError(f"model attention must be one of {', '.join(ATTENTION)}, got "
                       f"{self.attention!r}")
    if self.attention in ("splash", "cudnn") and self.dropout:
      raise ValueError(f"model attention {self.attention!r} has no dropout on the attention "
                       "weights; use attention 'xla' or 'auto' with dropout")
    if self.attention == "cudnn" and self.compute_dtype not in CUDNN_DTYPES:
      raise ValueError(f"model attention 'cudnn' needs compute_dtype in {CUDNN_DTYPES}, got "
                       f"{self.compute_dtype!r}")
    if self.d_model % self.n_head:
      raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"model remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}")
    if self.scan_layers not in SCAN_LAYERS:
      raise ValueError(f"model scan_layers must be one of {', '.join(SCAN_LAYERS)}, got "
                       f"{self.scan_layers!r}")
    if self.lookup_sharding not in LOOKUP_SHARDING:
      raise ValueError(f"model lookup_sharding must be one of {', '.join(LOOKUP_SHARDING)}, "
                       f"got {self.lookup_sharding!r}")
    if not isinstance(self.serial_loss_chunks, bool):
      raise ValueError(f"model serial_loss_chunks must be true or false, got "
                       f"{self.serial_loss_chunks!r}")
    if not isinstance(self.loss_chunk, int) or self.loss_chunk < 0:
      raise ValueError(f"model loss_chunk must be an integer >= 0, got {self.loss_chunk!r}")
    try:
      jnp.dtype(self.compute_dtype)
    except TypeError:
      raise ValueError(f"model compute_dtype must be a dtype name such as 'float32' or "
                       f"'bfloat16', got {self.compute_dtype!r}") from None

  @property
  def has_bias(self) -> bool:
    return self.arch == "gpt2" if self.bias is None else self.bias

  @property
  def padded_vocab(self) -> int:
    return -(-self.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE

  @property
  def dtype(self):
    return jnp.dtype(self.compute_dtype)


PRESETS = {
    "tiny": ModelConfig("gpt2", 256, 2, 4, 64, 64),
    "tiny-llama": ModelConfig("llama", 256, 2, 4, 64, 64, d_ff=172),
    "shakespeare-char": ModelConfig("gpt2", 256, 6, 6, 384, 256),  # MADA's 11M model
    "gpt2-124m": ModelConfig("gpt2", 50257, 12, 12, 768, 1024, loss_chunk=256),
    "llama-60m": ModelConfig("llama", 32000, 8, 8, 512, 256, d_ff=1376),
    "llama-100m": ModelConfig("llama", 32000, 12, 10, 640, 256, d_ff=1708),
    # 150M (Morwani et al.'s nominal size; their shape is not published): 12 x 768, the
    # vocabulary of the 60M/100M models, the SwiGLU width that makes the count 150M.
    "llama-150m": ModelConfig("llama", 32000, 12, 12, 768, 512, d_ff=2624),
    # TinyLlama-1.1B's shape (22 layers, 2048 wide, SwiGLU 5632), full multi-head attention; the
    # layers scanned (docs/performance.md, section 3).
    "llama-1b": ModelConfig("llama", 32000, 22, 32, 2048, 2048, d_ff=5632, loss_chunk=512,
                            scan_layers="loop"),
}


# ----------------------------------------------------------------------------------------------
# Parts shared by both architectures.


def constrain_batch(x):
  """Pins the leading (batch) dimension to the mesh's batch axes, if such a mesh is active."""
  mesh = jax.sharding.get_abstract_mesh()
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  if not axes:
    return x
  return jax.lax.with_sharding_constraint(x, jax.P(axes, *([None] * (x.ndim - 1))))


def constrain_fsdp(x, dim: int):
  """Pins dimension ``dim`` of ``x`` to the 'fsdp' mesh axis (the others replicated), if such a
  mesh is active and divides it: the gradient of ``x`` is then summed into that sharding, never
  all-reduced as a whole array."""
  mesh = jax.sharding.get_abstract_mesh()
  if "fsdp" not in mesh.axis_names or x.shape[dim] % mesh.shape["fsdp"]:
    return x
  return jax.lax.with_sharding_constraint(x, jax.P(*(["fsdp" if i == dim else None
                                                       for i in range(x.ndim)])))


def embed_tokens(embed: nnx.Embed, tokens, dtype=None, sharding: str = "vocab"):
  """The rows of ``embed``'s (vocabulary, d) table for ``tokens``, cast to ``dtype`` first if
  given: the lookup then gathers half-precision rows and the table's gradient is summed in that
  dtype, as every other weight's is (LLaMA; before, LLaMA-1B's step all-reduced a whole float32
  table, 262 MB per chip). The table is pinned to its rows' FSDP sharding (its parameter
  sharding), so that the gradient is asked for in that sharding; ``sharding`` "d_model": the
  (cast) table is then resharded over its columns for the lookup (see ``lookup_sharding``)."""
  table = constrain_fsdp(embed.embedding[...], 0)
  table = table if dtype is None else table.astype(dtype)
  if sharding == "d_model":
    table = constrain_fsdp(table, 1)
  return jnp.take(table, tokens, axis=0)


def normed(norm, x):
  """``norm(x)`` in ``x``'s dtype. Flax's norms return float32 (their scale's dtype) and the next
  matmul would round that to the compute dtype; rounding it here gives the same values and
  moves the activation between the two in half precision (a 4-layer LLaMA-1B's step compiled
  for v5e-16: 2.4% fewer bytes)."""
  return norm(x).astype(x.dtype)


def dense(cfg, n_in, n_out, rngs, *, bias, std=0.02):
  return nnx.Linear(n_in, n_out, use_bias=bias, dtype=cfg.dtype,
                    kernel_init=nnx.initializers.normal(std), rngs=rngs)


def residual_std(cfg):
  """GPT-2's scaled init of the projections that write into the residual stream."""
  return 0.02 / (2 * cfg.n_layer) ** 0.5


def rope(x, base, seq_axis: int = 1):
  """Rotary embedding on (batch, seq, heads, head_dim) (the sequence on ``seq_axis``), in the
  rotate-half convention (GPT-NeoX's and Hugging Face's LLaMA, which the AM paper's code trains):
  head dimensions i and i + dim/2 form the pair rotated by position x base^(-2i/dim). Meta's
  reference pairs 2i and 2i + 1 instead; the two are the same model up to a fixed permutation of
  q's and k's head dimensions, which their projections absorb. Contiguous halves need no strided
  slices and re-interleaving: compiled for v5e-16, a 4-layer LLaMA-1B's step moved 13% fewer bytes
  than with adjacent pairs."""
  seq, dim = x.shape[seq_axis], x.shape[-1]
  freqs = 1.0 / base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
  angles = jnp.arange(seq, dtype=jnp.float32)[:, None] * freqs[None]
  others = [axis for axis in range(x.ndim - 1) if axis != seq_axis % x.ndim]
  cos, sin = jnp.expand_dims(jnp.cos(angles), others), jnp.expand_dims(jnp.sin(angles), others)
  x1, x2 = x[..., :dim // 2].astype(jnp.float32), x[..., dim // 2:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


def dropout(x, rate: float, key):
  """Inverted dropout: zero with probability ``rate`` and rescale the rest (no key: identity)."""
  if key is None or rate == 0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def attention_implementation(cfg: ModelConfig, seq_len: int, platform: str, *,
                             dropout: bool = False) -> str:
  """What ``cfg.attention`` runs on ``platform`` ("tpu", "gpu", "cpu"): "auto" is the fused
  kernel where one exists and is faster (TPU: splash, for sequences of at least
  ``SPLASH_MIN_SEQ`` tokens in whole kernel blocks; GPU: cuDNN, in half precision) and XLA
  elsewhere. ``dropout``: the step draws dropout masks (training at a
  rate > 0), which only the XLA path applies to the attention weights."""
  if cfg.attention != "auto":
    return cfg.attention
  if dropout and cfg.dropout:
    return "xla"
  if platform == "tpu" and seq_len >= SPLASH_MIN_SEQ and seq_len % SPLASH_BLOCK == 0:
    return "splash"
  if platform == "gpu" and cfg.compute_dtype in CUDNN_DTYPES:
    return "cudnn"
  return "xla"


def current_platform() -> str:
  """The platform of the active mesh's devices (real or a TPU topology's), else the default."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else mesh.abstract_device
  return device.platform if device is not None else jax.default_backend()


@jax.custom_vjp
def stored_softmax(logits):
  """Softmax over the last axis computed in float32 and returned in ``logits``' dtype; the
  backward pass needs only that output, so only it (in the compute dtype) is kept."""
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(logits.dtype)


def _stored_softmax_fwd(logits):
  weights = stored_softmax(logits)
  return weights, weights


def _stored_softmax_bwd(weights, g):
  w, g = weights.astype(jnp.float32), g.astype(jnp.float32)
  return ((w * (g - jnp.sum(g * w, axis=-1, keepdims=True))).astype(weights.dtype),)


stored_softmax.defvjp(_stored_softmax_fwd, _stored_softmax_bwd)


def xla_attention(q, k, v, dropout_rate: float = 0.0, key=None):
  """Causal softmax attention written out for XLA; (batch, seq, heads, head_dim) in and out.

  The T x T scores and weights are formed in the compute dtype (the matmuls accumulate in f32;
  softmax runs in f32 and is stored in the compute dtype), so in bf16 they take half the memory
  and traffic of an f32 softmax (``jax.nn.dot_product_attention``'s XLA path). ``key``: dropout
  on the attention weights at ``dropout_rate`` (nanoGPT's).
  """
  t, d = q.shape[1], q.shape[-1]
  logits = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(d ** -0.5, q.dtype), k)
  logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -jnp.inf)
  weights = dropout(stored_softmax(logits), dropout_rate, key)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def splash_attention(q, k, v):
  """Causal attention through JAX's Pallas splash-attention kernel; (batch, heads, seq,
  head_dim) in and out, the kernel's own layout (the projections give it and read it: no
  transposes around the kernel). The T x T scores are never written to memory: the kernel keeps
  one block of them on chip at a time (and recomputes them in the backward pass). Under a mesh the
  kernel runs per device on its rows of the batch (``shard_map``); off TPU it runs in Pallas's
  interpret mode (for tests: same numbers, slow)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernels  # pylint: disable=import-outside-toplevel
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
  _, h, t, d = q.shape
  if t % SPLASH_BLOCK:
    raise ValueError(f"splash attention needs a sequence length that is a multiple of "
                     f"{SPLASH_BLOCK}, got {t}")
  kernel = kernels.make_splash_mha(masks.MultiHeadMask([masks.CausalMask((t, t))] * h),
                                   head_shards=1, q_seq_shards=1,
                                   residual_checkpoint_name=SPLASH_RESIDUALS,
                                   interpret=current_platform() != "tpu")

  def per_device(q, k, v):  # queries pre-scaled
    return jax.vmap(kernel)(q * d ** -0.5, k, v)

  axes = tuple(a for a in BATCH_AXES if a in jax.sharding.get_abstract_mesh().axis_names)
  if axes:
    per_device = jax.shard_map(per_device, in_specs=(jax.P(axes),) * 3, out_specs=jax.P(axes),
                               check_vma=False)
  return per_device(q, k, v)


class CausalSelfAttention(nnx.Module):
  """Multi-head causal attention; ``rope_base`` set: rotary positions on q and k."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, *, rope_base=None):
    self.cfg, self.rope_base = cfg, rope_base
    self.qkv = dense(cfg, cfg.d_model, 3 * cfg.d_model, rngs, bias=cfg.has_bias)
    self.proj = dense(cfg, cfg.d_model, cfg.d_model, rngs, bias=cfg.has_bias,
                      std=residual_std(cfg))

  def __call__(self, x, key=None):
    implementation = attention_implementation(self.cfg, x.shape[1], current_platform(),
                                              dropout=key is not None)
    heads_first = implementation == "splash"  # the kernel's layout
    q, k, v = self.project_qkv(x, heads_first)
    if self.rope_base is not None:
      seq_axis = 2 if heads_first else 1
      q, k = rope(q, self.rope_base, seq_axis), rope(k, self.rope_base, seq_axis)
    if implementation == "splash":
      out = splash_attention(q, k, v)
    elif implementation == "cudnn":
      out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    elif key is not None and self.cfg.dropout:
      weights_key, key = jax.random.split(key)
      out = xla_attention(q, k, v, self.cfg.dropout, weights_key)
    else:
      out = xla_attention(q, k, v)
    return dropout(self.project_out(out, heads_first), self.cfg.dropout, key)

  def project_qkv(self, x, heads_first: bool):
    """q, k, v as (batch, seq, heads, head_dim), or (batch, heads, seq, head_dim) straight from
    the matmul when ``heads_first``."""
    b, t, d = x.shape
    h = self.cfg.n_head
    if not heads_first:
      return jnp.moveaxis(self.qkv(x).reshape(b, t, 3, h, d // h), 2, 0)
    dtype = self.cfg.dtype
    qkv = jnp.einsum("btd,dshk->sbhtk", x.astype(dtype),
                     self.qkv.kernel[...].astype(dtype).reshape(d, 3, h, d // h))
    if self.qkv.bias is not None:
      qkv += self.qkv.bias[...].astype(dtype).reshape(3, 1, h, 1, d // h)
    return qkv

  def project_out(self, out, heads_first: bool):
    """The output projection of ``out`` in the layout :meth:`project_qkv` gave."""
    if not heads_first:
      b, t, h, k = out.shape
      return self.proj(out.reshape(b, t, h * k))
    _, h, _, k = out.shape
    dtype = self.cfg.dtype
    y = jnp.einsum("bhtk,hkd->btd", out.astype(dtype),
                   self.proj.kernel[...].astype(dtype).reshape(h, k, -1))
    return y if self.proj.bias is None else y + self.proj.bias[...].astype(dtype)


class GeluMLP(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.dropout = cfg.dropout
    self.fc = dense(cfg, cfg.d_model, 4 * cfg.d_model, rngs, bias=cfg.has_bias)
    self.proj = dense(cfg, 4 * cfg.d_model, cfg.d_model, rngs, bias=cfg.has_bias,
                      std=residual_std(cfg))

  def __call__(self, x, key=None):
    return dropout(self.proj(jax.nn.gelu(self.fc(x))), self.dropout, key)


class SwiGLU(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.dropout = cfg.dropout
    self.gate = dense(cfg, cfg.d_model, cfg.d_ff, rngs, bias=False)
    self.up = dense(cfg, cfg.d_model, cfg.d_ff, rngs, bias=False)
    self.proj = dense(cfg, cfg.d_ff, cfg.d_model, rngs, bias=False, std=residual_std(cfg))

  def __call__(self, x, key=None):
    return dropout(self.proj(jax.nn.silu(self.gate(x)) * self.up(x)), self.dropout, key)


def run_blocks(blocks, x, remat: str, key=None, scan: str = "none"):
  """x through every block, each output pinned to the batch sharding, rematerialised if asked;
  ``key``: dropout on, one key per block. ``scan`` "loop": the blocks' weights stacked and run by
  one ``lax.scan``; "unrolled": the same scan unrolled (for counting compiles). Scanned under
  remat "offload", each block's input is named ``BLOCK_INPUT`` so that the policy offloads it (the
  scan would otherwise stack every layer's input on the device)."""
  keys = None if key is None else jax.random.split(key, len(blocks))
  if scan == "none":
    def apply(block, x, key):
      return constrain_batch(block(x, key))
    if remat != "none":
      apply = nnx.remat(apply, policy=REMAT_POLICIES[remat])
    for block, block_key in zip(blocks, [None] * len(blocks) if keys is None else list(keys)):
      x = apply(block, x, block_key)
    return x
  graphdef = nnx.graphdef(blocks[0])
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[nnx.state(b) for b in blocks])

  def body(x, layer):
    state, key = layer
    if remat == "offload":
      x = checkpoint_name(x, BLOCK_INPUT)
    return constrain_batch(nnx.merge(graphdef, state)(x, key)), None
  if remat != "none":
    body = jax.checkpoint(body, policy=REMAT_POLICIES[remat])
  x, _ = jax.lax.scan(body, x, (stacked, keys), unroll=scan == "unrolled")
  return x


def split_dropout_key(key):
  """Two keys from one ((input embedding, blocks) or (attention, MLP)), or Nones: no dropout."""
  return (None, None) if key is None else tuple(jax.random.split(key))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def softmax_cross_entropy(h, w, targets, scale, n_valid: int, chunk: int, serial: bool = False):
  """Cross-entropy of the logits ``h @ w`` (f32) over the first ``n_valid`` classes.

  h: (batch, seq, d) hidden states; w: (d, vocab) output layer; targets: (batch, seq) ints.
  ``scale=None``: the mean over every position. Otherwise targets < 0 carry no loss (padding) and
  the result is ``scale`` times the sum over the others (the caller passes 1 / the token count
  of its whole batch, so that microbatches add up to the per-token mean).
  Computed ``chunk`` positions of the sequence at a time (0: all at once); the gradients with
  respect to h and w are formed in the same pass (softmax - one-hot), so no chunk's logits are
  kept for the backward pass and nothing is recomputed. ``serial``: each chunk starts after the
  previous one is done (an optimization barrier), so the compiler cannot overlap two chunks.
  """
  return _cross_entropy_fwd(h, w, targets, scale, n_valid, chunk, serial)[0]


def _cross_entropy_fwd(h, w, targets, scale, n_valid, chunk, serial):
  b, t, _ = h.shape
  chunk = chunk or t
  w_c = w.astype(h.dtype)
  vocab_ids = jnp.arange(w.shape[1])
  total, grad_h = jnp.zeros([], jnp.float32), []
  grad_w = constrain_fsdp(jnp.zeros(w.shape, jnp.float32), 1)
  for start in range(0, t, chunk):
    if serial and start:
      total, grad_w, h = jax.lax.optimization_barrier((total, grad_w, h))
    h_c, y_c = h[:, start:start + chunk], targets[:, start:start + chunk]
    logits = jnp.einsum("btd,dv->btv", h_c, w_c, preferred_element_type=jnp.float32)
    if n_valid < w.shape[1]:  # padded vocabulary: padded classes take no probability
      logits = jnp.where(vocab_ids < n_valid, logits, -jnp.inf)
    log_z = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    one_hot = vocab_ids == y_c[..., None]
    token_loss = log_z[..., 0] - jnp.sum(jnp.where(one_hot, logits, 0.0), axis=-1)
    if scale is None:
      weight = 1.0 / (b * t)
    else:
      token_loss = jnp.where(y_c >= 0, token_loss, 0.0)
      weight = jnp.where(y_c >= 0, scale, 0.0)[..., None]
    total += jnp.sum(token_loss)
    d_logits = ((jnp.exp(logits - log_z) - one_hot) * weight).astype(h.dtype)
    grad_h.append(constrain_batch(jnp.einsum("btv,dv->btd", d_logits, w_c)))
    grad_w += constrain_fsdp(jnp.einsum("btd,btv->dv", h_c, d_logits,
                                        preferred_element_type=jnp.float32), 1)
  grad_h = jnp.concatenate(grad_h, axis=1) if len(grad_h) > 1 else grad_h[0]
  total = total * (1.0 / (b * t) if scale is None else scale)
  return total, (grad_h, grad_w.astype(w.dtype), scale)


def _cross_entropy_bwd(n_valid, chunk, serial, residuals, g):
  del n_valid, chunk, serial
  grad_h, grad_w, scale = residuals
  grad_scale = None if scale is None else jnp.zeros_like(scale)
  return ((g * grad_h).astype(grad_h.dtype), (g * grad_w).astype(grad_w.dtype), None, grad_scale)


softmax_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


class DecoderLM(nnx.Module):
  """Common interface: ``logits(tokens)`` and ``loss(tokens, targets)``."""

  cfg: ModelConfig

  def __call__(self, tokens):
    """Token ids (batch, seq) -> logits (batch, seq, vocab_size), float32 (no dropout)."""
    h, w = self.features(tokens)
    logits = jnp.einsum("btd,dv->btv", h, w.astype(h.dtype), preferred_element_type=jnp.float32)
    return logits[..., :self.cfg.vocab_size]

  def loss(self, tokens, targets, scale=None, dropout_key=None):
    """Next-token cross-entropy through the fused chunked output layer: the mean over positions
    (``scale=None``), or ``scale`` x the sum over targets >= 0 (padded batches). With a
    ``dropout_key`` (training), dropout at the model's rate."""
    h, w = self.features(tokens, dropout_key)
    return softmax_cross_entropy(h, w, targets, scale, self.cfg.vocab_size, self.cfg.loss_chunk,
                                 self.cfg.serial_loss_chunks)


# ----------------------------------------------------------------------------------------------
# GPT-2.


class GPT2Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.ln_1 = nnx.LayerNorm(cfg.d_model, epsilon=1e-5, use_bias=cfg.has_bias, rngs=rngs)
    self.attn = CausalSelfAttention(cfg, rngs)
    self.ln_2 = nnx.LayerNorm(cfg.d_model, epsilon=1e-5, use_bias=cfg.has_bias, rngs=rngs)
    self.mlp = GeluMLP(cfg, rngs)

  def __call__(self, x, key=None):
    attn_key, mlp_key = split_dropout_key(key)
    x = x + self.attn(normed(self.ln_1, x), attn_key)
    return x + self.mlp(normed(self.ln_2, x), mlp_key)


class GPT2(DecoderLM):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.padded_vocab, cfg.d_model,
                           embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
    self.positions = nnx.Embed(cfg.context, cfg.d_model,
                               embedding_init=nnx.initializers.normal(0.01), rngs=rngs)
    self.blocks = nnx.List([GPT2Block(cfg, rngs) for _ in range(cfg.n_layer)])
    # The final norm returns the compute dtype: its output is the output layer's input, whose
    # matmul would otherwise run in float32 (flax's norms promote to their float32 scale).
    self.ln_f = nnx.LayerNorm(cfg.d_model, epsilon=1e-5, use_bias=cfg.has_bias, dtype=cfg.dtype,
                              rngs=rngs)

  def features(self, tokens, dropout_key=None):
    """Final hidden states (batch, seq, d) and the output layer (d, vocab), tied to the embedding."""
    embed_key, blocks_key = split_dropout_key(dropout_key)
    x = (embed_tokens(self.embed, tokens, sharding=self.cfg.lookup_sharding)
         + self.positions(jnp.arange(tokens.shape[1]))[None])
    x = constrain_batch(dropout(x.astype(self.cfg.dtype), self.cfg.dropout, embed_key))
    x = run_blocks(self.blocks, x, self.cfg.remat, blocks_key, self.cfg.scan_layers)
    return self.ln_f(x), self.embed.embedding[...].T


# ----------------------------------------------------------------------------------------------
# LLaMA.


class LlamaBlock(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.attn_norm = nnx.RMSNorm(cfg.d_model, epsilon=1e-6, rngs=rngs)
    self.attn = CausalSelfAttention(cfg, rngs, rope_base=cfg.rope_base)
    self.mlp_norm = nnx.RMSNorm(cfg.d_model, epsilon=1e-6, rngs=rngs)
    self.mlp = SwiGLU(cfg, rngs)

  def __call__(self, x, key=None):
    attn_key, mlp_key = split_dropout_key(key)
    x = x + self.attn(normed(self.attn_norm, x), attn_key)
    return x + self.mlp(normed(self.mlp_norm, x), mlp_key)


class Llama(DecoderLM):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.padded_vocab, cfg.d_model,
                           embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
    self.blocks = nnx.List([LlamaBlock(cfg, rngs) for _ in range(cfg.n_layer)])
    self.norm = nnx.RMSNorm(cfg.d_model, epsilon=1e-6, dtype=cfg.dtype, rngs=rngs)  # as GPT-2's
    self.head = dense(cfg, cfg.d_model, cfg.padded_vocab, rngs, bias=False)

  def features(self, tokens, dropout_key=None):
    """Final hidden states (batch, seq, d) and the output layer (d, vocab)."""
    embed_key, blocks_key = split_dropout_key(dropout_key)
    x = dropout(embed_tokens(self.embed, tokens, self.cfg.dtype, self.cfg.lookup_sharding),
                self.cfg.dropout, embed_key)
    x = run_blocks(self.blocks, constrain_batch(x), self.cfg.remat, blocks_key,
                   self.cfg.scan_layers)
    return self.norm(x), self.head.kernel[...]


ARCHITECTURES = {"gpt2": GPT2, "llama": Llama}


def LanguageModel(cfg: ModelConfig, rngs: nnx.Rngs) -> DecoderLM:  # noqa: N802 (a constructor)
  """The model of ``cfg.arch``."""
  return ARCHITECTURES[cfg.arch](cfg, rngs)


def parameter_count(cfg: ModelConfig) -> int:
  """Number of parameters, from shapes only (nothing is allocated)."""
  state = nnx.state(nnx.eval_shape(lambda: LanguageModel(cfg, nnx.Rngs(0))), nnx.Param)
  return sum(int(x.size) for x in jax.tree.leaves(state))


def flops_per_token(cfg: ModelConfig, n_params: int, seq_len: int | None = None) -> float:
  """Training FLOPs per token: 6 N_matmul + attention 12 L d T (nanoGPT/PaLM estimate).

  N_matmul is every parameter that enters a matmul: the lookup-only tables (LLaMA's input
  embedding, GPT-2's position embedding) are left out; GPT-2's token embedding stays in, as it
  is also the output layer.
  """
  lookup_only = cfg.context * cfg.d_model if cfg.arch == "gpt2" else cfg.padded_vocab * cfg.d_model
  return 6 * (n_params - lookup_only) + 12 * cfg.n_layer * cfg.d_model * (seq_len or cfg.context)
