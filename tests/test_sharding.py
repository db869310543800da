"""The pjit-style train step on 8 fake CPU devices equals the single-device step."""

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import get_config
from research.config import MeshConfig
from research.mesh import make_mesh, mesh_shape
from research.train_step import build_steps

# Sharded reductions sum in a different order: fp32 whole-model tolerance.
TOL = 1e-4


@pytest.fixture(scope="module")
def cfg():
    return get_config("smoke")


def run_steps(cfg, mesh_cfg, devices, batches):
    steps = build_steps(dataclasses.replace(cfg, mesh=mesh_cfg), make_mesh(mesh_cfg, devices))
    state = steps.init()
    losses = []
    for batch in batches:
        state, metrics = steps.train(state, jax.device_put(batch, steps.batch_sharding))
        losses.append(float(metrics["loss"]))
    return steps, state, losses


def test_sharded_train_step_equals_single_device(cfg):
    cpus = jax.devices("cpu")
    assert len(cpus) == 8, "conftest sets --xla_force_host_platform_device_count=8"
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, cfg.model.vocab_size, (cfg.data.batch_size, cfg.data.seq_len + 1), np.int32)
               for _ in range(3)]
    _, single, single_losses = run_steps(cfg, MeshConfig(data=1), cpus[:1], batches)
    steps, sharded, sharded_losses = run_steps(cfg, MeshConfig(data=2, fsdp=2, tensor=2), cpus, batches)

    # The rules table really shards: params over fsdp/tensor, the batch over data and fsdp.
    wq = sharded.params["block_0"]["attn"]["wq"]
    assert wq.sharding.spec == P("fsdp", "tensor", None)
    assert sharded.params["block_0"]["mlp"]["w_down"].sharding.spec == P("tensor", "fsdp")
    assert sharded.opt_state[1][0].mu["block_0"]["attn"]["wq"].sharding.spec == P("fsdp", "tensor", None)
    assert steps.batch_sharding.spec == P(("data", "fsdp"), None)
    assert len(wq.addressable_shards) == 8 and wq.addressable_shards[0].data.shape == (16, 2, 8)

    np.testing.assert_allclose(sharded_losses, single_losses, rtol=TOL)
    for a, b in zip(jax.tree.leaves(sharded.params), jax.tree.leaves(single.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=TOL, atol=TOL)


def test_uneven_dims_are_replicated_not_rejected(cfg):
    """MQA's single kv head cannot split over tensor=2: it is replicated on that axis."""
    mqa = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_kv_heads=1))
    steps = build_steps(mqa, make_mesh(MeshConfig(data=4, tensor=2), jax.devices("cpu")))
    spec = steps.state_sharding.params["block_0"]["attn"]["wk"].spec
    assert spec == P(None, None, None)


def test_mesh_shape_resolution_and_errors():
    assert mesh_shape(MeshConfig(), 8) == (8, 1, 1, 1)
    assert mesh_shape(MeshConfig(data=-1, tensor=2), 8) == (4, 1, 2, 1)
    with pytest.raises(ValueError, match="uses 4 devices but 8 are available"):
        mesh_shape(MeshConfig(data=2, tensor=2), 8)
    with pytest.raises(ValueError, match="do not divide"):
        mesh_shape(MeshConfig(data=-1, tensor=3), 8)
