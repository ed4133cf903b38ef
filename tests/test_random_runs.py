"""Random run files (tests/random_runs.py draws them; run it for many more seeds, and
pipelines): the jobs trained together give each job the adapter it gets alone
(invariant 1), and a run stopped after a few batches and resumed gives the same adapters."""

from __future__ import annotations

import pytest

from random_runs import check_single_process, random_case


@pytest.mark.parametrize("seed", [1, 2, 5, 19, 28, 35])  # 2, 5, 19, 28, 35 with a MeteoRA job
def test_random_run_files_keep_each_jobs_adapter(tmp_path, tiny_models, seed):
    jobs, run, arch, rng = random_case(seed, tmp_path, sorted(tiny_models))
    _, bad = check_single_process(tmp_path, tiny_models[arch], jobs, run, rng)
    assert not bad, (jobs, run, bad)
