"""One stage's MeteoRA adapter: K trained LoRA adapters and a top-k gate per linear.

A MeteoraAdapter is to a MeteoRA job what a StageAdapter is to a LoRA job: the weights
of the linears one stage holds. The K adapters come from PEFT folders (frozen unless
train_loras); the gates are fp32 Parameters [K, d_in], one per adapted linear. The
multi-LoRA linear calls `delta(path, x_flat)` for the job's token segment; the trainer
takes the recorded gate logits with `take_gate_logits()` for the auxiliary loss.

Gates start as N(0, 0.01²), drawn per (seed, path) so a job's initial gate does not
depend on the stage split. Not zeros: zero logits tie, and top-k breaks ties by index,
so every token of the first steps would route to adapters 0 and 1 and only those two
would get LM-loss signal; small random logits spread the first choices over all K
while keeping the softmax weights near uniform. The auxiliary loss, which reaches all
K logits, trains the gate from either start.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mlora.meteora.gate import route
from mlora.meteora.op import BACKENDS, meteora_delta
from mlora.model.layout import parse_linear_path
from mlora.model.lora_linear import lora_scale
from mlora.model.peft_io import AdapterMeta, load_adapter, save_adapter

CONFIG_FILE = "meteora_config.json"
GATES_FILE = "gates.safetensors"
GATE_SUFFIX = ".gate.weight"
GATE_INITS = ("normal", "zeros")
GATE_STD = 0.01


class MeteoraError(ValueError):
    """A MeteoRA folder, or a set of adapters, that cannot make a MeteoRA model."""


@dataclass(frozen=True)
class MeteoraConfig:
    """What meteora_config.json records: enough to rebuild the model with `load`."""

    adapters: tuple[tuple[str, str], ...]  # (name, folder); a relative folder is relative to the MeteoRA folder
    top_k: int
    temperature: float
    target_modules: tuple[str, ...]
    base_model: str
    train_loras: bool = False

    @property
    def n_adapters(self) -> int:
        return len(self.adapters)

    def to_json(self) -> str:
        return json.dumps({
            "format": "meteora",
            "num_adapters": self.n_adapters,
            "top_k": self.top_k,
            "temperature": self.temperature,
            "adapters": [{"name": n, "folder": f} for n, f in self.adapters],
            "target_modules": list(self.target_modules),
            "base_model": self.base_model,
            "train_loras": self.train_loras,
        }, indent=2) + "\n"

    @classmethod
    def read(cls, folder: Path) -> "MeteoraConfig":
        file = Path(folder) / CONFIG_FILE
        if not file.is_file():
            raise MeteoraError(f"{folder}: no {CONFIG_FILE} (not a MeteoRA folder)")
        try:
            raw = json.loads(file.read_text())
            adapters = tuple((str(a["name"]), str(a["folder"])) for a in raw["adapters"])
            config = cls(adapters, int(raw["top_k"]), float(raw["temperature"]), tuple(raw["target_modules"]),
                         str(raw.get("base_model", "")), bool(raw.get("train_loras", False)))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise MeteoraError(f"{file}: not a valid MeteoRA config: {exc!r}") from exc
        if raw.get("num_adapters", len(adapters)) != len(adapters):
            raise MeteoraError(f"{file}: num_adapters={raw['num_adapters']} but {len(adapters)} adapters are listed")
        check_hyper(config.n_adapters, config.top_k, config.temperature, str(file))
        return config


def check_hyper(n_adapters: int, top_k: int, temperature: float, where: str) -> None:
    """Refuse a routing that cannot work, naming where it came from."""
    if n_adapters < 1:
        raise MeteoraError(f"{where}: MeteoRA needs at least one adapter")
    if not 1 <= top_k <= n_adapters:
        raise MeteoraError(f"{where}: top_k={top_k} must be in 1..{n_adapters} (the number of adapters)")
    if temperature <= 0:
        raise MeteoraError(f"{where}: temperature must be > 0, got {temperature}")


def linear_shapes(model: nn.Module) -> tuple[dict[str, tuple[int, int]], int]:
    """(d_in, d_out) of every adapted-linear position a model holds, and its layer count.

    Works on a mlora StageModel (its multi-LoRA linears) and on a plain Hugging Face
    causal LM (its nn.Linear modules at decoder-block target paths).
    """
    lora_linears = getattr(model, "lora_linears", None)
    if isinstance(lora_linears, dict):
        shapes = {p: (m.in_features, m.out_features) for p, m in lora_linears.items()}
    else:
        shapes = {}
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                try:
                    parse_linear_path(name)
                except ValueError:
                    continue
                shapes[name] = (module.in_features, module.out_features)
    return shapes, int(model.config.num_hidden_layers)


def _read_adapters(
    folders: Sequence[Path], shapes: dict[str, tuple[int, int]], n_layers: int | None
) -> tuple[list[AdapterMeta], list[dict[str, tuple[Tensor, Tensor]]]]:
    """Load the K PEFT folders and check they agree with each other and fit the base.

    `shapes` are the linears of this stage; an adapter path in one of the stage's layers
    that the stage lacks, or whose A/B do not match the base linear, is refused.
    """
    metas, weights = [], []
    for folder in folders:
        meta, w = load_adapter(folder)
        metas.append(meta)
        weights.append(w)
    first, first_meta, first_paths = folders[0], metas[0], set(weights[0])
    for folder, meta, w in zip(folders[1:], metas[1:], weights[1:]):
        if meta.target_modules != first_meta.target_modules:
            raise MeteoraError(
                f"{folder}: targets {list(meta.target_modules)} but {first} targets {list(first_meta.target_modules)}; "
                "MeteoRA needs every adapter on the same modules"
            )
        if set(w) != first_paths:
            only = sorted(set(w) ^ first_paths)[:3]
            raise MeteoraError(f"{folder}: adapts other linears than {first} (differ on {only}); MeteoRA needs the same ones")
    stage_layers = {parse_linear_path(p)[0] for p in shapes}
    for folder, meta, w in zip(folders, metas, weights):
        for path, (a, b) in sorted(w.items()):
            layer = parse_linear_path(path)[0]
            if n_layers is not None and layer >= n_layers:
                raise MeteoraError(f"{folder}: adapts {path} but the base model has {n_layers} layers")
            if a.shape[0] != meta.r or b.shape[1] != meta.r:
                raise MeteoraError(f"{folder}: {path} has rank {a.shape[0]}, the config says r={meta.r} (rank_pattern is not supported)")
            if layer not in stage_layers:
                continue
            if path not in shapes:
                raise MeteoraError(f"{folder}: adapts {path}, which the base model does not have")
            d_in, d_out = shapes[path]
            if a.shape[1] != d_in or b.shape[0] != d_out:
                raise MeteoraError(
                    f"{folder}: {path} has A {tuple(a.shape)} and B {tuple(b.shape)}, "
                    f"but the base linear is {d_in}→{d_out}; the adapter was trained on another base"
                )
    return metas, weights


def _unique_names(folders: Sequence[Path], names: Sequence[str] | None) -> list[str]:
    out = list(names) if names is not None else [Path(f).name for f in folders]
    if len(out) != len(folders):
        raise MeteoraError(f"{len(out)} names for {len(folders)} adapter folders")
    if len(set(out)) != len(out):
        raise MeteoraError(f"adapter names must differ, got {out}; pass names=")
    return out


def init_gate(path: str, n_adapters: int, d_in: int, how: str, seed: int) -> Tensor:
    """A gate [K, d_in] in fp32: N(0, 0.01²) from a generator seeded by (seed, path), or zeros."""
    if how == "zeros":
        return torch.zeros(n_adapters, d_in)
    if how != "normal":
        raise MeteoraError(f"gate_init {how!r}: use one of {', '.join(GATE_INITS)}")
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(path.encode()))
    return torch.randn(n_adapters, d_in, generator=gen) * GATE_STD


class MeteoraAdapter:
    """K LoRA adapters and a gate per linear, for the linears one stage holds."""

    def __init__(
        self,
        config: MeteoraConfig,
        metas: Sequence[AdapterMeta],
        lora_a: dict[str, list[Tensor]],
        lora_b: dict[str, list[Tensor]],
        gates: dict[str, nn.Parameter],
        backend: str = "auto",
    ) -> None:
        if backend not in BACKENDS:
            raise MeteoraError(f"unknown MeteoRA backend {backend!r}: use {', '.join(BACKENDS)}")
        self.config, self.metas = config, list(metas)
        self.scales = [lora_scale(m.r, m.alpha, m.use_rslora) for m in metas]
        self.lora_a, self.lora_b, self.gates = lora_a, lora_b, gates
        self.backend = backend
        self.record_gate_logits = True  # off for generation, where nobody takes them
        self.trace = False  # keep each linear's last routing in last_idx (generation traces)
        self.last_idx: dict[str, Tensor] = {}
        self._gate_logits: list[Tensor] = []

    @property
    def n_adapters(self) -> int:
        return self.config.n_adapters

    @property
    def top_k(self) -> int:
        return self.config.top_k

    @property
    def temperature(self) -> float:
        return self.config.temperature

    @property
    def paths(self) -> list[str]:
        return sorted(self.gates)

    @classmethod
    def from_adapters(
        cls,
        folders: Sequence[str | Path],
        shapes: dict[str, tuple[int, int]],
        *,
        names: Sequence[str] | None = None,
        n_layers: int | None = None,
        **options: Any,
    ) -> "MeteoraAdapter":
        """A new MeteoRA adapter over K PEFT folders, gates freshly initialised.

        `shapes` maps each adapted-linear position of this stage to (d_in, d_out): pass
        every target position the stage holds (`linear_shapes(stage)`), so an adapter
        that needs a linear the base lacks is caught. `n_layers` (the whole model's)
        catches adapters for a deeper model. `options` are `from_weights`' (top_k,
        temperature, train_loras, gate_init, seed, device, backend, base_model).
        """
        folders_p = [Path(f) for f in folders]
        check_hyper(len(folders_p), options.get("top_k", 2), options.get("temperature", 1.0), "MeteoRA adapters")
        adapter_names = _unique_names(folders_p, names)
        metas, weights = _read_adapters(folders_p, shapes, n_layers)
        return cls.from_weights(
            list(zip(adapter_names, (str(f.resolve()) for f in folders_p))), metas, weights, shapes, **options
        )

    @classmethod
    def from_weights(
        cls,
        adapters: Sequence[tuple[str, str]],
        metas: Sequence[AdapterMeta],
        weights: Sequence[dict[str, tuple[Tensor, Tensor]]],
        shapes: dict[str, tuple[int, int]],
        *,
        base_model: str = "",
        top_k: int = 2,
        temperature: float = 1.0,
        train_loras: bool = False,
        gate_init: str = "normal",
        seed: int = 0,
        device: str | torch.device = "cpu",
        backend: str = "auto",
    ) -> "MeteoraAdapter":
        """A new MeteoRA adapter over K adapters already in memory ((name, folder) each).

        A pipeline stage mixes the LoRA jobs it has just trained from its own slices of
        them; `weights[k]` needs only the paths of this stage. Tensors are copied, so
        training the mixture's adapters never changes the originals.
        """
        check_hyper(len(adapters), top_k, temperature, "MeteoRA adapters")
        config = MeteoraConfig(
            adapters=tuple((str(n), str(f)) for n, f in adapters),
            top_k=top_k, temperature=temperature, target_modules=metas[0].target_modules,
            base_model=base_model or metas[0].base_model, train_loras=train_loras,
        )
        device = torch.device(device)
        lora_a: dict[str, list[Tensor]] = {}
        lora_b: dict[str, list[Tensor]] = {}
        gates: dict[str, nn.Parameter] = {}
        for path in sorted(set(weights[0]) & set(shapes)):
            lora_a[path] = [nn.Parameter(w[path][0].detach().to(device, torch.float32, copy=True), requires_grad=train_loras) for w in weights]
            lora_b[path] = [nn.Parameter(w[path][1].detach().to(device, torch.float32, copy=True), requires_grad=train_loras) for w in weights]
            gates[path] = nn.Parameter(init_gate(path, len(adapters), shapes[path][0], gate_init, seed).to(device))
        return cls(config, metas, lora_a, lora_b, gates, backend)

    @classmethod
    def load(
        cls,
        folder: str | Path,
        shapes: dict[str, tuple[int, int]],
        *,
        n_layers: int | None = None,
        device: str | torch.device = "cpu",
        backend: str = "auto",
        train_loras: bool | None = None,
    ) -> "MeteoraAdapter":
        """Rebuild a saved MeteoRA adapter for this stage: its K adapters and trained gates."""
        folder = Path(folder)
        config = MeteoraConfig.read(folder)
        gates_file = folder / GATES_FILE
        if not gates_file.is_file():
            raise MeteoraError(f"{folder}: no {GATES_FILE}")
        adapter_folders = []
        for name, sub in config.adapters:
            path = Path(sub) if Path(sub).is_absolute() else folder / sub
            if not path.is_dir():
                raise MeteoraError(f"{folder / CONFIG_FILE}: adapter {name!r} folder {path} does not exist")
            adapter_folders.append(path)
        adapter = cls.from_adapters(
            adapter_folders, shapes, names=[n for n, _ in config.adapters], n_layers=n_layers,
            base_model=config.base_model, top_k=config.top_k, temperature=config.temperature,
            train_loras=config.train_loras if train_loras is None else train_loras,
            gate_init="zeros", device=device, backend=backend,
        )
        saved = load_file(str(gates_file))
        for path, gate in adapter.gates.items():
            key = path + GATE_SUFFIX
            if key not in saved:
                raise MeteoraError(f"{gates_file}: no gate for {path}")
            if saved[key].shape != gate.shape:
                raise MeteoraError(f"{gates_file}: gate {path} is {tuple(saved[key].shape)}, expected {tuple(gate.shape)}")
            with torch.no_grad():
                gate.copy_(saved[key])
        return adapter

    def parameters(self) -> list[nn.Parameter]:
        """What trains: every gate (sorted paths), then A and B of each adapter if train_loras."""
        out: list[nn.Parameter] = [self.gates[p] for p in self.paths]
        if self.config.train_loras:
            for path in self.paths:
                for a, b in zip(self.lora_a[path], self.lora_b[path]):
                    out.extend((a, b))  # type: ignore[arg-type]
        return out

    def delta(self, path: str, x_flat: Tensor) -> Tensor:
        """The mixture's output delta [T, d_out] for this linear's x [T, d_in].

        Routes every token, applies its top-k adapters, and records the gate logits
        [T, K] for the auxiliary loss (until `take_gate_logits`).
        """
        if path not in self.gates:
            raise KeyError(f"MeteoRA adapter has no gate for {path} (it holds {len(self.gates)} linears)")
        logits, idx, weights = route(x_flat, self.gates[path], self.top_k, self.temperature)
        if self.record_gate_logits:
            self._gate_logits.append(logits)
        if self.trace:
            self.last_idx[path] = idx.detach()
        return meteora_delta(x_flat, self.lora_a[path], self.lora_b[path], self.scales, idx, weights, backend=self.backend)

    def take_gate_logits(self) -> list[Tensor]:
        """The logits recorded since the last call, in call order; the record is cleared."""
        out, self._gate_logits = self._gate_logits, []
        return out

    def gate_state(self) -> dict[str, Tensor]:
        """Gates keyed as in gates.safetensors; stages' dicts merge into the whole model's."""
        return {path + GATE_SUFFIX: self.gates[path].detach() for path in self.paths}

    def save(self, folder: str | Path) -> Path:
        """Write meteora_config.json and gates.safetensors (and, if train_loras, the adapters).

        With train_loras the K adapters changed, so they are written as PEFT folders
        under adapters/<name> and the config points there; otherwise it names the
        original folders.
        """
        folder = Path(folder)
        config = self.config
        loras = None
        if config.train_loras:
            loras = {name: (meta, {p: (self.lora_a[p][i], self.lora_b[p][i]) for p in self.paths})
                     for i, ((name, _), meta) in enumerate(zip(config.adapters, self.metas))}
            config = MeteoraConfig(tuple((n, f"adapters/{n}") for n, _ in config.adapters), config.top_k,
                                   config.temperature, config.target_modules, config.base_model, True)
        return write_meteora(folder, config, self.gate_state(), loras)


def write_meteora(
    folder: Path,
    config: MeteoraConfig,
    gates: dict[str, Tensor],
    loras: dict[str, tuple[AdapterMeta, dict[str, tuple[Tensor, Tensor]]]] | None = None,
) -> Path:
    """Write a MeteoRA folder, the config last (its presence means complete); never overwrite."""
    folder = Path(folder)
    for name in (CONFIG_FILE, GATES_FILE):
        if (folder / name).exists():
            raise MeteoraError(f"{folder / name}: already exists; not overwriting a MeteoRA adapter")
    folder.mkdir(parents=True, exist_ok=True)
    for name, (meta, weights) in (loras or {}).items():
        save_adapter(folder / "adapters" / name, meta, weights)
    tmp = Path(tempfile.mkdtemp(prefix=".meteora-", dir=folder))
    try:
        save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sorted(gates.items())},
                  str(tmp / GATES_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(config.to_json())
        os.replace(tmp / GATES_FILE, folder / GATES_FILE)
        os.replace(tmp / CONFIG_FILE, folder / CONFIG_FILE)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
