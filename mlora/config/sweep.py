"""Sweeps: one entry of a run file's `jobs` that stands for several jobs.

    jobs:
      - name: sql
        dataset: data/sql.jsonl
        sweep: {learning_rate: [1e-4, 3e-4], lora_r: [8, 16]}

is four jobs, `sql-lr0.0001-r8`, `sql-lr0.0001-r16`, `sql-lr0.0003-r8` and
`sql-lr0.0003-r16`: the Cartesian product of the listed values, in the order written,
each job named after its values. Each is then checked like any job, and an error names
the entry and the values (`jobs[0] ('sql-lr0.0001-r-1', sweep lora_r=-1): lora_r: ...`).
Pure: mappings in, mappings out.
"""

from __future__ import annotations

import difflib
import itertools
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

SWEEP = "sweep"
# short labels of the fields swept most, for the jobs' names; other fields go by their own name
SHORT = {
    "learning_rate": "lr", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "weight_decay": "wd",
    "warmup_steps": "warmup", "micro_batch_size": "mbs", "gradient_accumulation_steps": "accum",
    "num_epochs": "epochs", "max_steps": "steps", "seed": "seed", "dataset": "",
}
FIXED = ("name", "kind", SWEEP)  # a job's identity: never swept


class SweepError(ValueError):
    """A `sweep` that cannot be expanded; the message says where and why (without the file)."""


def expand_sweep(job: Mapping[str, Any], where: str, job_fields: Sequence[str]) -> list[tuple[dict[str, Any], str]]:
    """The jobs an entry stands for, each with a label for messages: the entry itself when
    it has no `sweep`, else one job per combination of the swept values."""
    if SWEEP not in job:
        return [(dict(job), where)]
    sweep = job[SWEEP]
    if not isinstance(sweep, Mapping) or not sweep:
        raise SweepError(f"{where}: {SWEEP}: must be a mapping of job fields to lists of values, "
                         "e.g. {learning_rate: [1e-4, 3e-4]}")
    for field, values in sweep.items():
        if field in FIXED:
            raise SweepError(f"{where}: {SWEEP}: {field}: cannot be swept (each job's name is made from its values)")
        if field not in job_fields:
            hint = difflib.get_close_matches(str(field), job_fields, n=1)
            raise SweepError(f"{where}: {SWEEP}: unknown field {field!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        if field in job:
            raise SweepError(f"{where}: {SWEEP}: {field}: also set on the job itself; keep one")
        if not isinstance(values, list) or not values:
            raise SweepError(f"{where}: {SWEEP}: {field}: must be a non-empty list of values, got {values!r}")
    if "name" not in job:
        raise SweepError(f"{where}: name: missing (required: a sweep's jobs are named after it)")
    base = {k: v for k, v in job.items() if k != SWEEP}
    name = str(job["name"])
    out = []
    for combo in itertools.product(*(sweep[f] for f in sweep)):
        values = dict(zip(sweep, combo))
        label = "-".join(f"{SHORT.get(f, f)}{_text(v)}" for f, v in values.items())
        described = ", ".join(f"{f}={v}" for f, v in values.items())
        job_name = f"{name}-{label}"
        out.append(({**base, **values, "name": job_name}, f"{where.split(' (')[0]} ({job_name!r}, sweep {described})"))
    return out


def _text(value: Any) -> str:
    """A swept value as part of a job's name (letters, digits, '_', '-', '.')."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, str) and ("/" in value or "\\" in value):
        text = Path(value).stem  # a dataset: its file's name
    elif isinstance(value, list):
        text = "_".join(_text(v) for v in value)
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)
