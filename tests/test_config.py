"""Run files: defaults, overrides, and a table of broken files with the message each gives."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mlora.config import ConfigError, apply_overrides, load_run_file

GOOD = {
    "model": {"path": "MODEL"},
    "defaults": {"lora_r": 8, "learning_rate": "1e-3", "target_modules": ["q_proj", "v_proj"]},
    "jobs": [
        {"name": "a", "dataset": "DATA"},
        {"name": "b", "dataset": "DATA", "lora_r": 4, "target_modules": "all"},
    ],
    "run": {"output_dir": "OUT", "max_concurrent_jobs": 2},
}


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, str]:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    data = tmp_path / "data.jsonl"
    data.write_text('{"instruction": "x", "output": "y"}\n')
    return {"MODEL": str(model), "DATA": str(data), "OUT": str(tmp_path / "out")}


def write(tmp_path: Path, raw: dict, files: dict[str, str]) -> Path:
    text = yaml.safe_dump(raw)
    for key, value in files.items():
        text = text.replace(key, value)
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults_are_inherited_and_overridden(tmp_path, files):
    spec = load_run_file(write(tmp_path, GOOD, files))
    a, b = spec.jobs
    assert a.lora_r == 8 and b.lora_r == 4
    assert a.learning_rate == pytest.approx(1e-3)  # YAML reads 1e-3 as a string: accepted as a number
    assert a.target_modules == ("q_proj", "v_proj")
    assert b.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert spec.run.max_concurrent_jobs == 2


def test_eval_steps_from_defaults_need_not_apply_to_every_job(tmp_path, files):
    raw = yaml.safe_load(yaml.safe_dump(GOOD))
    raw["defaults"]["eval_steps"] = 10
    raw["jobs"][0]["eval_split"] = 0.1
    a, b = load_run_file(write(tmp_path, raw, files)).jobs
    assert (a.eval_steps, a.eval_split, b.eval_steps, b.eval_split) == (10, 0.1, 10, 0.0)


def test_a_dataset_may_be_a_list_of_files(tmp_path, files):
    path = write(tmp_path, GOOD, files)
    spec = load_run_file(path, [f"jobs.a.dataset=[{files['DATA']}, {files['DATA']}]", f"jobs.b.dataset=[{files['DATA']}]"])
    assert spec.jobs[0].dataset == (files["DATA"], files["DATA"]) and spec.jobs[1].dataset == files["DATA"]


def test_command_line_overrides(tmp_path, files):
    path = write(tmp_path, GOOD, files)
    spec = load_run_file(path, ["learning_rate=5e-4", "jobs.b.lora_alpha=32", "jobs.0.seed=7", "output_dir=elsewhere"])
    assert [j.learning_rate for j in spec.jobs] == [5e-4, 5e-4]
    assert spec.jobs[1].lora_alpha == 32 and spec.jobs[0].seed == 7
    assert spec.run.output_dir == "elsewhere"


def test_a_split_by_hand_may_cut_inside_a_block(tmp_path, files):
    raw = {**GOOD, "run": {"layers_per_stage": [8.5, 7.5]}}
    assert load_run_file(write(tmp_path, raw, files)).run.layers_per_stage == (8.5, 7.5)


def test_overrides_do_not_mutate_input():
    raw = {"jobs": [{"name": "a"}]}
    out = apply_overrides(raw, ["jobs.a.lora_r=3"], "f.yaml")
    assert raw == {"jobs": [{"name": "a"}]} and out["jobs"][0]["lora_r"] == 3


def _broken(**changes):
    raw = yaml.safe_load(yaml.safe_dump(GOOD))
    for dotted, value in changes.items():
        node = raw
        parts = dotted.split("__")
        for p in parts[:-1]:
            node = node[int(p)] if p.isdigit() else node[p]
        if value is _DELETE:
            del node[parts[-1]]
        else:
            node[parts[-1]] = value
    return raw


_DELETE = object()

BROKEN = [
    (_broken(jobs__1__lora_r=-4), "jobs[1] ('b'): lora_r: must be a positive whole number, got -4"),
    (_broken(jobs__0__lora_rank=4), "jobs[0] ('a'): unknown field 'lora_rank' (did you mean 'lora_r'?)"),
    (_broken(jobs__0__dataset="nope.jsonl"), "jobs[0] ('a'): dataset: file 'nope.jsonl' not found"),
    (_broken(jobs__0__dataset=["DATA", "nope.jsonl"]), "jobs[0] ('a'): dataset[1]: file 'nope.jsonl' not found"),
    (_broken(jobs__0__dataset=[]), "jobs[0] ('a'): dataset: must be a file path or a non-empty list of them"),
    (_broken(jobs__1__name="a"), "jobs[1] ('a'): name: 'a' is used by another job"),
    (_broken(jobs__1__name="A"), "jobs[1] ('A'): name: 'A' is used by another job (names differing only in case"),
    (_broken(jobs__1__name="TensorBoard"), "jobs[1] ('TensorBoard'): name: 'TensorBoard' is taken by the run "
                                           "folder's own 'tensorboard'; choose another"),
    (_broken(jobs__0__target_modules=["qproj"]), "jobs[0] ('a'): target_modules: 'qproj' is not one of"),
    (_broken(jobs__0__lora_dropout=1.5), "jobs[0] ('a'): lora_dropout: must be in [0, 1), got 1.5"),
    (_broken(jobs__0__optimizer="adam"), "jobs[0] ('a'): optimizer: 'adam' is not one of adamw, sgd"),
    (_broken(jobs__0__lr_scheduler="step"), "jobs[0] ('a'): lr_scheduler: 'step' is not one of"),
    (_broken(jobs__0__template="vicuna"), "jobs[0] ('a'): template: 'vicuna' is not one of"),
    (_broken(jobs__0__micro_batch_size="four"), "jobs[0] ('a'): micro_batch_size: must be a whole number, got 'four'"),
    (_broken(jobs__0__learning_rate=0), "jobs[0] ('a'): learning_rate: must be positive, got 0.0"),
    (_broken(jobs__0__init_from="no/such/adapter"), "jobs[0] ('a'): init_from: 'no/such/adapter' is not a PEFT adapter folder"),
    (_broken(jobs__0__name=_DELETE), "jobs[0]: name: missing (required)"),
    (_broken(jobs__0__eval_steps=10), "jobs[0] ('a'): eval_steps: evaluates the job's held-out records, and it holds "
                                      "none (eval_split is 0)"),
    (_broken(jobs__0__save_total_limit=2), "jobs[0] ('a'): save_total_limit: keeps the job's newest checkpoints, and it "
                                           "writes none (save_steps is not set): set save_steps too"),
    (_broken(jobs__0__save_total_limit=0, jobs__0__save_steps=5), "jobs[0] ('a'): save_total_limit: must be a positive "
                                                                  "whole number or empty, got 0"),
    (_broken(defaults__cutof_len=64), "defaults: unknown field 'cutof_len' (did you mean 'cutoff_len'?)"),
    (_broken(model__dtype="fp8"), "model: dtype: 'fp8' is not one of float32, bfloat16, float16"),
    (_broken(model__path="missing_model_dir"), "model: path: 'missing_model_dir' is not a folder"),
    (_broken(run__max_concurrent_jobs=0), "run: max_concurrent_jobs: must be at least 1, got 0"),
    (_broken(run__layers_per_stage=[8, 7.25]), "run: layers_per_stage: each stage holds a positive number of blocks "
                                               "in halves (8, 8.5: a block's attention, its MLP on the next stage), "
                                               "got [8, 7.25]"),
    (_broken(run__layers_per_stage=[8, 0]), "run: layers_per_stage: each stage holds a positive number of blocks"),
    (_broken(run__layers_per_stage=[8, "7"]), "run: layers_per_stage: must be a list of numbers, got [8, '7']"),
    (_broken(jobs=[]), "jobs: must be a non-empty list of jobs"),
    (_broken(modle=1), "top level: unknown field 'modle' (did you mean 'model'?)"),
]


@pytest.mark.parametrize("raw, message", BROKEN, ids=[m.split(":")[0] + ":" + m.split(":")[1] for _, m in BROKEN])
def test_broken_run_files(tmp_path, files, raw, message):
    path = write(tmp_path, raw, files)
    with pytest.raises(ConfigError) as info:
        load_run_file(path)
    assert str(info.value).startswith(str(path) + ": ")
    assert message in str(info.value)


def test_not_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("jobs: [\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_run_file(bad)
    with pytest.raises(ConfigError, match="run file not found"):
        load_run_file(tmp_path / "missing.yaml")


def test_bad_override(tmp_path, files):
    path = write(tmp_path, GOOD, files)
    with pytest.raises(ConfigError, match="no job named or numbered 'zzz'"):
        load_run_file(path, ["jobs.zzz.lora_r=4"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_run_file(path, ["lora_r"])


def test_the_reserved_names_are_the_run_folders_own_entries():
    """A job's folder sits beside these: the list must follow where the run writes them."""
    from mlora.config.load import RESERVED_NAMES
    from mlora.meteora.evaluate import EVAL_DIR
    from mlora.monitor.metrics import TB_DIR
    from mlora.monitor.report import REPORT
    from mlora.runtime.output import SUMMARY, TRACE

    assert {SUMMARY, TB_DIR, REPORT, TRACE, EVAL_DIR} == set(RESERVED_NAMES)


def test_a_sweep_stands_for_one_job_per_combination_of_its_values(tmp_path, files):
    other = tmp_path / "customer_b.jsonl"
    other.write_text('{"instruction": "x", "output": "y"}\n')
    raw = {**GOOD, "jobs": [
        {"name": "a", "dataset": "DATA", "lora_alpha": 32, "sweep": {"learning_rate": ["1e-4", 3.0e-4], "lora_r": [8, 16]}},
        {"name": "per", "sweep": {"dataset": ["DATA", str(other)], "lora_dropout": [0.05]}},
        {"name": "b", "dataset": "DATA"},
    ]}
    spec = load_run_file(write(tmp_path, raw, files), ["jobs.a.seed=3"])
    got = [(j.name, j.learning_rate, j.lora_r, j.lora_alpha, j.seed) for j in spec.jobs[:4]]
    assert got == [("a-lr1e-4-r8", 1e-4, 8, 32.0, 3), ("a-lr1e-4-r16", 1e-4, 16, 32.0, 3),
                   ("a-lr0.0003-r8", 3e-4, 8, 32.0, 3), ("a-lr0.0003-r16", 3e-4, 16, 32.0, 3)]
    assert [(j.name, j.dataset, j.lora_dropout) for j in spec.jobs[4:6]] == [
        ("per-data-dropout0.05", files["DATA"], 0.05), ("per-customer_b-dropout0.05", str(other), 0.05)]
    assert spec.jobs[6].name == "b" and spec.jobs[0].target_modules == ("q_proj", "v_proj")  # defaults still apply


def test_a_sweep_needs_a_name_to_name_its_jobs_after(tmp_path, files):
    raw = {**GOOD, "jobs": [{"dataset": "DATA", "sweep": {"lora_r": [8, 16]}}]}
    with pytest.raises(ConfigError, match=r"run\.yaml: jobs\[0\]: name: missing \(required: a sweep's jobs are named"):
        load_run_file(write(tmp_path, raw, files))


def test_an_override_of_a_swept_job_points_at_its_entry(tmp_path, files):
    raw = {**GOOD, "jobs": [{"name": "a", "dataset": "DATA", "sweep": {"lora_r": [8, 16]}}]}
    with pytest.raises(ConfigError, match=r"override 'jobs.a-r8.seed': no job named or numbered 'a-r8' "
                                          r"\(a sweep's jobs are named once it expands: address its entry, 'a'\)"):
        load_run_file(write(tmp_path, raw, files), ["jobs.a-r8.seed=1"])


@pytest.mark.parametrize(
    "sweep, extra, message",
    [
        ({"lora_r": [8, -1]}, {}, "jobs[0] ('a-r-1', sweep lora_r=-1): lora_r: must be a positive whole number"),
        ({"lora_rank": [8]}, {}, "jobs[0] ('a'): sweep: unknown field 'lora_rank' (did you mean 'lora_r'?)"),
        ({"name": ["x"]}, {}, "jobs[0] ('a'): sweep: name: cannot be swept"),
        ({"lora_r": 8}, {}, "jobs[0] ('a'): sweep: lora_r: must be a non-empty list of values, got 8"),
        ({"lora_r": []}, {}, "sweep: lora_r: must be a non-empty list of values"),
        ({"lora_r": [8]}, {"lora_r": 4}, "jobs[0] ('a'): sweep: lora_r: also set on the job itself; keep one"),
        ([8, 16], {}, "jobs[0] ('a'): sweep: must be a mapping of job fields to lists of values"),
        ({"seed": [1, 1]}, {}, "jobs[0] ('a-seed1', sweep seed=1): name: 'a-seed1' is used by another job"),
    ],
)
def test_broken_sweeps_are_named(tmp_path, files, sweep, extra, message):
    raw = {**GOOD, "jobs": [{"name": "a", "dataset": "DATA", **extra, "sweep": sweep}]}
    with pytest.raises(ConfigError) as err:
        load_run_file(write(tmp_path, raw, files))
    assert message in str(err.value) and str(err.value).startswith(str(tmp_path / "run.yaml")), str(err.value)
