"""Choosing the next token: greedy, or sampling after temperature, top-k, top-p and min-p.

What is compiled in is static (`SamplerConfig`, a frozen dataclass used as a jit argument); the values are
per-row arrays (`SamplingParams`), so changing them never recompiles. The filters run in one fixed order:

    logits / temperature -> top-k -> top-p (on the top-k renormalised distribution) -> min-p

Each filter keeps at least one token (the most probable) and keeps ties at its boundary, so the kept set
does not depend on how equal logits happen to be ordered: top-k keeps every token whose logit is >= the
k-th largest, top-p every token whose strictly-more-probable mass is < p (the smallest prefix of the
sorted distribution whose mass reaches p, plus ties of its last token), min-p every token with
probability >= min_p * the largest. A row with temperature 0 is greedy.

Two ways to find the top-k and top-p thresholds (`SamplerConfig.method`), with the same kept sets:
  "sort"    sort the row, read the k-th largest value / the logit of the last token (in descending order)
            whose preceding mass is < p: the natural path on accelerators, and the reference for the other;
  "bisect"  bisection over the float bits (32 masked reductions per threshold), no sort: XLA's CPU sort
            of one 8000-entry row costs ~2 ms, more than a whole decode step of a 7M-param model;
  "auto"    (default) "bisect" when the default backend is the CPU, else "sort", chosen when traced.
The sample is drawn by inverse CDF with a two-level (blocked) cumulative sum and one uniform number per row.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

STRATEGIES = ("greedy", "sample")
METHODS = ("auto", "sort", "bisect")
_INT_MIN, _INT_MAX = np.iinfo(np.int32).min, np.iinfo(np.int32).max


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Static: which steps are compiled into the decode loop. Changing a field recompiles."""

    sample: bool = False  # False: greedy argmax, the filters below are ignored
    top_k: bool = False
    top_p: bool = False
    min_p: bool = False
    method: str = "auto"  # how top-k / top-p thresholds are found: "auto", "sort" or "bisect" (module doc)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}: expected one of {', '.join(METHODS)}")


@flax.struct.dataclass
class SamplingParams:
    """Per-prompt values, each [B] (a row per prompt; samples of one prompt share them)."""

    temperature: jax.Array  # f32 >= 0; 0: greedy for that row
    top_k: jax.Array  # int32 >= 0; 0 or >= V: off
    top_p: jax.Array  # f32 in (0, 1]; 1: off
    min_p: jax.Array  # f32 in [0, 1]; 0: off


def _per_row(name: str, value: float | Sequence[float], batch: int, dtype: type) -> np.ndarray:
    try:
        array = np.asarray(value, dtype)
    except OverflowError:
        raise ValueError(f"{name}={value!r}: out of range for {np.dtype(dtype).name}") from None
    if array.ndim > 1 or (array.ndim == 1 and array.shape[0] != batch):
        raise ValueError(f"{name}: expected a scalar or {batch} values (one per prompt), got shape {array.shape}")
    return np.broadcast_to(array, (batch,))


def _check_range(name: str, values: np.ndarray, ok: np.ndarray, allowed: str) -> None:
    if not np.all(ok):
        raise ValueError(f"{name}={values[~ok][0].item()!r}: expected {allowed}")


def make_sampler(batch: int, strategy: str = "sample", *, temperature: float | Sequence[float] = 1.0,
                 top_k: int | Sequence[int] = 0, top_p: float | Sequence[float] = 1.0,
                 min_p: float | Sequence[float] = 0.0, method: str = "auto") -> tuple[SamplerConfig, SamplingParams]:
    """Validates per-prompt values (scalars broadcast to `batch`) and compiles in only the filters in use.

    A filter whose value is "off" for every row is left out of the program; turning it on recompiles.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}: expected one of {', '.join(STRATEGIES)}")
    t = _per_row("temperature", temperature, batch, np.float32)
    k = _per_row("top_k", top_k, batch, np.int64)
    p = _per_row("top_p", top_p, batch, np.float32)
    m = _per_row("min_p", min_p, batch, np.float32)
    _check_range("temperature", t, np.isfinite(t) & (t >= 0), ">= 0 and finite (0 is greedy)")
    _check_range("top_k", k, k >= 0, ">= 0 (0 is off)")
    _check_range("top_p", p, (p > 0) & (p <= 1), "0 < top_p <= 1 (1 is off)")
    _check_range("min_p", m, (m >= 0) & (m <= 1), "0 <= min_p <= 1 (0 is off)")
    config = SamplerConfig(sample=strategy == "sample", top_k=bool(np.any(k > 0)), top_p=bool(np.any(p < 1)),
                           min_p=bool(np.any(m > 0)), method=method)
    params = SamplingParams(temperature=jnp.asarray(t), top_k=jnp.asarray(np.minimum(k, _INT_MAX), jnp.int32),
                            top_p=jnp.asarray(p), min_p=jnp.asarray(m))
    return config, params


def backend_default(method: str, cpu: str, accelerator: str) -> str:
    """Resolves "auto" when traced: the `cpu` path on XLA:CPU (whose sort is slow), else `accelerator`."""
    if method != "auto":
        return method
    return cpu if jax.default_backend() == "cpu" else accelerator


def total_order_key(x: jax.Array) -> jax.Array:
    """float32 -> int32 in the order lax.sort / lax.top_k give floats (-0.0 < +0.0, -inf above -NaN)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    return jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _bisect(pred, rows: int) -> tuple[jax.Array, jax.Array]:
    """Per row, the boundary of a monotone predicate over int32 keys: pred(lo) holds, pred(hi) does not.

    pred: [R] int32 -> [R] bool, True for all keys up to some boundary, then False. Returns (lo, hi)
    with hi == lo + 1 after 32 halvings (the whole int32 range).
    """

    def halve(_, bounds):
        lo, hi = bounds
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without int32 overflow
        ok = pred(mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    start = (jnp.full((rows,), _INT_MIN, jnp.int32), jnp.full((rows,), _INT_MAX, jnp.int32))
    return jax.lax.fori_loop(0, 32, halve, start)


def _value_key(x: jax.Array) -> jax.Array:
    # The masks compare values, so -0.0 and +0.0 must be one key (XLA folds `x + 0.0` away, so a where).
    return total_order_key(jnp.where(x == 0, 0.0, x))


def top_k_mask(logits: jax.Array, k: jax.Array, method: str = "auto") -> jax.Array:
    """logits [R, V], k [R] -> [R, V] bool: logit >= the k-th largest (ties kept); k <= 0 or k >= V: all."""
    vocab = logits.shape[-1]
    off = (k <= 0) | (k >= vocab)
    if backend_default(method, "bisect", "sort") == "sort":
        # k is per row and traced, and lax.top_k needs a static k: the k-th value is read from the sorted row.
        ascending = jnp.sort(logits, axis=-1)
        kth = jnp.take_along_axis(ascending, jnp.clip(vocab - k, 0, vocab - 1)[:, None], axis=-1)
        return off[:, None] | (logits >= kth)
    keys = _value_key(logits)
    # The largest key t with count(keys >= t) >= k is the k-th largest key.
    kth, _ = _bisect(lambda t: jnp.sum(keys >= t[:, None], axis=-1) >= k, logits.shape[0])
    return off[:, None] | (keys >= kth[:, None])


def top_p_mask(logits: jax.Array, p: jax.Array, method: str = "auto") -> jax.Array:
    """logits [R, V], p [R] -> [R, V] bool: tokens whose strictly-more-probable mass is < p; p >= 1: all."""
    probs = jax.nn.softmax(logits, axis=-1)
    if backend_default(method, "bisect", "sort") == "sort":
        # Descending by logit, carrying the probabilities. The mass before a position is >= the mass strictly
        # more probable than its token, equal at the first of a run of ties, so the positions with mass
        # before < p are a prefix that ends in the last token kept; its logit is the threshold.
        neg_sorted, sorted_probs = jax.lax.sort((-logits, probs), dimension=-1, num_keys=1)
        before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
        last = jnp.sum(before < p[:, None], axis=-1) - 1  # >= 0: nothing comes before the first
        threshold = -jnp.take_along_axis(neg_sorted, last[:, None], axis=-1)
        return (p >= 1)[:, None] | (logits >= threshold)
    keys = _value_key(logits)
    # Smallest key t with mass(keys > t) < p; the predicate below is its negation, true below t.
    _, threshold = _bisect(lambda t: jnp.sum(jnp.where(keys > t[:, None], probs, 0.0), axis=-1) >= p,
                           logits.shape[0])
    return (p >= 1)[:, None] | (keys >= threshold[:, None])


def min_p_mask(logits: jax.Array, min_p: jax.Array) -> jax.Array:
    """logits [R, V], min_p [R] -> [R, V] bool: probability >= min_p * the largest (log space)."""
    cutoff = jnp.max(logits, axis=-1) + jnp.log(min_p)
    return logits >= cutoff[:, None]


def filter_logits(config: SamplerConfig, params: SamplingParams, logits: jax.Array) -> jax.Array:
    """logits [R, V] -> tempered logits with -inf outside the kept set, in the documented order.

    params hold one value per row here (already repeated to R rows). Rows with temperature 0 are
    divided by 1 (their token is the argmax, chosen in `choose_tokens`).
    """
    t = params.temperature
    logits = logits / jnp.where(t > 0, t, 1.0)[:, None]
    if config.top_k:
        logits = jnp.where(top_k_mask(logits, params.top_k, config.method), logits, -jnp.inf)
    if config.top_p:
        logits = jnp.where(top_p_mask(logits, params.top_p, config.method), logits, -jnp.inf)
    if config.min_p:
        logits = jnp.where(min_p_mask(logits, params.min_p), logits, -jnp.inf)
    return logits


def sample_from_uniform(logits: jax.Array, u: jax.Array) -> jax.Array:
    """Inverse-CDF sampling: logits [R, V] (-inf: excluded), u [R] in (0, 1] -> token [R] int32.

    Token i is chosen when cdf(i - 1) < u * total <= cdf(i): with u uniform that is probability p_i, and a
    token of probability 0 is never chosen. The cdf is blocked (block sums, then one block) because a
    flat cumsum over V is ~10x slower on CPU.
    """
    rows, vocab = logits.shape
    block = max(1, math.isqrt(vocab - 1) + 1)
    blocks = -(-vocab // block)
    probs = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    probs = jnp.pad(probs, ((0, 0), (0, blocks * block - vocab))).reshape(rows, blocks, block)
    block_mass = jnp.sum(probs, axis=-1)  # [R, blocks]
    cdf = jnp.cumsum(block_mass, axis=-1)
    target = u * cdf[:, -1]
    b = jnp.minimum(jnp.sum(cdf < target[:, None], axis=-1), blocks - 1)
    before = jnp.take_along_axis(jnp.pad(cdf, ((0, 0), (1, 0))), b[:, None], axis=-1)  # cdf(b - 1)
    inner = jnp.take_along_axis(probs, b[:, None, None], axis=1)[:, 0]  # [R, block]
    inner_cdf = before + jnp.cumsum(inner, axis=-1)
    # Rounding may leave target above the block's last cdf value; capping it there lands on the
    # block's last token of non-zero probability instead of a trailing excluded one.
    target = jnp.minimum(target, inner_cdf[:, -1])
    i = jnp.sum(inner_cdf < target[:, None], axis=-1)
    return (b * block + i).astype(jnp.int32)


def choose_tokens(config: SamplerConfig, params: SamplingParams | None, logits: jax.Array,
                  key: jax.Array) -> jax.Array:
    """logits [R, V] -> next tokens [R] int32: argmax, or a sample after `filter_logits`."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if not config.sample:
        return greedy
    u = 1.0 - jax.random.uniform(key, (logits.shape[0],))  # (0, 1]: u = 0 could pick a zero-mass token
    sampled = sample_from_uniform(filter_logits(config, params, logits), u)
    return jnp.where(params.temperature > 0, sampled, greedy)


def repeat_rows(params: SamplingParams, repeats: int) -> SamplingParams:
    """[B] per-prompt values -> [B * repeats] per-row values (prompt-major rows)."""
    return jax.tree.map(lambda x: jnp.repeat(x, repeats, axis=0), params)
