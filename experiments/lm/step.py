"""The sharded training program: optimizer, mesh, FSDP shardings and the jitted step.

``build_train_step(cfg, devices)`` is the one builder that training, the benchmarks and the
deviceless TPU compile (``experiments.lm.aot``) share.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_accel as oa
from experiments.lm import model as model_lib
from experiments.lm.config import BASELINE_OPTIMIZERS, ConfigError, is_int, model_config

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12,
              "TPU v5": 197e12}


# ----------------------------------------------------------------------------------------------
# Optimizer.


def optimizer_spec(name: str) -> oa.OptimizerSpec:
  """The registry's spec, or a baseline's (config.BASELINE_OPTIMIZERS)."""
  return BASELINE_OPTIMIZERS[name] if name in BASELINE_OPTIMIZERS else oa.get_spec(name)


def learning_rate_schedule(cfg) -> optax.Schedule:
  peak, warmup, steps = cfg["optim.lr"], cfg["optim.warmup"], cfg["train.steps"]
  if cfg["optim.schedule"] == "constant" or optimizer_spec(cfg["optim.name"]).owns_warmup:
    return optax.warmup_constant_schedule(0.0, peak, max(warmup, 1)) if warmup else (
        optax.constant_schedule(peak))
  return optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup, 1), max(steps, warmup + 1),
                                            end_value=peak * cfg["optim.min_lr_ratio"])


def decay_mask(params, mode: str):
  """True where weight decay applies: weights of rank >= 2 except the embedding tables
  ("matrices"), every weight of rank >= 2 (nanoGPT's rule: "matrices+embeddings"), every
  parameter ("all") or none."""
  def decide(path, leaf):
    names = {str(getattr(k, "key", k)) for k in path}
    if mode in ("all", "none"):
      return mode == "all"
    return leaf.ndim >= 2 and (mode == "matrices+embeddings" or not {"embed", "positions"} & names)
  return jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(cfg, params) -> optax.GradientTransformation:
  """The registry optimizer with the run's schedule, decay mask and clipping."""
  name = cfg["optim.name"]
  spec = optimizer_spec(name)
  kwargs = dict(cfg["optim.kwargs"])
  schedule = learning_rate_schedule(cfg)
  if spec.owns_warmup:  # e.g. Schedule-Free: the warmup is the optimizer's own
    kwargs.setdefault("warmup_steps", cfg["optim.warmup"])
    schedule = cfg["optim.lr"]
  if spec.takes_weight_decay:
    kwargs.setdefault("weight_decay", 0.0 if cfg["optim.decay"] == "none"
                      else cfg["optim.weight_decay"])
  clip_inside = (cfg["optim.clip"] and spec.learns_hyperparameters
                 and cfg["optim.hypergrad_grads"] == "unclipped")
  if clip_inside:
    kwargs.setdefault("clip_norm", cfg["optim.clip"])
  if spec.takes_mask and cfg["optim.decay"] in ("matrices", "matrices+embeddings"):
    kwargs.setdefault("mask", decay_mask(params, cfg["optim.decay"]))
  try:
    opt = spec.factory(schedule, **kwargs)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"optimizer {name!r}: {e}") from None
  if cfg["optim.clip"] and not clip_inside:
    opt = optax.chain(optax.clip_by_global_norm(cfg["optim.clip"]), opt)
  return opt


# ----------------------------------------------------------------------------------------------
# Sharding and the train step.


def make_mesh(cfg, devices=None) -> jax.sharding.Mesh:
  """The (data, fsdp) mesh over ``devices`` (default: all); ``mesh.fsdp=-1`` is pure FSDP."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  fsdp = n if cfg["mesh.fsdp"] == -1 else cfg["mesh.fsdp"]
  if not is_int(fsdp) or fsdp < 1 or n % fsdp:
    raise ConfigError(f"mesh.fsdp must divide the {n} devices (or be -1: all), "
                      f"got {cfg['mesh.fsdp']!r}")
  auto = (jax.sharding.AxisType.Auto,) * 2  # GSPMD, guided by constraints at block boundaries
  return jax.sharding.Mesh(np.array(devices).reshape(n // fsdp, fsdp), ("data", "fsdp"),
                           axis_types=auto)


def fsdp_spec(shape, size: int) -> jax.P:
  """Shards the largest dimension divisible by ``size`` over 'fsdp' (arrays of rank >= 2)."""
  dims = [None] * len(shape)
  candidates = [d for d in np.argsort(shape, kind="stable")[::-1] if shape[d] % size == 0]
  if len(shape) >= 2 and size > 1 and candidates:
    dims[candidates[0]] = "fsdp"
  return jax.P(*dims)


def tree_sharding(tree, mesh):
  """FSDP sharding of parameters and optimizer state alike.

  The rule depends on a leaf's shape only, so every parameter-sized optimizer buffer (moments,
  Schedule-Free's z, AdEMAMix's slow EMA, MADA's and the hypergradient buffers) is sharded
  exactly like its parameter; scalars and vectors are replicated.
  """
  size = mesh.shape["fsdp"]
  return jax.tree.map(lambda leaf: jax.NamedSharding(mesh, fsdp_spec(leaf.shape, size)), tree)


def cast_kernels(params, dtype, shardings):
  """The blocks' matmul weights (``kernel`` leaves under ``blocks``) cast to the compute
  ``dtype`` while still in their FSDP ``shardings``, so that the compiler gathers each and reduces
  its gradient in that dtype and forms the float32 gradient on the shard. The model would cast
  them to the same values itself (flax's ``Linear(dtype=...)``): loss and gradients are bit for bit
  unchanged. The output layer is left to :func:`model.softmax_cross_entropy`, which sums its
  gradient in float32 into its FSDP sharding."""
  def cast(path, leaf, sharding):
    keys = [getattr(k, "key", None) for k in path]
    if keys[-1] != "kernel" or "blocks" not in keys or leaf.dtype == dtype:
      return leaf
    return jax.lax.with_sharding_constraint(leaf.astype(dtype), sharding)
  return jax.tree_util.tree_map_with_path(cast, params, shardings)


def batch_sharding(mesh):
  """Token batches of shape (microbatches, batch, seq): the batch over every device."""
  return jax.NamedSharding(mesh, jax.P(None, model_lib.BATCH_AXES, None))


def global_batch(rows: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], shape, sharding):
  """(inputs, targets) as global int32 arrays of ``shape`` (microbatches, microbatch, seq) from
  ``rows(ids)``, which gives the (len(ids), seq) inputs and targets of the batch's rows ``ids``
  (row ``a * microbatch + m`` is microbatch a's m-th). Each process computes only the rows of its
  own devices, once per device shard."""
  accum, micro, seq = shape
  made = {}

  def shard(index, which):
    key = (index[0].start, index[0].stop, index[1].start, index[1].stop)
    if key not in made:
      a, m = np.arange(accum)[index[0]], np.arange(micro)[index[1]]
      x, y = rows((a[:, None] * micro + m[None]).reshape(-1))
      made[key] = (x.reshape(len(a), len(m), seq), y.reshape(len(a), len(m), seq))
    return made[key][which][..., index[2]]

  return tuple(jax.make_array_from_callback(shape, sharding, lambda index, w=w: shard(index, w))
               for w in (0, 1))


def gradient_accumulation(cfg, n_devices: int) -> int:
  """Microbatches per step: ``train.grad_accum``, or with "auto" the number that gives each
  device ``train.device_batch`` sequences per microbatch."""
  batch, accum = cfg["train.batch_size"], cfg["train.grad_accum"]
  if accum == "auto":
    per_device = cfg["train.device_batch"]
    if not isinstance(per_device, int) or per_device < 1:
      raise ConfigError("train.grad_accum=auto needs train.device_batch (sequences per device "
                        f"per microbatch), got {per_device!r}")
    accum = max(1, batch // (per_device * n_devices))
  if not is_int(accum) or accum < 1 or batch % accum:
    raise ConfigError(f"train.grad_accum must be 'auto' or a positive integer dividing "
                      f"train.batch_size {batch}, got {accum!r}")
  if (batch // accum) % n_devices:
    raise ConfigError(f"the microbatch (train.batch_size {batch} / train.grad_accum {accum}) "
                      f"must be divisible by the {n_devices} devices")
  return accum


@dataclasses.dataclass
class TrainStep:
  """The compiled-to-be training program: one builder serves training, benchmarks and AOT."""
  cfg: dict
  model_config: model_lib.ModelConfig
  mesh: jax.sharding.Mesh
  graphdef: Any
  tx: optax.GradientTransformation
  grad_accum: int
  state_sharding: Any
  abstract_state: Any  # ShapeDtypeStructs with their shardings
  init: Callable[[], Any]  # jitted: the sharded initial state
  step: Callable  # jitted, state donated: (state, inputs, targets) -> (state, stats)
  eval_sums: Callable  # jitted: (state, inputs, targets) -> (summed token loss, token count)

  @property
  def micro_batch(self) -> int:
    return self.cfg["train.batch_size"] // self.grad_accum

  def abstract_batch(self):
    """(inputs, targets) as ShapeDtypeStructs (for ``step.lower``)."""
    shape = (self.grad_accum, self.micro_batch, self.cfg["train.seq_len"])
    return (jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding(self.mesh)),) * 2

  def batch(self, rows: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]):
    """The step's (inputs, targets) from ``rows(ids)`` (see :func:`global_batch`)."""
    shape = (self.grad_accum, self.micro_batch, self.cfg["train.seq_len"])
    return global_batch(rows, shape, batch_sharding(self.mesh))

  def eval_batch(self, rows: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]):
    """One validation batch of ``micro_batch`` rows, for ``eval_sums``."""
    shape = (1, self.micro_batch, self.cfg["train.seq_len"])
    return global_batch(rows, shape, batch_sharding(self.mesh))


def build_train_step(cfg, devices=None) -> TrainStep:
  """Builds the sharded training step of ``cfg`` for ``devices`` (real, or a TPU topology's).

  The step takes the state and token batches of shape (microbatches, microbatch, seq), scans
  over the microbatches accumulating the mean loss and gradient (no loop when there is one),
  applies the optimizer once (``value=`` the mean loss) and returns the new state and scalar
  statistics. Nothing is allocated: ``init()`` makes the sharded initial state on the devices.
  """
  from flax import nnx  # pylint: disable=import-outside-toplevel
  mc = model_config(cfg)
  mesh = make_mesh(cfg, devices)
  accum = gradient_accumulation(cfg, mesh.size)

  def init_model():
    return model_lib.LanguageModel(mc, nnx.Rngs(cfg["train.seed"]))

  graphdef, abstract_params = nnx.split(nnx.eval_shape(init_model), nnx.Param)
  abstract_params = nnx.to_pure_dict(abstract_params)
  tx = make_optimizer(cfg, abstract_params)
  replicated = jax.NamedSharding(mesh, jax.P())

  def init_state():
    params = nnx.to_pure_dict(nnx.state(init_model(), nnx.Param))
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros([], jnp.int32)}

  shapes = jax.eval_shape(init_state)
  state_sharding = {**tree_sharding({k: shapes[k] for k in ("params", "opt_state")}, mesh),
                    "step": replicated}
  abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, state_sharding)
  param_sharding = state_sharding["params"]

  def loss_fn(params, inputs, targets, scale=None, dropout_key=None):
    params = cast_kernels(params, mc.dtype, param_sharding)
    return nnx.merge(graphdef, nnx.State(params)).loss(inputs, targets, scale, dropout_key)

  grad_fn = jax.value_and_grad(loss_fn)
  # Dropout: a key per step and microbatch, a function of (seed, step): a resumed run draws the
  # same masks. Without dropout no key enters the program.
  dropout_seed = jax.random.key(cfg["train.seed"], impl="rbg") if mc.dropout else None

  def dropout_key(step, microbatch):
    if dropout_seed is None:
      return None
    return jax.random.fold_in(jax.random.fold_in(dropout_seed, step), microbatch)
  # Padded documents: every microbatch's summed loss is scaled by 1 / (the step's target count),
  # so the step's loss is the mean over its real tokens whatever the microbatching.
  masked = cfg["data.sampling"] == "documents"

  def mean_loss_and_grad(params, inputs, targets, step):
    scale = 1.0 / jnp.maximum(jnp.sum(targets >= 0), 1).astype(jnp.float32) if masked else None
    if accum == 1:
      return grad_fn(params, inputs[0], targets[0], scale, dropout_key(step, 0))

    def add_microbatch(total, batch):
      x, y, *microbatch = batch  # the microbatch's index with dropout only
      key = dropout_key(step, microbatch[0]) if microbatch else None
      loss, grads = grad_fn(params, x, y, scale, key)
      grads = jax.lax.with_sharding_constraint(grads, param_sharding)
      return jax.tree.map(jnp.add, total, (loss, grads)), None

    zero = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), (jnp.zeros([]), params))
    batches = (inputs, targets) + ((jnp.arange(accum),) if mc.dropout else ())
    total, _ = jax.lax.scan(add_microbatch, zero, batches)
    divisor = 1 if masked else accum
    return jax.tree.map(lambda x, p: (x / divisor).astype(p.dtype), total, (zero[0], params))

  skip_nonfinite = cfg["train.on_nan"] == "skip"

  def train_step(state, inputs, targets):
    loss, grads = mean_loss_and_grad(state["params"], inputs, targets, state["step"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"], value=loss)
    params = optax.apply_updates(state["params"], updates)
    grad_norm = optax.tree.norm(grads)
    stats = {"loss": loss, "grad_norm": grad_norm, **oa.get_diagnostics(opt_state)}
    new = {"params": params, "opt_state": opt_state}
    if skip_nonfinite:  # keep the old parameters and state; the batch is still consumed
      skip = ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
      new = jax.tree.map(lambda n, o: jnp.where(skip, o, n), new,
                         {"params": state["params"], "opt_state": state["opt_state"]})
      stats["skipped"] = skip.astype(jnp.float32)
    return {**new, "step": state["step"] + 1}, stats

  def eval_sums(state, inputs, targets):
    params = state["params"]
    if oa.is_schedule_free(state["opt_state"]):
      params = oa.schedule_free_eval_params(state["opt_state"], params)
    total = loss_fn(params, inputs[0], targets[0], jnp.ones([], jnp.float32))
    return total, jnp.sum(targets >= 0)

  return TrainStep(
      cfg=cfg, model_config=mc, mesh=mesh, graphdef=graphdef, tx=tx, grad_accum=accum,
      state_sharding=state_sharding, abstract_state=abstract_state,
      init=jax.jit(init_state, out_shardings=state_sharding),
      step=jax.jit(train_step, donate_argnums=(0,), out_shardings=(state_sharding, replicated)),
      eval_sums=jax.jit(eval_sums, out_shardings=replicated))


def peak_flops(cfg) -> float:
  if cfg["peak_flops"]:
    return float(cfg["peak_flops"])
  kind = jax.devices()[0].device_kind
  for name, flops in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return flops
  return (os.cpu_count() or 1) * 2.5e9 * 32 / jax.local_device_count()  # AVX2 FMA f32 estimate
