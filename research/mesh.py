"""Device mesh from config, batch placement, and multi-process start-up."""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from models.config import ConfigError
from models.sharding import MESH_AXES, sharding_for
from research.config import MeshConfig

def _started_as_one_of_many() -> bool:
    """True under a launcher that starts several processes (explicit coordinator, SLURM, Open MPI)."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    return any(int(os.environ.get(var, "1")) > 1 for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))


def maybe_initialize_distributed() -> bool:
    """Calls jax.distributed.initialize() (which auto-detects the cluster) when needed."""
    if _started_as_one_of_many() and not jax.distributed.is_initialized():
        jax.distributed.initialize()
        return True
    return False


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, ...]:
    """Resolves the -1 axis and checks the product equals the device count."""
    sizes = dataclasses.asdict(cfg)
    fixed = int(np.prod([s for s in sizes.values() if s != -1]))
    if -1 in sizes.values():
        if num_devices % fixed:
            raise ConfigError(f"mesh={sizes}: the fixed axes ({fixed} devices) do not divide the {num_devices} devices")
        sizes = {k: (num_devices // fixed if s == -1 else s) for k, s in sizes.items()}
    total = int(np.prod(list(sizes.values())))
    if total != num_devices:
        raise ConfigError(f"mesh={sizes}: uses {total} devices but {num_devices} are available")
    return tuple(sizes[a] for a in MESH_AXES)


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    devices = devices if devices is not None else jax.devices()
    shape = mesh_shape(cfg, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def batch_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """[B, ...] batches are split over (data, fsdp)."""
    return sharding_for(("batch",) + (None,) * (len(shape) - 1), shape, mesh)


def put_batch(batch: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Places a global host batch; each process contributes only its own rows."""
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    rows = batch.shape[0] // jax.process_count()
    local = batch[jax.process_index() * rows:(jax.process_index() + 1) * rows]
    return jax.make_array_from_process_local_data(sharding, local, batch.shape)
