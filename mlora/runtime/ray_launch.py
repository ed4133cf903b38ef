"""Pipeline runs on a Ray cluster: one actor per stage, each running what a torchrun worker runs.

`mlora train RUN.yaml --ray P` asks Ray for P stage actors (one GPU each when the run is on
GPUs, else one CPU each, over gloo), packed on as few nodes as they fit. Each actor gets
the torch.distributed environment torchrun would give it (rank, world size, rank 0's
address and a free port there) and calls `pipeline.run_pipeline`, so a Ray run is the
same code path as a torchrun run: same plan, same checks, same outputs and errors.
Ray gives each actor its own GPU (CUDA_VISIBLE_DEVICES), so every stage's device is
`cuda:0` in its process. Paths in the run file are read by every actor from this
process's working directory: on several nodes the model, data and output folder must be
at the same paths on each (a shared file system), as under torchrun.

The run file is loaded here first, so a mistake in it is reported before Ray starts.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

from mlora.config import ConfigError, RunSpec

# NVLink multicast stays off, as in launch/torchrun.sh: a pipeline's point-to-point traffic does not use it.
STAGE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
PLACEMENT_TIMEOUT_S = 120.0
LOG_RELAY_S = 2.0  # Ray relays a worker's output from its log file, a moment behind


class RayLaunchError(RuntimeError):
    """The cluster cannot hold the run's stages, or a stage actor died."""


class StageActor:
    """One pipeline stage in its own Ray worker process."""

    def address(self) -> tuple[str, int]:
        """This node's address and a port free on it now (rank 0's rendezvous)."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def run(self, rank: int, n_stages: int, master: tuple[str, int], cwd: str, run_file: str,
            overrides: Sequence[str], resume: bool, overwrite: bool) -> tuple[int, list[str]]:
        """The stage's exit status, and why the run was refused (rank 0, bad input)."""
        from mlora.runtime.pipeline import run_pipeline

        os.chdir(cwd)
        if n_stages == 1:  # one stage is the single-process trainer, as under torchrun
            return self._train_alone(run_file, overrides, resume, overwrite)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(n_stages), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR=master[0], MASTER_PORT=str(master[1]))
        errors: list[str] = []
        status = run_pipeline(run_file, overrides, resume=resume, overwrite=overwrite, live=False, errors=errors)
        return status, errors

    def _train_alone(self, run_file: str, overrides: Sequence[str], resume: bool,
                     overwrite: bool) -> tuple[int, list[str]]:
        from mlora.cli import user_errors
        from mlora.runtime.launch import train_from_cli

        try:
            return train_from_cli(run_file, overrides, resume=resume, overwrite=overwrite, live=False), []
        except user_errors() as exc:
            return 2, [f"mlora train: error: {exc}"]


def stage_resources(spec: RunSpec, n_stages: int, cluster: dict[str, float]) -> dict[str, float]:
    """What each stage actor asks Ray for: a GPU where the run is on GPUs (model.device not
    cpu and the cluster has one for every stage), else a CPU. A run that asks for CUDA on a
    cluster without enough GPUs is refused rather than left waiting for them."""
    gpus = cluster.get("GPU", 0.0)
    device = spec.model.device
    if device != "cpu" and gpus >= n_stages:
        return {"CPU": 1.0, "GPU": 1.0}
    if device.startswith("cuda"):
        raise ConfigError(f"{spec.source}: model: device: {device!r} with {n_stages} stages needs {n_stages} GPUs, "
                          f"and the Ray cluster has {gpus:g}")
    cpus = cluster.get("CPU", 0.0)
    if cpus < n_stages:
        raise RayLaunchError(f"{n_stages} stages on the CPU need a CPU each, and the Ray cluster has {cpus:g}")
    return {"CPU": 1.0}


def run_on_ray(run_file: str, overrides: Sequence[str], *, n_stages: int, address: str | None, resume: bool,
               overwrite: bool) -> int:
    """Train `run_file` as an `n_stages`-stage pipeline of Ray actors; the exit status as
    under torchrun (0: every job finished). `address`: a running cluster's ("auto", or
    host:port); None is Ray's own choice (RAY_ADDRESS, else a local instance)."""
    from mlora.config import load_run_file

    if n_stages < 1:
        raise ConfigError(f"--ray: the number of stages must be at least 1, got {n_stages}")
    spec = load_run_file(run_file, overrides)
    try:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    except ImportError as exc:
        raise ConfigError("--ray needs Ray: pip install 'mlora[ray]' (or ray>=2.9)") from exc

    local = address is None and not os.environ.get("RAY_ADDRESS")
    ray.init(address=address, include_dashboard=False if local else None, log_to_driver=True,
             num_cpus=max(os.cpu_count() or 1, n_stages) if local else None)
    try:
        need = stage_resources(spec, n_stages, ray.cluster_resources())
        group = placement_group([need] * n_stages, strategy="PACK")
        ready, _ = ray.wait([group.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            raise RayLaunchError(f"the Ray cluster did not give {n_stages} stages {need} each within "
                                 f"{PLACEMENT_TIMEOUT_S:.0f} s (free now: {ray.available_resources()})")
        actor_cls = ray.remote(StageActor)
        actors = [
            actor_cls.options(num_cpus=need["CPU"], num_gpus=need.get("GPU", 0.0),
                              runtime_env={"env_vars": STAGE_ENV},
                              scheduling_strategy=PlacementGroupSchedulingStrategy(group, i)).remote()
            for i in range(n_stages)
        ]
        master = ray.get(actors[0].address.remote())
        runs = [a.run.remote(rank, n_stages, master, os.getcwd(), run_file, list(overrides), resume, overwrite)
                for rank, a in enumerate(actors)]
        status = _collect(ray, actors, runs, spec.run.pipeline_timeout_s)
        remove_placement_group(group)
        return status
    finally:
        ray.shutdown()


def _collect(ray: Any, actors: list, runs: list, timeout_s: float) -> int:
    """The largest exit status of the stages. A stage whose actor died (a lost peer ends a
    stage's process, after it printed its error) is an error naming its rank; the others
    then stop on their own within the pipeline's timeout, or are killed after it."""
    status, pending, died = 0, list(runs), []
    deadline = None
    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
        for ref in done:
            try:
                code, errors = ray.get(ref)
            except ray.exceptions.RayActorError:
                died.append(runs.index(ref))
                continue
            status = max(status, int(code))
            for line in errors:
                print(line, file=sys.stderr, flush=True)
        if died and deadline is None:
            deadline = time.time() + timeout_s + 30.0
        if deadline is not None and time.time() > deadline:
            for ref in pending:
                ray.kill(actors[runs.index(ref)])
            break
    if died:
        time.sleep(LOG_RELAY_S)  # the stages' last lines are still on their way to this process
        first, *then = (f"rank {r} (stage {r})" for r in died)
        more = f", then {', '.join(then)}" if then else ""
        raise RayLaunchError(f"a stage's actor ended with an error: {first} first{more} (what each said is above, "
                             "where Ray relayed it before it stopped)")
    return status
