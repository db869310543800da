"""The Pallas attention kernels under a mesh (`models/kernels/sharded.py`) on 8 fake CPU devices.

Sharded flash attention (forward and its custom-VJP gradients) and sharded decode attention equal the
unsharded kernel and the plain-jnp reference; the whole model with attention_impl="pallas" in a sharded
train step (and a sharded prefill + cached decode) equals attention_impl="xla"; kv heads that the
tensor axis does not divide are refused. The kernels run in interpret mode, so shapes are tiny.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import get_config
from models.kernels.decode_attention import DecodeBlockSizes, decode_attention, decode_attention_reference
from models.kernels.flash_attention import BlockSizes, flash_attention, flash_attention_reference
from models.kernels.sharded import (FLASH_LAYOUTS, over_batch_and_heads, sharded_decode_attention,
                                    sharded_flash_attention)
from models.kv_cache import init_cache, with_lengths
from models.sharding import DEFAULT_RULES
from models.transformer import Transformer
from research.config import MeshConfig
from research.mesh import make_mesh
from research.train_step import build_steps

KERNEL_TOL = 1e-5  # fp32, as in the single-device kernel tests: sharding changes no arithmetic
MODEL_TOL = 1e-4  # fp32 whole models, as in tests/test_sharding.py

# B divides data=8; N=8 query heads in K=4 groups of 2 divide tensor=4 (one group per device).
B, T, S, N, K, H = 8, 24, 40, 8, 4, 8
FLASH_BLOCKS = BlockSizes(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)  # T, S: ragged tails
DECODE_BLOCKS = DecodeBlockSizes(block_k=16, num_splits=2)
MESHES = {"data2-tensor4": MeshConfig(data=2, tensor=4), "data8": MeshConfig(data=8),
          "data4-tensor2": MeshConfig(data=4, tensor=2), "data2-fsdp2-tensor2": MeshConfig(data=2, fsdp=2, tensor=2)}


@pytest.fixture(autouse=True)
def full_precision_fp32_matmuls():
    """XLA may run fp32 matmuls in TF32 on GPU; the baselines compared against must not (no-op on CPU)."""
    with jax.default_matmul_precision("highest"):
        yield


def mesh(name: str) -> jax.sharding.Mesh:
    return make_mesh(MESHES[name], jax.devices("cpu"))


def normal(rng: np.random.Generator, *shape: int) -> jax.Array:
    return jnp.asarray(rng.normal(size=shape), jnp.float32)


@pytest.fixture(scope="module")
def flash_inputs() -> dict[str, jax.Array]:
    """Queries after a cache (positions S - T..S-1), ragged kv lengths per row, a window: every per-row
    array must reach the device that holds its rows."""
    rng = np.random.default_rng(0)
    return dict(q=normal(rng, B, T, N, H), k=normal(rng, B, S, K, H), v=normal(rng, B, S, K, H),
                q_positions=jnp.tile(jnp.arange(S - T, S), (B, 1)), kv_positions=jnp.tile(jnp.arange(S), (B, 1)),
                kv_lengths=jnp.asarray(rng.integers(S - T, S + 1, B)), ct=normal(rng, B, T, N, H))


@functools.partial(jax.jit, static_argnums=0)
def flash_out_and_grads(attention, q, k, v, ct, **mask):
    def f(q, k, v):
        return attention(q, k, v, **mask, sliding_window=11, block_sizes=FLASH_BLOCKS, interpret=True)

    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp(ct)


@pytest.fixture(scope="module")
def flash_unsharded(flash_inputs):
    return flash_out_and_grads(flash_attention, **flash_inputs)


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_sharded_flash_attention_equals_unsharded_and_reference(mesh_name, flash_inputs, flash_unsharded):
    with jax.set_mesh(mesh(mesh_name)):
        sharded = flash_out_and_grads(sharded_flash_attention, **flash_inputs)
    mask = {name: x for name, x in flash_inputs.items() if name not in ("q", "k", "v", "ct")}

    def reference(q, k, v):
        return flash_attention_reference(q, k, v, **mask, sliding_window=11)

    out_ref, vjp = jax.vjp(reference, *(flash_inputs[x] for x in "qkv"))
    for name, got, unsharded, ref in zip(("out", "dq", "dk", "dv"), jax.tree.leaves(sharded),
                                         jax.tree.leaves(flash_unsharded), (out_ref, *vjp(flash_inputs["ct"]))):
        np.testing.assert_allclose(got, unsharded, atol=KERNEL_TOL, rtol=KERNEL_TOL, err_msg=name)
        np.testing.assert_allclose(got, ref, atol=KERNEL_TOL, rtol=KERNEL_TOL, err_msg=name)


@pytest.fixture(scope="module")
def decode_inputs() -> dict[str, jax.Array]:
    """Ragged cache lengths, an empty row (zeros, not NaN) and a query position inside the cache."""
    rng = np.random.default_rng(1)
    lengths = jnp.asarray([S, 37, 1, 0, 16, 17, 5, 29])
    return dict(q=normal(rng, B, N, H), k=normal(rng, B, S, K, H), v=normal(rng, B, S, K, H), kv_lengths=lengths,
                q_positions=jnp.maximum(lengths - 1, 0).at[1].set(20))


@functools.partial(jax.jit, static_argnums=0)
def decode(attention, q, k, v, kv_lengths, q_positions):
    return attention(q, k, v, kv_lengths, q_positions, sliding_window=13, block_sizes=DECODE_BLOCKS, interpret=True)


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_sharded_decode_attention_equals_unsharded_and_reference(mesh_name, decode_inputs):
    with jax.set_mesh(mesh(mesh_name)):
        sharded = decode(sharded_decode_attention, **decode_inputs)
    np.testing.assert_allclose(sharded, decode(decode_attention, **decode_inputs), atol=KERNEL_TOL, rtol=KERNEL_TOL)
    reference = decode_attention_reference(**decode_inputs, sliding_window=13)
    np.testing.assert_allclose(sharded, reference, atol=KERNEL_TOL, rtol=KERNEL_TOL)


@pytest.mark.parametrize("mesh_name, batch, local_shape", [
    ("data2-tensor4", B, (4, T, 2, H)),
    ("data2-fsdp2-tensor2", B, (2, T, 4, H)),
    ("data8", 2, (2, T, N, H)),  # 2 rows do not split over 8 devices: replicated, not refused
])
def test_each_device_runs_the_kernel_on_its_shard(mesh_name, batch, local_shape):
    """The kernel sees its device's rows and heads, whole sequences; the result stays sharded."""
    seen = []

    def kernel(q, k, v):
        seen.append(q.shape)
        return q * 2.0

    m = mesh(mesh_name)
    q = jnp.ones((batch, T, N, H))
    with jax.set_mesh(m):
        out = jax.jit(lambda q: over_batch_and_heads(kernel, dict(q=q, k=q[:, :, :K], v=q[:, :, :K]),
                                                     FLASH_LAYOUTS, FLASH_LAYOUTS["q"]))(q)
    assert seen == [local_shape]
    np.testing.assert_array_equal(out, 2.0)
    assert all(shard.data.shape == local_shape for shard in out.addressable_shards)


def test_no_mesh_or_one_device_calls_the_kernel_directly():
    seen = []

    def kernel(q, k, v):
        seen.append(q.shape)
        return q

    q = jnp.ones((B, T, N, H))
    arrays = dict(q=q, k=q[:, :, :K], v=q[:, :, :K])
    over_batch_and_heads(kernel, arrays, FLASH_LAYOUTS, FLASH_LAYOUTS["q"])
    with jax.set_mesh(make_mesh(MeshConfig(data=1), jax.devices("cpu")[:1])):
        jax.jit(lambda a: over_batch_and_heads(kernel, a, FLASH_LAYOUTS, FLASH_LAYOUTS["q"]))(arrays)
    assert seen == [q.shape, q.shape]


@pytest.mark.parametrize("mesh_name, kv_heads", [("data2-tensor4", 2), ("data4-tensor2", 1)])
def test_kv_heads_that_do_not_split_over_the_tensor_axis_are_refused(mesh_name, kv_heads):
    rng = np.random.default_rng(0)
    q, k = normal(rng, B, T, N, H), normal(rng, B, T, kv_heads, H)
    tensor = MESHES[mesh_name].tensor
    match = rf"mesh axes \('tensor',\) of size {tensor}, which must divide the kv heads K={kv_heads}"
    with jax.set_mesh(mesh(mesh_name)), pytest.raises(ValueError, match=match):
        jax.jit(lambda q, k: sharded_flash_attention(q, k, k, interpret=True))(q, k)
    with jax.set_mesh(mesh(mesh_name)), pytest.raises(ValueError, match=match):
        jax.jit(lambda q, k: sharded_decode_attention(q[:, 0], k, k, jnp.full((B,), T), interpret=True))(q, k)


# The whole model: the smoke preset (4 query heads in 2 kv groups) with a window shorter than a sequence.
@pytest.fixture(scope="module")
def smoke():
    cfg = get_config("smoke")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, sliding_window=9))


def with_attention(cfg, impl: str):
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention_impl=impl))


def train_two_steps(cfg, mesh_name: str, batches):
    steps = build_steps(dataclasses.replace(cfg, mesh=MESHES[mesh_name]), mesh(mesh_name))
    state, losses = steps.init(), []
    for batch in batches:
        state, metrics = steps.train(state, jax.device_put(batch, steps.batch_sharding))
        losses.append(float(metrics["loss"]))
    return state, losses


@pytest.mark.parametrize("mesh_name", ["data2-fsdp2-tensor2"])  # every axis kind at once; the kernels' own
def test_sharded_train_step_with_pallas_equals_xla(smoke, mesh_name):  # tests cover the other meshes
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, smoke.model.vocab_size, (smoke.data.batch_size, smoke.data.seq_len + 1), np.int32)
               for _ in range(2)]
    xla, xla_losses = train_two_steps(with_attention(smoke, "xla"), mesh_name, batches)
    pallas, pallas_losses = train_two_steps(with_attention(smoke, "pallas"), mesh_name, batches)
    np.testing.assert_allclose(pallas_losses, xla_losses, rtol=MODEL_TOL)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(pallas.params), jax.tree.leaves(xla.params)):
        np.testing.assert_allclose(a, b, rtol=MODEL_TOL, atol=MODEL_TOL, err_msg=jax.tree_util.keystr(path))


def test_sharded_prefill_and_cached_decode_with_pallas_equal_xla(smoke):
    """Flash kernel for a ragged prompt, then the decode kernel per token, the batch and heads sharded."""
    m, cfg = mesh("data4-tensor2"), smoke.model
    params = build_steps(with_attention(smoke, "xla"), m).init().params
    batch_sharding = NamedSharding(m, P(("data",)))
    prompt = jax.device_put(jax.random.randint(jax.random.key(2), (8, 11), 0, cfg.vocab_size), batch_sharding)
    new = jax.device_put(jax.random.randint(jax.random.key(3), (8, 3), 0, cfg.vocab_size), batch_sharding)
    lengths = jnp.array([11, 5, 11, 7, 1, 11, 9, 11])

    @functools.partial(jax.jit, static_argnums=0)
    def forward(model_cfg, params, tokens, cache):
        return Transformer(model_cfg).apply({"params": params}, tokens, cache=cache)[:2]

    logits = {}
    for impl in ("xla", "pallas"):
        model_cfg = dataclasses.replace(cfg, attention_impl=impl)
        with jax.set_mesh(m), nn.logical_axis_rules(DEFAULT_RULES):
            first, cache = forward(model_cfg, params, prompt, init_cache(model_cfg, batch=8, max_len=16))
            cache = with_lengths(cache, lengths)
            steps = [first[jnp.arange(8), lengths - 1]]
            for i in range(new.shape[1]):
                step, cache = forward(model_cfg, params, new[:, i:i + 1], cache)
                steps.append(step[:, 0])
        logits[impl] = jnp.stack(steps)
    np.testing.assert_allclose(logits["pallas"], logits["xla"], atol=MODEL_TOL, rtol=MODEL_TOL)


def test_model_with_kv_heads_not_dividing_the_tensor_axis_is_refused(smoke):
    mqa = dataclasses.replace(smoke, model=dataclasses.replace(smoke.model, num_kv_heads=1, attention_impl="pallas"))
    steps = build_steps(dataclasses.replace(mqa, mesh=MESHES["data4-tensor2"]), mesh("data4-tensor2"))
    batch = np.zeros((mqa.data.batch_size, mqa.data.seq_len + 1), np.int32)
    with pytest.raises(ValueError, match="must divide the kv heads K=1"):
        steps.train(steps.init(), jax.device_put(batch, steps.batch_sharding))
