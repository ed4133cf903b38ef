"""The pipeline transport names a peer that is gone, in real gloo process groups."""

from __future__ import annotations

import os
import time
from datetime import timedelta

import torch.multiprocessing as mp

from conftest import free_port


def _rank(rank: int, port: int, results) -> None:  # type: ignore[no-untyped-def]
    import torch
    import torch.distributed as dist

    from mlora.runtime.transport import PipelineError, Transport

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=30))
    if rank == 1:
        os._exit(0)  # a crashed stage: no goodbye
    time.sleep(2.0)  # rank 1 is gone by now: gloo refuses to even post a receive from it
    transport = Transport(0, torch.device("cpu"), 5.0, lambda r: f"rank {r} (stage {r})")
    try:
        transport.recv(1, 0, "activations of micro-batch 0")
        results.put("received")
    except PipelineError as exc:
        results.put(str(exc))
    except Exception as exc:  # noqa: BLE001 - the test reports what escaped
        results.put(f"{type(exc).__name__}: {exc}")
    results.close()
    results.join_thread()  # the message is out before the hard exit below
    os._exit(0)  # the process group would wait for its lost peer on a clean shutdown


def test_a_receive_from_a_dead_peer_names_it():
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(rank, port, results)) for rank in range(2)]
    for p in procs:
        p.start()
    message = results.get(timeout=120)
    for p in procs:
        p.join(timeout=30)
    assert message.startswith("rank 0 (stage 0): "), message
    assert "rank 1 (stage 1)" in message and "activations of micro-batch 0" in message, message
