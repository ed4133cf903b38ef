"""Jobs: plans of steps, progress, per-stage optimizers and LR schedules."""

from mlora.jobs.job import JobState, PendingMicro, target_count
from mlora.jobs.lr import lr_factor
from mlora.jobs.optim import JobOptimizer, build_optimizer
from mlora.jobs.plan import StepPlan, plan_steps

__all__ = ["JobOptimizer", "JobState", "PendingMicro", "StepPlan", "build_optimizer", "lr_factor", "plan_steps", "target_count"]
