"""What runs in bench_multigpu.py's worker processes, one kind per process (group).

    write-model  a random-weight Llama folder (config, safetensors, tokenizer) and the host's info
    mlora        `mlora train` of a run file: one process, or one rank of a torchrun pipeline
    fsdp         HF PEFT LoRA over the HF model under FSDP2, the jobs one after another

Each takes a JSON spec file written by the orchestrator and writes its result where the
spec says: `python bench/multigpu/workers.py KIND SPEC` (under torchrun for P ranks).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).resolve()
sys.path.insert(0, str(ROOT))

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def worker_env(small: bool) -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "NCCL_NVLS_ENABLE": "0",
        "NCCL_CUMEM_ENABLE": "0",
        "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
        "NVSHMEM_DISABLE_NVLS": "1",
        "TORCH_DIST_INIT_BARRIER": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if small:
        env["OMP_NUM_THREADS"] = "1"
    return env


def peak_bytes(device: Any) -> int:
    from mlora.runtime.trainer import peak_memory_bytes

    return peak_memory_bytes(device)


def worker_write_model(spec: dict[str, Any]) -> None:
    """A random-weight Llama folder of the shape: config, safetensors shards, tokenizer."""
    import torch
    from transformers import LlamaConfig

    from bench.e2e.bench_e2e import random_llama
    from mlora.model.tiny import build_tokenizer

    folder = Path(spec["folder"])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(1024)
    dtype = getattr(torch, spec["dtype"])
    config = LlamaConfig(
        **spec["dims"], vocab_size=max(spec["vocab"], len(tokenizer)), max_position_embeddings=max(4096, spec["seq"]),
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, dtype=spec["dtype"],
    )
    device = torch.device("cuda" if torch.cuda.is_available() and spec["device"] == "cuda" else "cpu")
    torch.manual_seed(0)
    model = random_llama(config, device, dtype)
    model.save_pretrained(folder, max_shard_size="5GB")
    tokenizer.save_pretrained(folder)
    info = {"torch": torch.__version__, "params": sum(p.numel() for p in model.parameters()),
            "vocab": config.vocab_size, "tokenizer_len": len(tokenizer)}
    try:
        import peft
        import transformers

        info.update(transformers=transformers.__version__, peft=peft.__version__)
    except ImportError:
        pass
    if device.type == "cuda":
        info.update(device=torch.cuda.get_device_name(0), n_devices=torch.cuda.device_count(),
                    cuda=torch.version.cuda)
    else:
        info.update(device="cpu", n_devices=os.cpu_count())
    Path(spec["info"]).write_text(json.dumps(info))


def patch_trace_sync() -> None:
    """End every compute action of a stage worker with a device synchronize (CUDA only),
    so that the run's host-timestamped trace shows GPU time as busy."""
    import torch

    from mlora.runtime import stage_worker

    if not torch.cuda.is_available():
        return
    for name in ("_forward", "_backward", "_optimizer_step"):
        original = getattr(stage_worker.StageWorker, name)

        def synced(self: Any, action: Any, _original: Any = original) -> None:
            _original(self, action)
            torch.cuda.synchronize()

        setattr(stage_worker.StageWorker, name, synced)


def worker_mlora(spec: dict[str, Any]) -> None:
    """`mlora train RUN --plain` in this process (1 process: the trainer; under torchrun: a stage)."""
    if spec.get("trace_sync"):
        patch_trace_sync()
    from mlora.cli import main as mlora_main

    sys.exit(mlora_main(["train", spec["run_file"], "--plain"]))


def set_active_adapter(model: Any, name: str) -> None:
    """Route every LoRA layer through adapter `name` only (PEFT's set_adapter without its
    requires_grad flips: every adapter stays trainable, the idle ones get no gradient)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module._active_adapter = name


def worker_fsdp(spec: dict[str, Any]) -> None:
    """PEFT LoRA under FSDP2 over all ranks, the jobs trained one after another."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoConfig

    from bench.e2e.bench_e2e import random_llama

    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    use_cuda = spec["device"] == "cuda" and torch.cuda.is_available()
    device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=1800))
    mesh = init_device_mesh(device.type, (world,))
    micro, seq, steps, n_jobs = spec["micro"], spec["seq"], spec["steps"], spec["jobs"]
    if micro % world:
        raise SystemExit(f"micro-batch {micro} does not split over {world} ranks")
    rows = micro // world

    config = AutoConfig.from_pretrained(spec["model"], local_files_only=True)
    config._attn_implementation = "sdpa"
    config.use_cache = False
    dtype = getattr(torch, spec["dtype"])
    torch.manual_seed(0)  # every rank builds the same random weights, then keeps its shard
    model = random_llama(config, device, dtype)
    model.requires_grad_(False)
    model.eval()
    names = [f"job{j}" for j in range(n_jobs)]
    lora = dict(r=spec["rank"], lora_alpha=2 * spec["rank"], lora_dropout=0.0, target_modules=list(TARGETS),
                task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, LoraConfig(**lora), adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, LoraConfig(**lora))
    for n, p in peft_model.named_parameters():
        p.requires_grad_("lora_" in n)
    # The frozen base is sharded; the adapters are replicated (ignored by FSDP) and the
    # running job's gradients all-reduced once per step: only the running job's adapter
    # costs communication, as when each job is its own FSDP launch.
    lora_named = [(n, p) for n, p in peft_model.named_parameters() if "lora_" in n]
    for _, p in lora_named:  # same order on every rank
        dist.broadcast(p.data, src=0)
    lora_params = {p for _, p in lora_named}
    hf = peft_model.base_model.model
    for layer in hf.model.layers:
        fully_shard(layer, mesh=mesh, ignored_params=lora_params)
    fully_shard(hf, mesh=mesh, ignored_params=lora_params)
    if use_cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    def job_params(name: str) -> list[Any]:
        return [p for n, p in peft_model.named_parameters() if "lora_" in n and f".{name}." in n]

    def b_abs(name: str) -> float:
        return sum(float(p.detach().float().abs().sum()) for n, p in peft_model.named_parameters()
                   if "lora_B" in n and f".{name}." in n)

    def all_reduce_grads(params: list[Any]) -> None:
        grads = [p.grad for p in params]
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat.div_(world)
        for g, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(reduced)

    dist.barrier()
    start = time.perf_counter()
    completion, steady, checks = [], [], []
    for j, name in enumerate(names):
        set_active_adapter(peft_model, name)
        params = job_params(name)
        opt = torch.optim.AdamW(params, lr=spec["lr"])
        gen = torch.Generator().manual_seed(j)
        t_steady = None
        for step in range(steps):
            if step == spec["warmup"]:
                if use_cuda:
                    torch.cuda.synchronize(device)
                t_steady = time.perf_counter()
            ids = torch.randint(3, min(config.vocab_size, 1000), (micro, seq), generator=gen)[rank * rows:(rank + 1) * rows].to(device)
            loss = peft_model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            all_reduce_grads(params)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        if use_cuda:
            torch.cuda.synchronize(device)
        dist.barrier()
        now = time.perf_counter()
        completion.append(now - start)
        if t_steady is not None:
            steady.append((steps - spec["warmup"]) * micro * seq / (now - t_steady))
        del opt
        # the job just trained moved its B away from zero; the next one is untouched
        # (checked off the clock)
        t_check = time.perf_counter()
        nxt = names[j + 1] if j + 1 < n_jobs else None
        check = {"trained_B_abs": b_abs(name), "next_B_abs": b_abs(nxt) if nxt else 0.0}
        replicas: list[Any] = [None] * world
        dist.all_gather_object(replicas, check["trained_B_abs"])
        check["replicas_agree"] = max(replicas) - min(replicas) <= 1e-6 * max(1.0, max(replicas))
        checks.append(check)
        dist.barrier()
        start += time.perf_counter() - t_check
    total = completion[-1]
    peaks: list[Any] = [None] * world
    dist.all_gather_object(peaks, peak_bytes(device))
    if rank == 0:
        tokens = n_jobs * steps * micro * seq
        result = {"completion_s": completion, "total_s": total, "tokens": tokens, "tokens_per_s": tokens / total,
                  "steady_tokens_per_s": statistics.mean(steady) if steady else None,
                  "peak_memory_bytes": peaks, "rows_per_rank": rows, "adapter_checks": checks,
                  "final_loss": float(loss.detach())}
        Path(spec["result"]).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


WORKERS = {"write-model": worker_write_model, "mlora": worker_mlora, "fsdp": worker_fsdp}


def main(argv: list[str] | None = None) -> None:
    kind, spec = argv or sys.argv[1:]
    WORKERS[kind](json.loads(Path(spec).read_text()))


if __name__ == "__main__":
    main()
