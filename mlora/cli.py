"""`mlora …` commands. Thin: each parses its arguments and calls one public function."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Sequence

# What each command's start brings in that runs C++ start-up code, imported with SIGINT held
# back (`import_holding_sigint`): torch, and for a command that loads a model what that
# imports later, DTensor (sympy, op registrations) and transformers' modeling_utils. `status`
# and `report` read files only and stay quick.
_LOADS_A_MODEL = ("torch", "torch.distributed.tensor", "transformers.modeling_utils")
HEAVY_IMPORTS = {"train": _LOADS_A_MODEL, "generate": _LOADS_A_MODEL, "eval": _LOADS_A_MODEL,
                 "tiny-model": _LOADS_A_MODEL, "validate": ("torch",)}


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input: printed as one line, not a traceback."""
    from mlora.config import ConfigError
    from mlora.data import DataError
    from mlora.meteora.adapter import MeteoraError
    from mlora.model.peft_io import AdapterError
    from mlora.model.stage import ModelFolderError
    from mlora.monitor import NotARunError
    from mlora.runtime.output import OutputError

    return (ConfigError, DataError, AdapterError, ModelFolderError, OutputError, NotARunError, MeteoraError)


def write_errors() -> tuple[type[BaseException], ...]:
    """A job's output that could not be written: one line (job, folder, why), not a
    traceback. Imported only when an error is raised (it brings torch in)."""
    from mlora.runtime.background_writer import WriteError

    return (WriteError,)


def import_holding_sigint(names: Sequence[str]) -> None:
    """Import `names` with SIGINT held back until they are done, then let it in.

    A Ctrl-C landing inside these imports raised its KeyboardInterrupt in the middle of
    torch's C++ start-up: the process aborted ("terminate called after throwing an instance
    of ... KeyboardInterrupt", exit -6), or CPython, having seen the interrupt leave code it
    ran on an extension's behalf, ended the process by the signal (-2) although `main` had
    caught it and printed its line (tests/test_trainer.py, under load). Held back, the signal
    arrives as the mask is lifted, in plain Python, and `main` turns it into one line and
    exit 130. Only the main thread takes signals; threads torch starts meanwhile keep SIGINT
    blocked, which leaves it to the main thread as before. (A model's own modeling file,
    imported as it loads, is small and not held.)"""
    if not names:
        return
    held = hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if held else None
    try:
        for name in names:
            try:
                importlib.import_module(name)
            except ImportError:
                if name != "torch.distributed.tensor":  # a torch built without distributed has none
                    raise
    finally:
        if held:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _train(args: argparse.Namespace) -> int:
    from mlora.runtime.launch import train_from_cli

    if args.ray is not None:
        return _train_on_ray(args)
    live = False if args.plain else None
    return train_from_cli(args.run_file, args.overrides, resume=args.resume, overwrite=args.overwrite, live=live)


def _train_on_ray(args: argparse.Namespace) -> int:
    from mlora.runtime.pipeline import is_pipeline_launch
    from mlora.runtime.ray_launch import RayLaunchError, run_on_ray

    if is_pipeline_launch():
        print("mlora train: error: --ray starts its own stage processes; run it once, not under torchrun",
              file=sys.stderr)
        return 2
    try:
        return run_on_ray(args.run_file, args.overrides, n_stages=args.ray, address=args.ray_address,
                          resume=args.resume, overwrite=args.overwrite)
    except RayLaunchError as exc:
        print(f"mlora train: error: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:  # the stage actors went with the driver's Ray session
        print(f"mlora: interrupted; the stages were stopped. `mlora train {args.run_file} --ray {args.ray} --resume` "
              "continues (each unfinished job from its last checkpoint, or from the start without one)",
              file=sys.stderr)
        return 130


def _validate(args: argparse.Namespace) -> int:
    from mlora.config import ConfigError, load_run_file
    from mlora.runtime.preflight import preflight

    spec = load_run_file(args.run_file, args.overrides)
    if args.stages is not None and args.stages < 2:
        raise ConfigError(f"--stages {args.stages}: a pipeline has at least 2 stages (1 is the single-process trainer)")
    for line in preflight(spec, stages=args.stages):
        print(line)
    print(f"{args.run_file}: OK ({len(spec.jobs)} jobs)")
    return 0


def _tiny_model(args: argparse.Namespace) -> int:
    from mlora.model.tiny import write_tiny_model

    path = write_tiny_model(Path(args.dir), args.arch, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote a tiny random {args.arch} model with its tokenizer to {path}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from mlora.monitor import render_status

    print(render_status(Path(args.output_dir), sort=args.sort))
    return 0


def _report(args: argparse.Namespace) -> int:
    from mlora.monitor import write_report

    path = write_report(Path(args.output_dir), Path(args.out) if args.out else None)
    print(f"wrote {path}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from mlora.meteora.commands import generate_from_cli

    return generate_from_cli(args)


def _eval(args: argparse.Namespace) -> int:
    from mlora.meteora.evaluate import format_table, run_eval

    results = run_eval(args.run_dir, args.model, task_adapters=args.tasks_adapters,
                       mixed=None if args.mixed == "none" else args.mixed, meteora=args.meteora,
                       out=args.out, limit=args.limit, device=args.device, log=lambda m: print(m, file=sys.stderr))
    print(format_table(results))
    print(f"wrote {Path(results['out_dir']) / 'eval.json'}" + (f" and {results['plot']}" if results["plot"] else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlora", description="Train many LoRA adapters at once over one frozen base model.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train every job of a run file")
    p.add_argument("run_file")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. learning_rate=1e-3 jobs.sum.lora_r=16")
    p.add_argument("--resume", action="store_true", help="continue the run in output_dir from its checkpoints")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in output_dir")
    p.add_argument("--plain", action="store_true", help="plain log lines instead of the live table")
    p.add_argument("--ray", type=int, metavar="STAGES",
                   help="run as a pipeline of STAGES Ray actors (a GPU each when the run is on GPUs)")
    p.add_argument("--ray-address", help="the Ray cluster to join ('auto', or host:port; default: RAY_ADDRESS, "
                   "else a Ray instance started on this machine)")
    p.set_defaults(func=_train)

    p = sub.add_parser("validate", help="check a run file, its datasets and model folder without training")
    p.add_argument("run_file")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--stages", type=int, metavar="P",
                   help="also plan it as a pipeline of P stages (torchrun --nproc-per-node P, --ray P): the split, "
                   "the micro-batches and the bubble the schedule predicts")
    p.set_defaults(func=_validate)

    p = sub.add_parser("tiny-model", help="write a small random model with a real tokenizer")
    p.add_argument("dir")
    p.add_argument("--arch", default="llama", choices=["llama", "qwen2", "qwen3", "mistral"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_tiny_model)

    p = sub.add_parser("status", help="print the per-job table of a run (during or after it)")
    p.add_argument("output_dir")
    p.add_argument("--sort", choices=["eval", "loss"],
                   help="jobs by their last eval loss or train loss, lowest first (jobs without one last): a sweep's best on top")
    p.set_defaults(func=_status)

    p = sub.add_parser("report", help="write a PNG with loss curves and the per-job timeline")
    p.add_argument("output_dir")
    p.add_argument("--out", help="PNG path (default OUTPUT/report.png)")
    p.set_defaults(func=_report)

    p = sub.add_parser("generate", help="generate with a base model and a LoRA or MeteoRA folder")
    p.add_argument("model_dir")
    p.add_argument("--adapter", help="a PEFT LoRA folder or a MeteoRA folder (none: the base model alone)")
    p.add_argument("--prompt", action="append", default=[], help="an instruction, put through the template; "
                   "\\n in it is a newline (repeatable)")
    p.add_argument("--prompts-file", help="records (instruction/input, messages or ShareGPT conversations) from a "
                   ".jsonl, .json, .parquet, .csv or .tsv file; any other file: one instruction a line")
    p.add_argument("--template", default="plain", choices=["plain", "alpaca", "chatml", "llama3"])
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show-routing", action="store_true", help="MeteoRA: per generated token, the adapters the "
                   "gated linears chose first (share of linears)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_generate)

    p = sub.add_parser("eval", help="score a MeteoRA suite run: per-task accuracy, routing, composite prompts")
    p.add_argument("run_dir", help="the run's output folder")
    p.add_argument("--model", required=True, help="the base model folder")
    p.add_argument("--tasks-adapters", nargs="+", metavar="NAME",
                   help="the run's LoRA folders for the suite tasks, in task order (default: the task names)")
    p.add_argument("--mixed", default="mixed", help="the LoRA trained on all tasks mixed ('none': skip)")
    p.add_argument("--meteora", default="meteora", help="the MeteoRA folder in the run")
    p.add_argument("--out", help="where eval.json and routing.png go (default RUN/eval)")
    p.add_argument("--limit", type=int, help="at most N test records per task and N composite records")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_eval)
    return parser


def main(argv: Sequence[str] | None = None, *, exit_now_on_interrupt: bool = False) -> int:
    """Run one command; its exit status. `exit_now_on_interrupt` (the `mlora` program
    itself, not callers in-process): a Ctrl-C while a command starts ends the process at
    once with status 130, after its one line. Returned instead, CPython may still end the
    process by the signal (-2 to a parent, no longer 130) when the KeyboardInterrupt passed
    through code it ran for a C extension, though caught here (about 1 run in 7 with the
    signal landing in torch's imports, before `import_holding_sigint`; it still can in what
    is not held, a model's own modeling file). Nothing of the command is under way then
    that exit handlers would finish (a run under way stops itself and returns)."""
    parser = build_parser()
    # overrides may come before or after the flags: `train run.yaml --resume lr=1e-3`
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides") or any("=" not in x or x.startswith("-") for x in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        import_holding_sigint(HEAVY_IMPORTS.get(args.command, ()))
        return int(args.func(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C while starting (imports, loading, tokenising); first, as the clauses
        # below import what they name, torch among them (a run under way stops itself)
        if os.environ.get("RANK", "0") == "0":  # under torchrun, one line for all ranks
            print(f"mlora {args.command}: interrupted", file=sys.stderr)
        if exit_now_on_interrupt:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        return 130
    except user_errors() as exc:
        print(f"mlora {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except write_errors() as exc:  # a full disk, a folder made read-only: the job, the folder and why say it all
        print(f"mlora {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `mlora status OUT | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141  # as a shell reports a process SIGPIPE ended


def run() -> int:
    """The `mlora` program (its console script, `python -m mlora`): `main` on sys.argv,
    ending at once on a Ctrl-C while a command starts."""
    return main(exit_now_on_interrupt=True)


if __name__ == "__main__":
    sys.exit(run())
