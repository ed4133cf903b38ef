"""PEFT is the interchange format: adapter_config.json + adapter_model.safetensors.

Keys are PEFT's: `base_model.model.<module path>.lora_A.weight` ([r, d_in]) and
`.lora_B.weight` ([d_out, r]), so `peft.PeftModel.from_pretrained` loads what we write
with no missing or unexpected keys, and `init_from` reads what PEFT writes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from mlora.model.layout import parse_linear_path

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


class AdapterError(ValueError):
    """An adapter folder that cannot be read or does not fit the job."""


@dataclass(frozen=True)
class AdapterMeta:
    """The LoRA hyper-parameters an adapter folder records."""

    r: int
    alpha: float
    dropout: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    base_model: str


def peft_key(path: str, which: str) -> str:
    """'model.layers.0.self_attn.q_proj', 'A' → PEFT's saved key."""
    return f"{PREFIX}{path}.lora_{which}.weight"


def save_adapter(
    folder: Path,
    meta: AdapterMeta,
    weights: dict[str, tuple[Tensor, Tensor]],
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write PEFT's two files into `folder` (created if needed), each atomically.

    `weights` maps module path → (A [r, d_in], B [d_out, r]). Refuses to replace an
    adapter already in the folder: the caller decides what may be overwritten.
    """
    from peft import LoraConfig  # heavy import, only when saving

    folder = Path(folder)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if (folder / name).exists():
            raise AdapterError(f"{folder / name}: already exists; not overwriting an adapter")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".adapter-", dir=folder))
    try:
        config = LoraConfig(
            r=meta.r,
            lora_alpha=meta.alpha,
            lora_dropout=meta.dropout,
            use_rslora=meta.use_rslora,
            target_modules=sorted(meta.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
            base_model_name_or_path=meta.base_model,
            inference_mode=True,
        )
        config.save_pretrained(str(tmp))
        tensors: dict[str, Tensor] = {}
        for path, (a, b) in sorted(weights.items()):
            tensors[peft_key(path, "A")] = a.detach().to("cpu", dtype).contiguous()
            tensors[peft_key(path, "B")] = b.detach().to("cpu", dtype).contiguous()
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        os.replace(tmp / WEIGHTS_FILE, folder / WEIGHTS_FILE)
        os.replace(tmp / CONFIG_FILE, folder / CONFIG_FILE)  # last: its presence means complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def read_adapter_meta(folder: Path) -> AdapterMeta:
    """Read and check adapter_config.json of a PEFT LoRA folder."""
    folder = Path(folder)
    cfg_file = folder / CONFIG_FILE
    if not cfg_file.is_file():
        raise AdapterError(f"{folder}: no {CONFIG_FILE} (not a PEFT adapter folder)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{cfg_file}: not valid JSON: {exc}") from exc
    if cfg.get("peft_type") != "LORA":
        raise AdapterError(f"{cfg_file}: peft_type {cfg.get('peft_type')!r} is not LORA")
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        raise AdapterError(f"{cfg_file}: target_modules as a regex is not supported; list the module names")
    return AdapterMeta(
        r=int(cfg["r"]),
        alpha=float(cfg["lora_alpha"]),
        dropout=float(cfg.get("lora_dropout", 0.0)),
        use_rslora=bool(cfg.get("use_rslora", False)),
        target_modules=tuple(sorted(targets)),
        base_model=str(cfg.get("base_model_name_or_path") or ""),
    )


def load_adapter(folder: Path) -> tuple[AdapterMeta, dict[str, tuple[Tensor, Tensor]]]:
    """Read a PEFT LoRA folder: its meta and module path → (A, B) in fp32."""
    folder = Path(folder)
    meta = read_adapter_meta(folder)
    weights_file = folder / WEIGHTS_FILE
    if not weights_file.is_file():
        raise AdapterError(f"{folder}: no {WEIGHTS_FILE}")
    raw = load_file(str(weights_file))
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, tensor in raw.items():
        if not key.startswith(PREFIX) or not (key.endswith(".lora_A.weight") or key.endswith(".lora_B.weight")):
            raise AdapterError(f"{weights_file}: unexpected key {key!r}")
        path = key[len(PREFIX) : -len(".lora_A.weight")]
        path = path.replace(".default", "")  # some writers keep the adapter name
        try:
            parse_linear_path(path)
        except ValueError as exc:
            raise AdapterError(f"{weights_file}: {exc}") from exc
        pairs.setdefault(path, {})[key[-len("A.weight") :][0]] = tensor.float()
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for path, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{weights_file}: {path} lacks lora_A or lora_B")
        out[path] = (ab["A"], ab["B"])
    return meta, out
