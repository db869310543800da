"""Start a multi-process run on this machine: N processes of one command, joined by jax.distributed.

    python -m research.launch --processes 2 [--local-devices 2] [--port PORT] [--timeout S] -- \
        python -m research.train --config smoke --out runs/smoke-2p

Each process gets JAX_COORDINATOR_ADDRESS (localhost:PORT, a free port by default), JAX_NUM_PROCESSES and
JAX_PROCESS_ID, which research.train reads (research/mesh.py: initialize_distributed); --local-devices
gives each process that many CPU devices (JAX_NUM_CPU_DEVICES; CPU collectives run over gloo). Their
output is relayed line by line, prefixed with the process id. When one process fails, the others are
stopped at once (a peer stuck in a collective would otherwise wait for jax's heartbeat timeout), and the
launcher exits with the first failure's status. On a cluster the scheduler plays this role (srun,
a TPU slice's runtime): start the same command on every host with the three variables, or none on
SLURM / TPU, where jax finds them itself.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence

from research.cli import ArgumentParser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_env(process_id: int, processes: int, port: int, local_devices: int | None) -> dict[str, str]:
    env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(processes),
               JAX_PROCESS_ID=str(process_id))
    if local_devices is not None:
        env["JAX_NUM_CPU_DEVICES"] = str(local_devices)
        # XLA's own fake-device flag would contradict it (the tests set it for single-process runs).
        flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).strip()
        env["XLA_FLAGS"] = flags
    return env


def _relay(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(prefix + line)
        out.flush()


def launch(command: Sequence[str], processes: int, local_devices: int | None = None, port: int | None = None,
           timeout: float | None = None) -> int:
    """Runs `command` as `processes` processes; 0 when all succeed, else the first failure's exit status
    (124 when `timeout` seconds pass first). The survivors of a failure are killed."""
    port = port or free_port()
    procs = [subprocess.Popen(list(command), env=process_env(i, processes, port, local_devices),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
             for i in range(processes)]
    relays = [threading.Thread(target=_relay, args=(stream, f"[{i}] ", out), daemon=True)
              for i, p in enumerate(procs) for stream, out in ((p.stdout, sys.stdout), (p.stderr, sys.stderr))]
    for relay in relays:
        relay.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    status = 0
    try:
        while True:
            codes = [p.poll() for p in procs]  # every process, every time: any() would stop at the first
            failed = [code for code in codes if code not in (None, 0)]
            if failed or None not in codes:
                status = failed[0] if failed else 0
                break
            if deadline is not None and time.monotonic() > deadline:
                status = 124
                sys.stderr.write(f"launch: stopped after {timeout:g} s\n")
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # the process group: whatever the process started too
            p.wait()
        for relay in relays:
            relay.join(timeout=5)
    return status


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print("python -m research.launch: error: expected `-- COMMAND ...` after the options", file=sys.stderr)
        return 2
    split = argv.index("--")
    parser = ArgumentParser(prog="python -m research.launch", description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, required=True)
    parser.add_argument("--local-devices", type=int, default=None, help="CPU devices per process")
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before every process is stopped")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1:]
    problems = [f"--processes={args.processes}: expected >= 1" if args.processes < 1 else "",
                f"--local-devices={args.local_devices}: expected >= 1"
                if args.local_devices is not None and args.local_devices < 1 else "",
                f"--timeout={args.timeout}: expected > 0" if args.timeout is not None and not args.timeout > 0 else "",
                "expected a command after --" if not command else ""]
    problem = next((p for p in problems if p), None)
    if problem:
        print(f"python -m research.launch: error: {problem}", file=sys.stderr)
        return 2
    return launch(command, args.processes, args.local_devices, args.port, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
