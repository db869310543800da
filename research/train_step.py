"""The train state, the optimizer, and the jitted (sharded) train and eval steps."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from models.sharding import DEFAULT_RULES, Rules, logical_shardings
from models.transformer import Transformer, head_weight, with_router_biases
from research.config import OptimConfig, TrainConfig
from research.head_loss import head_nll_sum
from research.mesh import batch_sharding
from research.metrics import cross_entropy


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # [] int32
    params: Any  # includes the MoE router biases, which the step sets outside the gradient
    opt_state: Any
    rng: jax.Array  # base PRNG key (raw uint32, checkpointable); step keys are fold_in(rng, step)


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to learning_rate, then cosine decay to min_lr_ratio * learning_rate."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=cfg.learning_rate * cfg.min_lr_ratio)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW (decoupled decay on matrices only, not on norm scales or biases) after global-norm clipping."""
    adamw = optax.adamw(lr_schedule(cfg, total_steps), b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay,
                        mask=lambda params: jax.tree.map(lambda p: p.ndim > 1, params))
    if cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
    return adamw


@dataclasses.dataclass(frozen=True)
class Steps:
    """Everything the training loop calls, jitted with explicit shardings over one mesh."""

    init: Callable[[], TrainState]
    train: Callable[[TrainState, jax.Array], tuple[TrainState, dict[str, jax.Array]]]
    eval: Callable[[Any, jax.Array], jax.Array]  # (params, batch) -> summed nll, token count
    abstract_state: Any  # ShapeDtypeStructs with shardings: the target of a checkpoint restore
    state_sharding: Any
    batch_sharding: NamedSharding
    mesh: Mesh


@dataclasses.dataclass(frozen=True)
class _InMesh:
    """A jitted function called (and lowered) with the mesh and logical rules in context.

    Activation constraints (nn.with_logical_constraint) read both at trace time, and jax.set_mesh
    may only be entered outside jit.
    """

    jitted: Any
    mesh: Mesh
    rules: Rules

    def __call__(self, *args: Any) -> Any:
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return self.jitted(*args)

    def lower(self, *args: Any) -> Any:
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return self.jitted.lower(*args)


def split_batch(batch: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """batch: [B, T + 1] stored ids -> inputs [B, T], targets [B, T], scored [B, T] bool.

    A stored id may be negative, ~id: that token is context only (fed to the model, never scored as a
    target), e.g. everything but the answers of the retrieval task (`research/needles.py`). LM data has
    none. One int array keeps batches one shape and one sharding for every task.
    """
    ids = jnp.where(batch < 0, ~batch, batch)
    targets = batch[:, 1:]
    return ids[:, :-1], targets, targets >= 0


def lm_loss(model: Transformer, params: Any, batch: jax.Array,
            rng: jax.Array) -> tuple[jax.Array, tuple[jax.Array, dict]]:
    """batch: [B, T + 1] stored ids (`split_batch`) -> (objective, (mean nll of the scored targets, aux)),
    in training mode.

    rng: the step's key, for the MoE router noise and jitter. The head and the cross-entropy are
    applied a chunk of positions at a time (`head_nll_sum`): the [B, T, V] logits are never stored.
    """
    inputs, targets, scored = split_batch(batch)
    hidden, _, aux = model.apply({"params": params}, inputs, train=True, rngs={"router": rng}, return_hidden=True)
    count = jnp.maximum(jnp.sum(scored), 1).astype(jnp.float32)
    nll = head_nll_sum(hidden, head_weight(model.cfg, params), targets) / count
    total = nll + sum(aux["losses"].values(), jnp.zeros((), jnp.float32))
    return total, (nll, aux)


def build_steps(cfg: TrainConfig, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Steps:
    model = Transformer(cfg.model)
    tx = make_optimizer(cfg.optim, cfg.steps)
    schedule = lr_schedule(cfg.optim, cfg.steps)
    batch_shape = (cfg.data.batch_size, cfg.data.seq_len + 1)

    def init_boxed() -> TrainState:
        rng = jax.random.PRNGKey(cfg.seed)
        params = model.init(jax.random.fold_in(rng, 0), jnp.zeros((1, cfg.data.seq_len), jnp.int32))["params"]
        # The optimizer state inherits the parameters' logical-axis boxes, so it is sharded like them.
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng)

    boxed = jax.eval_shape(init_boxed)
    state_sharding = logical_shardings(boxed, mesh, rules)
    abstract_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                  nn.meta.unbox(boxed), state_sharding)
    data_sharding = batch_sharding(mesh, batch_shape)
    replicated = NamedSharding(mesh, P())

    def train_step(state: TrainState, batch: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(state.rng, state.step)
        grad_fn = jax.value_and_grad(lambda p: lm_loss(model, p, batch, rng), has_aux=True)
        (total, (nll, aux)), grads = grad_fn(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        # The router biases have zero gradient; whatever the optimizer did to them is replaced.
        params = with_router_biases(optax.apply_updates(state.params, updates), aux.get("router_bias", {}))
        metrics = {"loss": nll, "total_loss": total, "grad_norm": optax.tree.norm(grads),
                   "param_norm": optax.tree.norm(params),
                   "lr": schedule(state.step), **aux["losses"], **aux["stats"]}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def eval_step(params: Any, batch: jax.Array) -> tuple[jax.Array, jax.Array]:
        inputs, targets, scored = split_batch(batch)
        logits, _, _ = model.apply({"params": params}, inputs)
        nll = cross_entropy(logits, jnp.where(scored, targets, 0))
        return jnp.sum(jnp.where(scored, nll, 0.0)), jnp.sum(scored).astype(jnp.float32)

    def in_mesh(jitted: Any) -> Callable:
        return _InMesh(jitted, mesh, rules)

    init = in_mesh(jax.jit(lambda: nn.meta.unbox(init_boxed()), out_shardings=state_sharding))
    train = in_mesh(jax.jit(train_step, in_shardings=(state_sharding, data_sharding),
                            out_shardings=(state_sharding, replicated), donate_argnums=(0,)))
    evaluate = in_mesh(jax.jit(eval_step, in_shardings=(state_sharding.params, data_sharding),
                               out_shardings=replicated))
    return Steps(init=init, train=train, eval=evaluate, abstract_state=abstract_state,
                 state_sharding=state_sharding, batch_sharding=data_sharding, mesh=mesh)
