"""GPT-2 and LLaMA decoder-only language models in Flax NNX, with size presets.

GPT-2: learned positions, pre-LayerNorm blocks, GELU MLP (4d), biases, tied embeddings.
LLaMA: RMSNorm, rotary position embeddings, SwiGLU MLP, no biases, untied output layer.
Parameters are float32; ``compute_dtype="bfloat16"`` runs the matmuls in bf16.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx


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

  def __post_init__(self):
    if self.arch not in ("gpt2", "llama"):
      raise ValueError(f"model arch must be 'gpt2' or 'llama', got {self.arch!r}")
    if self.d_model % self.n_head:
      raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")


PRESETS = {
    "tiny": ModelConfig("gpt2", 256, 2, 4, 64, 64),
    "tiny-llama": ModelConfig("llama", 256, 2, 4, 64, 64, d_ff=172),
    "shakespeare-char": ModelConfig("gpt2", 256, 6, 6, 384, 256),  # MADA's 11M model
    "gpt2-124m": ModelConfig("gpt2", 50257, 12, 12, 768, 1024),
    "llama-60m": ModelConfig("llama", 32000, 8, 8, 512, 256, d_ff=1376),
    "llama-100m": ModelConfig("llama", 32000, 12, 10, 640, 256, d_ff=1708),
}


def _dense(cfg, n_in, n_out, rngs, *, bias, std=0.02):
  return nnx.Linear(n_in, n_out, use_bias=bias, dtype=jnp.dtype(cfg.compute_dtype),
                    kernel_init=nnx.initializers.normal(std), rngs=rngs)


def _rope(x, base):
  """Rotary embedding on (batch, seq, heads, head_dim)."""
  seq, dim = x.shape[1], x.shape[-1]
  freqs = 1.0 / base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
  angles = jnp.arange(seq, dtype=jnp.float32)[:, None] * freqs[None]
  cos, sin = jnp.cos(angles)[None, :, None], jnp.sin(angles)[None, :, None]
  x1, x2 = x[..., 0::2].astype(jnp.float32), x[..., 1::2].astype(jnp.float32)
  out = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).reshape(x.shape)
  return out.astype(x.dtype)


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    bias = cfg.arch == "gpt2"
    self.qkv = _dense(cfg, cfg.d_model, 3 * cfg.d_model, rngs, bias=bias)
    self.proj = _dense(cfg, cfg.d_model, cfg.d_model, rngs, bias=bias,
                       std=0.02 / (2 * cfg.n_layer) ** 0.5)

  def __call__(self, x):
    b, t, _ = x.shape
    head = self.cfg.d_model // self.cfg.n_head
    q, k, v = jnp.split(self.qkv(x).reshape(b, t, 3, self.cfg.n_head, head), 3, axis=2)
    q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
    if self.cfg.arch == "llama":
      q, k = _rope(q, self.cfg.rope_base), _rope(k, self.cfg.rope_base)
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return self.proj(out.reshape(b, t, self.cfg.d_model))


class MLP(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    out_std = 0.02 / (2 * cfg.n_layer) ** 0.5
    if cfg.arch == "gpt2":
      self.fc = _dense(cfg, cfg.d_model, 4 * cfg.d_model, rngs, bias=True)
      self.proj = _dense(cfg, 4 * cfg.d_model, cfg.d_model, rngs, bias=True, std=out_std)
    else:
      self.gate = _dense(cfg, cfg.d_model, cfg.d_ff, rngs, bias=False)
      self.up = _dense(cfg, cfg.d_model, cfg.d_ff, rngs, bias=False)
      self.proj = _dense(cfg, cfg.d_ff, cfg.d_model, rngs, bias=False, std=out_std)

  def __call__(self, x):
    if self.cfg.arch == "gpt2":
      return self.proj(jax.nn.gelu(self.fc(x)))
    return self.proj(jax.nn.silu(self.gate(x)) * self.up(x))


def _norm(cfg, rngs):
  if cfg.arch == "gpt2":
    return nnx.LayerNorm(cfg.d_model, epsilon=1e-5, rngs=rngs)
  return nnx.RMSNorm(cfg.d_model, epsilon=1e-6, rngs=rngs)


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.norm_1, self.attn = _norm(cfg, rngs), Attention(cfg, rngs)
    self.norm_2, self.mlp = _norm(cfg, rngs), MLP(cfg, rngs)

  def __call__(self, x):
    x = x + self.attn(self.norm_1(x))
    return x + self.mlp(self.norm_2(x))


class LanguageModel(nnx.Module):
  """Token ids (batch, seq) -> logits (batch, seq, vocab), float32."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, embedding_init=nnx.initializers.normal(
        0.02), rngs=rngs)
    if cfg.arch == "gpt2":
      self.positions = nnx.Embed(cfg.context, cfg.d_model,
                                 embedding_init=nnx.initializers.normal(0.01), rngs=rngs)
    else:
      self.head = _dense(cfg, cfg.d_model, cfg.vocab_size, rngs, bias=False)
    self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layer)])
    self.norm_f = _norm(cfg, rngs)

  def __call__(self, tokens):
    dtype = jnp.dtype(self.cfg.compute_dtype)
    x = self.embed(tokens).astype(dtype)
    if self.cfg.arch == "gpt2":
      x = x + self.positions(jnp.arange(tokens.shape[1])[None]).astype(dtype)
    for block in self.blocks:
      x = block(x)
    x = self.norm_f(x)
    if self.cfg.arch == "gpt2":
      return self.embed.attend(x.astype(jnp.float32))  # tied embeddings
    return self.head(x).astype(jnp.float32)


def parameter_count(cfg: ModelConfig) -> int:
  """Number of parameters, from shapes only (nothing is allocated)."""
  state = nnx.state(nnx.eval_shape(lambda: LanguageModel(cfg, nnx.Rngs(0))), nnx.Param)
  return sum(int(x.size) for x in jax.tree.leaves(state))


def flops_per_token(cfg: ModelConfig, n_params: int) -> float:
  """Training FLOPs per token: 6 N + attention 12 L d T (nanoGPT/PaLM estimate)."""
  return 6 * n_params + 12 * cfg.n_layer * cfg.d_model * cfg.context
