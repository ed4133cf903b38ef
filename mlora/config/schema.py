"""The run file's schema: plain dataclasses, field names as LLaMA-Factory / axolotl spell them.

A run file has four sections: `model` (the frozen base), `defaults` (job fields every
job inherits), `jobs` (the list) and `run` (run-wide limits and output). Nothing here
imports torch: a file is checked before anything heavy is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ALL_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPES = ("float32", "bfloat16", "float16")
OPTIMIZERS = ("adamw", "sgd")
LR_SCHEDULERS = ("constant", "linear", "cosine")
DATASET_FORMATS = ("auto", "alpaca", "messages", "sharegpt")
JOB_KINDS = ("lora", "meteora")


@dataclass(frozen=True)
class ModelSpec:
    """The frozen base model: a local Hugging Face folder of the Llama layout."""

    path: str
    dtype: str = "float32"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    attn_implementation: str = "sdpa"


@dataclass(frozen=True)
class JobSpec:
    """One job: a LoRA to fine-tune (`kind: lora`) or a MeteoRA mixture (`kind: meteora`).

    Every field but name and a dataset has a default. A MeteoRA job reads `adapters`,
    `top_k`, `temperature`, `gate_loss_coef`, `train_loras` and optionally `datasets`;
    the lora_* fields and target_modules do not apply to it (its adapters fix them).
    """

    name: str
    # a file, or a list of files read as one; a MeteoRA job may give `datasets` instead
    dataset: str | tuple[str, ...] | None = None
    kind: str = "lora"
    dataset_format: str = "auto"
    template: str = "alpaca"
    cutoff_len: int = 256
    eval_split: float = 0.0  # fraction in (0, 1) or a whole number of records
    eval_steps: int | None = None  # evaluate every N steps (and at the end if eval_split)
    # adapter
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    use_rslora: bool = False
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    init_from: str | None = None  # an existing PEFT adapter folder to start from
    # optimisation
    optimizer: str = "adamw"
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    momentum: float = 0.0  # SGD only
    max_grad_norm: float | None = 1.0
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    num_epochs: int = 1
    max_steps: int | None = None  # overrides num_epochs when set
    micro_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    save_steps: int | None = None  # checkpoint every N optimizer steps
    save_total_limit: int | None = None  # keep only the newest N checkpoints (older ones are deleted)
    seed: int = 42
    # MeteoRA (kind: meteora)
    adapters: tuple[str, ...] = ()  # PEFT folders, or names of LoRA jobs of this run
    datasets: dict[str, str] | None = None  # adapter name or index -> file of that task's records
    top_k: int = 2
    temperature: float = 1.0
    gate_loss_coef: float = 50.0  # as MeteoRA's released training code
    train_loras: bool = False  # train the K adapters too, not only the gates

    @property
    def dataset_files(self) -> tuple[str, ...]:
        """`dataset` as a tuple of paths, whichever way it was written (none, one, a list)."""
        if self.dataset is None:
            return ()
        return (self.dataset,) if isinstance(self.dataset, str) else self.dataset


@dataclass(frozen=True)
class RunLimits:
    """Run-wide settings: where outputs go and how much runs at once."""

    output_dir: str = "out/run"
    max_concurrent_jobs: int = 8
    max_tokens_per_batch: int = 8192  # tokens (rows × padded length) per fused batch
    backend: str = "auto"  # multi-LoRA operator backend: auto | torch | triton
    pad_to_multiple_of: int = 1  # round each fused batch's padded length up (recurring shapes for CUDA graphs)
    cuda_graphs: bool = True  # replay each recurring fused-batch shape as one CUDA graph (CUDA only)
    gradient_checkpointing: bool = False  # recompute each block in the backward: less activation memory
    log_every_s: float = 5.0  # plain-log cadence when stdout is not a terminal
    name: str | None = None
    # pipeline runs (torchrun with several processes)
    layers_per_stage: tuple[float, ...] | None = None  # explicit split (8.5: 8 blocks + an attention); default balances cost
    pipeline_groups: int | None = None  # job groups interleaving through the stages; default P
    pipeline_timeout_s: float = 300.0  # a peer silent this long is declared lost


@dataclass(frozen=True)
class RunSpec:
    """A validated run file."""

    source: str  # the file it came from (for messages)
    model: ModelSpec
    jobs: tuple[JobSpec, ...]
    run: RunLimits = field(default_factory=RunLimits)

