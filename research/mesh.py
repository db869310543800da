"""Device mesh from config, batch placement, and multi-process start-up (jax.distributed)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from models.config import ConfigError
from models.sharding import MESH_AXES, sharding_for
from research.config import MeshConfig

def _on_a_cluster() -> bool:
    """True where jax.distributed.initialize() finds the processes itself: SLURM or Open MPI with several
    tasks, or a multi-host TPU slice."""
    if any(int(os.environ.get(var, "1")) > 1 for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")):
        return True
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "") or bool(os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r}: expected an integer") from None


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, heartbeat_timeout: int = 30) -> bool:
    """Joins a multi-process run (True) or stays a single process (False); call before anything touches jax's
    devices. Explicit values win over JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID; without
    a coordinator, SLURM / Open MPI / TPU slices are detected by jax itself. A peer that stops answering ends
    the run after `heartbeat_timeout` seconds (jax's default is 100)."""
    if jax.distributed.is_initialized():
        return True
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    if coordinator:
        missing = [flag for flag, value in (("--num-processes (JAX_NUM_PROCESSES)", num_processes),
                                            ("--process-id (JAX_PROCESS_ID)", process_id)) if value is None]
        if missing:
            raise ConfigError(f"--coordinator {coordinator}: also needs {' and '.join(missing)}")
        if num_processes < 1:
            raise ConfigError(f"--num-processes={num_processes}: expected >= 1")
        if not 0 <= process_id < num_processes:
            raise ConfigError(f"--process-id={process_id}: expected 0 <= id < --num-processes={num_processes}")
        jax.distributed.initialize(coordinator, num_processes, process_id, heartbeat_timeout_seconds=heartbeat_timeout)
        return True
    if _on_a_cluster():
        jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout)
        return True
    return False


def is_main_process() -> bool:
    """Process 0 writes the run's files and prints; every process computes."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process gets here (a no-op for one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def from_main_process(value: Any) -> Any:
    """Process 0's value of a host scalar or array, on every process (so that all agree)."""
    if jax.process_count() == 1:
        return value
    return multihost_utils.broadcast_one_to_all(np.asarray(value))


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
    """Places a global host batch (every process holds all of it: the data order is a pure function of the
    step): each process hands over only the shards its own devices hold, whatever the mesh layout."""
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return jax.make_array_from_callback(batch.shape, sharding, lambda index: batch[index])
