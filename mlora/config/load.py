"""Reading a run file: YAML → overrides → defaults merged into jobs → typed, checked RunSpec.

Every error is a ConfigError whose message names the file, the job and the field, so a
user can fix a 40-job file without guessing. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

import yaml

from mlora.config.schema import (
    ALL_TARGET_MODULES,
    DATASET_FORMATS,
    DTYPES,
    JOB_KINDS,
    LR_SCHEDULERS,
    OPTIMIZERS,
    JobSpec,
    ModelSpec,
    RunLimits,
    RunSpec,
)
from mlora.config.sweep import SweepError, expand_sweep

SECTIONS = ("model", "defaults", "jobs", "run")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# The run folder's own entries beside the jobs' folders (runtime.output's SUMMARY,
# monitor.metrics.TB_DIR, monitor.report.REPORT, the pipeline's trace, `mlora eval`'s
# default folder): a job of one of these names would write into or over them.
RESERVED_NAMES = ("run_summary.json", "tensorboard", "report.png", "trace.json", "eval")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class ConfigError(ValueError):
    """A run file that cannot be trained, with the place to fix it in the message."""


def load_run_file(path: str | Path, overrides: Sequence[str] = (), check_paths: bool = True) -> RunSpec:
    """Read, override, merge and validate a run file; raise ConfigError on any problem."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise ConfigError(f"{source}: run file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a run file is a mapping with sections {', '.join(SECTIONS)}")
    raw = apply_overrides(raw, overrides, source)
    return parse_run(raw, source, check_paths=check_paths)


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str], source: str) -> dict[str, Any]:
    """Apply `key=value` overrides (value parsed as YAML) and return a new mapping.

    Keys are dotted paths: `run.output_dir=out/x`, `defaults.learning_rate=1e-3`,
    `jobs.sum.lora_r=16` (a job by name or index). A bare job field (`learning_rate=…`)
    goes to `defaults`, a bare run field (`output_dir=…`) to `run`.
    """
    out: dict[str, Any] = _deep_copy(dict(raw))
    job_fields = {f.name for f in dataclasses.fields(JobSpec)}
    run_fields = {f.name for f in dataclasses.fields(RunLimits)}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source}: override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        value = yaml.safe_load(text) if text else ""
        parts = key.strip().split(".")
        if len(parts) == 1 and parts[0] in run_fields:
            parts = ["run", *parts]
        elif len(parts) == 1 and parts[0] in job_fields:
            parts = ["defaults", *parts]
        if parts[0] not in SECTIONS:
            raise ConfigError(f"{source}: override {key!r}: unknown section {parts[0]!r}")
        _set_path(out, parts, value, source, key)
    return out


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def _set_path(root: dict[str, Any], parts: list[str], value: Any, source: str, key: str) -> None:
    node: Any = root
    for part in parts[:-1]:
        if isinstance(node, list):
            node = node[_job_index(node, part, source, key)]
            continue
        if part not in node or node[part] is None:
            node[part] = [] if part == "jobs" else {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        raise ConfigError(f"{source}: override {key!r} must name a field of a job")
    node[last] = value


def _job_index(jobs: list[Any], ref: str, source: str, key: str) -> int:
    if ref.isdigit() and int(ref) < len(jobs):
        return int(ref)
    for i, job in enumerate(jobs):
        if isinstance(job, dict) and job.get("name") == ref:
            return i
    swept = [job["name"] for job in jobs if isinstance(job, dict) and "sweep" in job and "name" in job]
    hint = f" (a sweep's jobs are named once it expands: address its entry, {swept[0]!r})" if swept else ""
    raise ConfigError(f"{source}: override {key!r}: no job named or numbered {ref!r}{hint}")


def parse_run(raw: Mapping[str, Any], source: str, check_paths: bool = True) -> RunSpec:
    """Turn a raw mapping into a RunSpec, checking every field."""
    _check_keys(raw, SECTIONS, source, "top level")
    if "model" not in raw:
        raise ConfigError(f"{source}: model: missing (the base model section, with at least `path`)")
    model_raw = raw["model"]
    if isinstance(model_raw, str):
        model_raw = {"path": model_raw}
    model = _build(ModelSpec, model_raw, source, "model")
    _check_model(model, source, check_paths)

    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"{source}: defaults: must be a mapping of job fields")
    _check_keys(defaults, [f.name for f in dataclasses.fields(JobSpec)], source, "defaults")

    jobs_raw = raw.get("jobs")
    if not isinstance(jobs_raw, list) or not jobs_raw:
        raise ConfigError(f"{source}: jobs: must be a non-empty list of jobs")
    jobs: list[JobSpec] = []
    labels: dict[str, str] = {}
    seen: set[str] = set()
    job_fields = [f.name for f in dataclasses.fields(JobSpec)]
    for i, entry in enumerate(jobs_raw):
        if not isinstance(entry, dict):
            raise ConfigError(f"{source}: jobs[{i}]: must be a mapping of job fields")
        where = f"jobs[{i}]" + (f" ({entry['name']!r})" if "name" in entry else "")
        try:
            expanded = expand_sweep(entry, where, job_fields)
        except SweepError as exc:
            raise ConfigError(f"{source}: {exc}") from exc
        for job_raw, label in expanded:
            merged = {**defaults, **job_raw}
            job = _build(JobSpec, merged, source, label)
            job = _check_job(job, source, label, check_paths, explicit=set(job_raw))
            if job.name.lower() in seen:  # folders: some file systems ignore case
                raise ConfigError(f"{source}: {label}: name: {job.name!r} is used by another job (names differing "
                                  "only in case count as one: they name one folder on some file systems)")
            seen.add(job.name.lower())
            jobs.append(job)
            labels[job.name] = label
    for job in jobs:
        if job.kind == "meteora":
            _check_meteora_adapters(job, jobs, source, labels[job.name], check_paths)

    run = _build(RunLimits, raw.get("run") or {}, source, "run")
    _check_run(run, source)
    return RunSpec(source=source, model=model, jobs=tuple(jobs), run=run)


def _check_keys(raw: Mapping[str, Any], allowed: Sequence[str], source: str, where: str) -> None:
    for key in raw:
        if key not in allowed:
            hint = difflib.get_close_matches(str(key), allowed, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(f"{source}: {where}: unknown field {key!r}{extra}")


def _build(cls: type, raw: Mapping[str, Any], source: str, where: str) -> Any:
    """Instantiate a schema dataclass, coercing and type-checking each field."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: {where}: must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _check_keys(raw, list(fields), source, where)
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
                raise ConfigError(f"{source}: {where}: {name}: missing (required)")
            continue
        values[name] = _coerce(raw[name], str(f.type), source, f"{where}: {name}")
    return cls(**values)


def _coerce(value: Any, type_name: str, source: str, where: str) -> Any:
    optional = "None" in type_name
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: {where}: must not be empty")
    base = type_name.replace(" | None", "")
    if base == "bool":
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {where}: must be true or false, got {value!r}")
    if base == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {where}: must be a whole number, got {value!r}")
    if base == "float":
        # YAML 1.1 reads `1e-3` (no dot) as a string: accept it as the number it means.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{source}: {where}: must be a number, got {value!r}")
    if base == "str":
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{source}: {where}: must be a string, got {value!r}")
    if base == "str | tuple[str, ...]":  # one path, or a non-empty list of them
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return value[0] if len(value) == 1 else tuple(value)
        raise ConfigError(f"{source}: {where}: must be a file path or a non-empty list of them, got {value!r}")
    if base.startswith("dict[str, str]"):
        ok = isinstance(value, Mapping) and value and all(
            isinstance(k, (str, int)) and not isinstance(k, bool) and isinstance(v, str) for k, v in value.items()
        )
        if ok:
            return {str(k): v for k, v in value.items()}
        raise ConfigError(f"{source}: {where}: must be a mapping of names to file paths, got {value!r}")
    if base.startswith("tuple[int"):
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return tuple(value)
        raise ConfigError(f"{source}: {where}: must be a list of whole numbers, got {value!r}")
    if base.startswith("tuple[float"):
        if isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return tuple(value)
        raise ConfigError(f"{source}: {where}: must be a list of numbers, got {value!r}")
    if base.startswith("tuple[str"):
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(f"{source}: {where}: must be a list of names, got {value!r}")
    raise ConfigError(f"{source}: {where}: unsupported type {type_name}")  # schema bug


def _check_model(model: ModelSpec, source: str, check_paths: bool) -> None:
    if model.dtype not in DTYPES:
        raise ConfigError(f"{source}: model: dtype: {model.dtype!r} is not one of {', '.join(DTYPES)}")
    if not _DEVICE_RE.match(model.device):
        raise ConfigError(f"{source}: model: device: {model.device!r} is not auto, cpu, cuda or cuda:N")
    if model.attn_implementation not in ("sdpa", "eager"):
        raise ConfigError(f"{source}: model: attn_implementation: use sdpa or eager, got {model.attn_implementation!r}")
    if check_paths:
        folder = Path(model.path)
        if not folder.is_dir():
            raise ConfigError(f"{source}: model: path: {model.path!r} is not a folder")
        if not (folder / "config.json").is_file():
            raise ConfigError(f"{source}: model: path: {model.path!r} has no config.json (not a Hugging Face model folder)")


METEORA_FIELDS = ("adapters", "datasets", "top_k", "temperature", "gate_loss_coef", "train_loras")


def _check_job(job: JobSpec, source: str, where: str, check_paths: bool, explicit: Collection[str] = ()) -> JobSpec:
    """Check a job's values; return it with `target_modules: all` spelled out.

    `explicit` are the fields the job itself sets (not inherited from defaults): a
    MeteoRA-only field set on a LoRA job, eval_steps on a job without an eval split or
    save_total_limit on one without save_steps,
    is a mistake worth naming (from defaults it may simply not apply to this job).
    """
    def fail(field_name: str, why: str) -> None:
        raise ConfigError(f"{source}: {where}: {field_name}: {why}")

    if not _NAME_RE.match(job.name):
        fail("name", f"{job.name!r} must be letters, digits, '_', '-' or '.', starting with a letter or digit")
    if job.name.lower() in RESERVED_NAMES:  # lower: some file systems ignore case
        fail("name", f"{job.name!r} is taken by the run folder's own {job.name.lower()!r}; choose another "
                     f"(reserved: {', '.join(RESERVED_NAMES)})")
    if job.kind not in JOB_KINDS:
        fail("kind", f"{job.kind!r} is not one of {', '.join(JOB_KINDS)}")
    if job.kind == "meteora":
        _check_meteora_fields(job, fail)
    else:
        for name in METEORA_FIELDS:
            if name in explicit:
                fail(name, "only applies to jobs of kind: meteora")
        if job.dataset is None:
            fail("dataset", "missing (required): the file of the job's training records")
    for name, path in _dataset_files(job):
        if check_paths and not Path(path).is_file():
            fail(name, f"file {path!r} not found")
    if job.dataset_format not in DATASET_FORMATS:
        fail("dataset_format", f"{job.dataset_format!r} is not one of {', '.join(DATASET_FORMATS)}")
    _check_template(job.template, fail)
    if job.cutoff_len < 2:
        fail("cutoff_len", f"must be at least 2, got {job.cutoff_len}")
    if job.eval_split < 0 or (job.eval_split >= 1 and job.eval_split != int(job.eval_split)):
        fail("eval_split", f"must be a fraction in [0, 1) or a whole number of records, got {job.eval_split}")
    for name in ("lora_r", "num_epochs", "micro_batch_size", "gradient_accumulation_steps"):
        if getattr(job, name) < 1:
            fail(name, f"must be a positive whole number, got {getattr(job, name)}")
    for name in ("max_steps", "save_steps", "eval_steps", "save_total_limit"):
        value = getattr(job, name)
        if value is not None and value < 1:
            fail(name, f"must be a positive whole number or empty, got {value}")
    if "eval_steps" in explicit and job.eval_steps is not None and job.eval_split == 0:
        fail("eval_steps", "evaluates the job's held-out records, and it holds none (eval_split is 0): "
                           "set eval_split to a fraction or a number of records")
    if "save_total_limit" in explicit and job.save_total_limit is not None and job.save_steps is None:
        fail("save_total_limit", "keeps the job's newest checkpoints, and it writes none (save_steps is not set): "
                                 "set save_steps too")
    if job.lora_alpha <= 0:
        fail("lora_alpha", f"must be positive, got {job.lora_alpha}")
    if not 0.0 <= job.lora_dropout < 1.0:
        fail("lora_dropout", f"must be in [0, 1), got {job.lora_dropout}")
    targets = ALL_TARGET_MODULES if job.target_modules in (("all",), ("all-linear",)) else job.target_modules
    if not targets:
        fail("target_modules", "must name at least one module")
    for t in targets:
        if t not in ALL_TARGET_MODULES:
            fail("target_modules", f"{t!r} is not one of {', '.join(ALL_TARGET_MODULES)} (or 'all')")
    if len(set(targets)) != len(targets):
        fail("target_modules", "names a module twice")
    if check_paths and job.init_from is not None and not (Path(job.init_from) / "adapter_config.json").is_file():
        fail("init_from", f"{job.init_from!r} is not a PEFT adapter folder (no adapter_config.json)")
    if job.optimizer not in OPTIMIZERS:
        fail("optimizer", f"{job.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if job.learning_rate <= 0:
        fail("learning_rate", f"must be positive, got {job.learning_rate}")
    if job.weight_decay < 0:
        fail("weight_decay", f"must be >= 0, got {job.weight_decay}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(job, name) < 1.0:
            fail(name, f"must be in [0, 1), got {getattr(job, name)}")
    if job.adam_epsilon <= 0:
        fail("adam_epsilon", f"must be positive, got {job.adam_epsilon}")
    if job.momentum < 0:
        fail("momentum", f"must be >= 0, got {job.momentum}")
    if job.max_grad_norm is not None and job.max_grad_norm <= 0:
        fail("max_grad_norm", f"must be positive or empty (no clipping), got {job.max_grad_norm}")
    if job.lr_scheduler not in LR_SCHEDULERS:
        fail("lr_scheduler", f"{job.lr_scheduler!r} is not one of {', '.join(LR_SCHEDULERS)}")
    if job.warmup_steps < 0:
        fail("warmup_steps", f"must be >= 0, got {job.warmup_steps}")
    return dataclasses.replace(job, target_modules=tuple(targets))


def _dataset_files(job: JobSpec) -> list[tuple[str, str]]:
    """(field for messages, path) of every dataset file a job reads."""
    listed = isinstance(job.dataset, tuple)
    files = [(f"dataset[{i}]" if listed else "dataset", path) for i, path in enumerate(job.dataset_files)]
    return files + [(f"datasets: {key}", path) for key, path in (job.datasets or {}).items()]


def _check_meteora_fields(job: JobSpec, fail: Any) -> None:
    """What a MeteoRA job needs that a run file can get wrong on its own."""
    if not job.adapters:
        fail("adapters", "a meteora job needs at least one adapter (PEFT folders or LoRA job names of this run)")
    if len(set(job.adapters)) != len(job.adapters):
        fail("adapters", "names an adapter twice")
    if not 1 <= job.top_k <= len(job.adapters):
        fail("top_k", f"must be in 1..{len(job.adapters)} (the number of adapters), got {job.top_k}")
    if job.temperature <= 0:
        fail("temperature", f"must be positive, got {job.temperature}")
    if job.gate_loss_coef < 0:
        fail("gate_loss_coef", f"must be >= 0, got {job.gate_loss_coef}")
    if (job.dataset is None) == (job.datasets is None):
        fail("dataset", "give either `dataset` (records with a `task` field) or `datasets` (adapter -> file), not both"
             if job.dataset is not None else "missing: give `dataset` (records with a `task` field) or `datasets` (adapter -> file)")
    for key in job.datasets or {}:
        if task_index(key, job.adapters) is None:
            fail(f"datasets: {key}", f"is neither an adapter of this job ({', '.join(job.adapters)}) nor an index 0..{len(job.adapters) - 1}")


def task_index(key: str | int, adapters: Sequence[str]) -> int | None:
    """An adapter's index from how the job lists it, its name, or its number."""
    labels = [adapter_label(a) for a in adapters]
    for names in (list(adapters), labels):
        if isinstance(key, str) and key in names:
            return names.index(key)
    text = str(key)
    if text.isdigit() and int(text) < len(adapters):
        return int(text)
    return None


def adapter_label(ref: str) -> str:
    """The name an adapter goes by in a MeteoRA job: a job's name, or a folder's last part."""
    return Path(ref).name or ref


def _check_meteora_adapters(job: JobSpec, jobs: Sequence[JobSpec], source: str, where: str, check_paths: bool) -> None:
    """Each adapter is a LoRA job of this run or a PEFT folder; run jobs must share targets."""
    by_name = {j.name: j for j in jobs}
    targets: dict[str, tuple[str, ...]] = {}
    for ref in job.adapters:
        dep = by_name.get(ref)
        if dep is not None:
            if dep.kind != "lora":
                raise ConfigError(f"{source}: {where}: adapters: {ref!r} is a {dep.kind} job; only LoRA jobs can be mixed")
            targets[ref] = tuple(sorted(dep.target_modules))
        elif check_paths and not (Path(ref) / "adapter_config.json").is_file():
            raise ConfigError(
                f"{source}: {where}: adapters: {ref!r} is neither a job of this run nor a PEFT adapter folder (no adapter_config.json)"
            )
    if len(set(targets.values())) > 1:
        listed = "; ".join(f"{k}: {','.join(v)}" for k, v in targets.items())
        raise ConfigError(f"{source}: {where}: adapters: the LoRA jobs must adapt the same modules ({listed})")
    labels = [adapter_label(r) for r in job.adapters]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{source}: {where}: adapters: two adapters share the name {labels}; rename a folder")


def _check_template(template: str, fail: Any) -> None:
    from mlora.data.templates import TEMPLATES  # torch-free

    if template not in TEMPLATES:
        fail("template", f"{template!r} is not one of {', '.join(sorted(TEMPLATES))}")


def _check_run(run: RunLimits, source: str) -> None:
    if run.max_concurrent_jobs < 1:
        raise ConfigError(f"{source}: run: max_concurrent_jobs: must be at least 1, got {run.max_concurrent_jobs}")
    if run.max_tokens_per_batch < 1:
        raise ConfigError(f"{source}: run: max_tokens_per_batch: must be at least 1, got {run.max_tokens_per_batch}")
    if run.backend not in ("auto", "torch", "triton"):
        raise ConfigError(f"{source}: run: backend: {run.backend!r} is not auto, torch or triton")
    if run.pad_to_multiple_of < 1:
        raise ConfigError(f"{source}: run: pad_to_multiple_of: must be at least 1, got {run.pad_to_multiple_of}")
    if run.log_every_s <= 0:
        raise ConfigError(f"{source}: run: log_every_s: must be positive, got {run.log_every_s}")
    if run.pipeline_timeout_s <= 0:
        raise ConfigError(f"{source}: run: pipeline_timeout_s: must be positive, got {run.pipeline_timeout_s}")
    if run.pipeline_groups is not None and run.pipeline_groups < 1:
        raise ConfigError(f"{source}: run: pipeline_groups: must be at least 1, got {run.pipeline_groups}")
    if run.layers_per_stage is not None and any(n < 0.5 or 2 * n != int(2 * n) for n in run.layers_per_stage):
        raise ConfigError(f"{source}: run: layers_per_stage: each stage holds a positive number of blocks in halves "
                          f"(8, 8.5: a block's attention, its MLP on the next stage), got {list(run.layers_per_stage)}")
