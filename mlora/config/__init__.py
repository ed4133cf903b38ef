"""Run files: schema, loading, overrides and validation (no torch)."""

from mlora.config.load import ConfigError, apply_overrides, load_run_file, parse_run
from mlora.config.schema import ALL_TARGET_MODULES, JobSpec, ModelSpec, RunLimits, RunSpec

__all__ = [
    "ALL_TARGET_MODULES",
    "ConfigError",
    "JobSpec",
    "ModelSpec",
    "RunLimits",
    "RunSpec",
    "apply_overrides",
    "load_run_file",
    "parse_run",
]
