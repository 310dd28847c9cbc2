"""Command line: ``pilot --config exps/simplecil.json [--set key=value ...] [--resume]`` runs a config;
``pilot sweep`` runs its seeds times a grid (on Ray when installed); ``pilot summarize`` tables runs;
``pilot evaluate`` scores a run's last checkpoint again; ``pilot select`` ranks candidate backbones.

Errors: a user's (``PilotError``) is one paragraph, no traceback, exit 2; a bug's comes with its
traceback, exit 1. SIGINT and SIGTERM stop a run as interrupted (exit 130 and 143); --resume continues it."""
from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
import traceback
import warnings
from pathlib import Path

from pilot.errors import PilotError

# The commands besides running a config, each with its purpose: the top-level --help lists them.
COMMANDS = {
    "sweep": "run configs' seeds times a grid of values, in parallel on Ray when installed",
    "summarize": "tabulate finished runs: mean ± std over seeds, as Markdown, CSV or LaTeX",
    "evaluate": "score a run's last checkpoint again, e.g. on a shifted copy of its test set",
    "select": "rank candidate backbones for a config's data before running it",
    "data": "list, download (or take --from a local copy), verify and split the benchmark datasets",
}

USAGE = ("pilot --config FILE [--set KEY=VALUE ...] [--resume | --restart] [--quiet]\n"
         "       pilot {" + ",".join(COMMANDS) + "} ...   (pilot <command> --help for its options)")

DESCRIPTION = ("Run a continual-learning experiment (class-, task- or domain-incremental) from a JSON config.\n\n"
               "commands:\n" + "\n".join(f"  {name:<10} {purpose}" for name, purpose in COMMANDS.items()))

EPILOG = """\
examples:
  pilot --config exps/quickstart.json
  pilot --config exps/simplecil.json --set seed=[1993,1994] --set train_per_class=20
  pilot --config exps/simplecil.json --resume        # continue a run that was killed or failed

Each seed's run writes results.json, metrics.csv, run.log, tensorboard/ and checkpoint.safetensors
under <log_dir>/<model_name>/<dataset>/<init_cls or 0>/<increment>/<prefix>_<seed>_<backbone>/.
A failed run's results.json says "status": "failed" and why; its checkpoint is kept for --resume.
Plot runs with: python tools/plot.py <run dirs...>

  pilot sweep --config exps/simplecil_p0.json --config exps/ranpac_p0.json --set seed=[1,2,3]
  pilot summarize logs/            # mean ± std over seeds: Markdown, --csv, --latex
  pilot evaluate <run dir> --data-path shifted/   # the run's last checkpoint on another test set
  pilot select --config exps/simplecil_p0.json --candidates deit_tiny_patch16_224,random:deit_tiny_patch16_224
  pilot data get imagenetr --root data     # download, check, split; pilot data list shows every dataset
"""

SWEEP_EPILOG = """Each run of the cross product of each config's seeds and the grid gets its own run directory (the
grid values join the run's prefix). Re-running the same command skips finished runs, resumes
unfinished ones from their checkpoints and retries failed ones only with --retry-failed. The
sweep's record is <log_dir>/sweeps/<name>/sweep.json; its runs share one feature cache there
(unless the config sets feature_cache_dir), so frozen features are encoded once for all of them.
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pilot", usage=USAGE, description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, metavar="FILE",
                   help="JSON config (PILOT's key names), e.g. exps/simplecil.json")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key; VALUE is parsed as JSON when it can be (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue each seed's run from its last checkpoint (the config must be unchanged)")
    p.add_argument("--restart", action="store_true",
                   help="start each seed's run over, discarding the checkpoint and results it left")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def sweep_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pilot sweep", description="Run a config's seeds times a grid of values.",
                                epilog=SWEEP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, action="append", dest="configs",
                   help="JSON config, e.g. exps/simplecil_p0.json (repeatable: one sweep over several configs)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="values of a key to cross with the others and the seeds (repeatable)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key for every run (repeatable)")
    p.add_argument("--name", help="the sweep's name (default: the config's stem and a hash of grid and sets)")
    p.add_argument("--max-parallel", type=int, help="at most this many runs at once (default: as resources allow)")
    p.add_argument("--address", help="an existing Ray cluster, e.g. ray://head:10001 or auto")
    p.add_argument("--cpus-per-run", type=float, default=1.0, help="Ray CPUs (and torch threads) per run")
    p.add_argument("--gpus-per-run", type=float,
                   help="Ray GPUs per run; fractions share a GPU (default: 1 for CUDA runs, 0 on the CPU)")
    p.add_argument("--retry-failed", action="store_true", help="run again the runs that failed before")
    p.add_argument("--dry-run", action="store_true", help="print the runs and their state, run nothing")
    return p


def run_sweep(argv: list[str]) -> int:
    from pilot.config import parse_overrides
    from pilot.sweep import execute, expand, parse_grid

    args = sweep_parser().parse_args(argv)
    sets = {**parse_overrides(args.overrides), "progress": False}
    sweep = expand(args.configs, parse_grid(args.grid), sets, args.name)
    sweep.cpus_per_run = args.cpus_per_run
    sweep.gpus_per_run = args.gpus_per_run if args.gpus_per_run is not None else float(sweep.uses_cuda())
    if args.dry_run:
        for run in sweep.runs:
            print(f"{run.state():<10} {run.label}: {run.run_dir}")
        print(f"{len(sweep.runs)} runs; record: {sweep.record_path}")
        return 0
    records = execute(sweep, args.max_parallel, args.address, args.retry_failed)
    failed = [r for r in records.values() if r.get("status") == "failed"]
    for record in failed:
        print(f"pilot sweep: failed: {record['label']}: {record['error']}", file=sys.stderr)
    if failed:
        print(f"pilot sweep: {len(failed)} runs failed; fix the cause and re-run with --retry-failed", file=sys.stderr)
    print(f"summary: pilot summarize {sweep.directory}")
    return 1 if failed else 0


def summarize_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pilot summarize", description="Mean ± std over seeds of runs' metrics.")
    p.add_argument("paths", nargs="+", help="run directories, folders of runs, or sweep directories")
    p.add_argument("--csv", help="also write the table as CSV to this file")
    p.add_argument("--latex", help="also write the table as a LaTeX tabular to this file")
    p.add_argument("--runs", action="store_true", help="print one row per run before the table")
    p.add_argument("--select", choices=["val"],
                   help="val: of each learner, dataset, protocol and backbone, only the setting (grid point) with the "
                        "best mean validation Ā (runs with val_fraction or val_per_class), chosen without test accuracy")
    return p


def run_summarize(argv: list[str]) -> int:
    from pilot.outputs import atomic_write_text
    from pilot.summary import load_runs, latex, markdown, run_table, select_by_validation, summarize, to_csv

    args = summarize_parser().parse_args(argv)
    _, runs = load_runs(args.paths)
    rows = summarize(runs)
    if not rows:
        raise PilotError(f"no complete run (results.json with status complete) under {', '.join(args.paths)}.")
    if args.select == "val":
        rows = select_by_validation(rows)
    if args.runs:
        print(run_table(runs))
    print(markdown(rows))
    for path, text in ((args.csv, to_csv), (args.latex, latex)):
        if path:
            atomic_write_text(path, text(rows))
            print(f"wrote {path}")
    return 0


def evaluate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pilot evaluate",
                                description="Evaluate a run's last checkpoint again on the test images of the tasks "
                                            "it learnt; writes evaluation.json, never results.json.")
    p.add_argument("run_dir", help="a run's directory (holding checkpoint.safetensors)")
    p.add_argument("--dataset", help="another dataset with the same classes (e.g. folder)")
    p.add_argument("--data-path", help="where that dataset is, e.g. a corrupted copy of the test set (only test/ "
                                       "is needed for an image folder)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="e.g. test_per_class=0, device=[\"0\"], weights_dir=... (repeatable)")
    p.add_argument("--output", help="where to write the evaluation (default: <run dir>/evaluation.json)")
    return p


def run_evaluate(argv: list[str]) -> int:
    from pilot.config import parse_overrides
    from pilot.evaluation import evaluate_run, report

    args = evaluate_parser().parse_args(argv)
    overrides = parse_overrides(args.overrides)
    overrides.update({k: v for k, v in (("dataset", args.dataset), ("data_path", args.data_path)) if v})
    print(report(evaluate_run(args.run_dir, overrides, args.output)))
    return 0


def select_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pilot select", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Rank candidate backbones for a config's data before running it: each encodes the first "
                    "task's training images once and transferability estimators (LogME, H-score, NCM leave-one-out "
                    "accuracy, LEEP) score its features.",
        epilog="example:\n  pilot select --config exps/simplecil_p0.json --candidates deit_tiny_patch16_224,"
               "deit_tiny_patch16_224@6,random:deit_tiny_patch16_224 --run")
    p.add_argument("--config", required=True, help="the JSON config to choose a backbone for")
    p.add_argument("--candidates", required=True,
                   help="comma-separated backbone_type values; random:<name> is that architecture randomly "
                        "initialised, <name>@<k> its first k blocks")
    p.add_argument("--tasks", type=int, default=1, help="score on the training images of the first K tasks (default 1)")
    p.add_argument("--rank-by", default="logme", help="the estimator that ranks: logme, h_score, ncm_accuracy, leep")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    p.add_argument("--output", help="where to write selection.json (default: <log_dir>/selection/<config>/)")
    p.add_argument("--run", action="store_true", help="then run the config with the best candidate")
    return p


def run_select(argv: list[str]) -> int:
    from pilot.configure import load_config
    from pilot.engine import run_experiment, summary_line
    from pilot.selection import default_output, select, table, write_selection

    args = select_parser().parse_args(argv)
    config = load_config(args.config, args.overrides)
    selection = select(config, [c.strip() for c in args.candidates.split(",") if c.strip()], args.tasks, args.rank_by)
    output = Path(args.output) if args.output else default_output(config, args.config)
    write_selection(selection, output)
    print(table(selection))
    print(f"best by {args.rank_by}: {selection['ranking'][0]}; selection took {selection['seconds']:.1f}s; wrote {output}")
    if args.run:
        best = load_config(args.config, args.overrides, {"backbone_type": selection["ranking"][0]})
        for result in run_experiment(best):
            print(summary_line(result))
    return 0


def data_parser() -> argparse.ArgumentParser:
    from pilot.data.fetch import default_root

    p = argparse.ArgumentParser(prog="pilot data", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="The benchmark datasets: list them, get one (download, or --from a "
                                            "local copy), verify one. docs/datasets.md describes each.",
                                epilog="examples:\n  pilot data list\n  pilot data get imagenetr --root data\n"
                                       "  pilot data get cub --root data --from ~/Downloads/CUB_200_2011.tgz\n"
                                       "  pilot data verify cub --root data")
    commands = p.add_subparsers(dest="action", required=True, metavar="{list,get,verify}")
    root_help = f"the folder that holds the datasets, a config's data_path (default: PILOT_DATA_DIR or ./data, now '{default_root()}')"
    listed = commands.add_parser("list", help="every dataset: source, size, classes, split, licence, state here")
    listed.add_argument("--root", default=default_root(), help=root_help)
    get = commands.add_parser("get", help="download (resuming) or take --from, check sha256, extract, split")
    get.add_argument("name")
    get.add_argument("--root", default=default_root(), help=root_help)
    get.add_argument("--from", dest="source", metavar="FILE_OR_DIR",
                     help="a local copy of the archive (or the folder holding the archives): for offline machines")
    get.add_argument("--pilot-archive", action="store_true",
                     help="--from is PILOT's own archive (train/ and test/ inside), whose split it keeps")
    verify = commands.add_parser("verify", help="re-hash a prepared dataset: names any missing, changed or extra file")
    verify.add_argument("name")
    verify.add_argument("--root", default=default_root(), help=root_help)
    return p


def run_data(argv: list[str]) -> int:
    from pilot.data import fetch

    args = data_parser().parse_args(argv)
    if args.action == "list":
        print(fetch.listing(args.root))
    elif args.action == "get":
        fetch.get(args.name, args.root, args.source, args.pilot_archive)
    else:
        fetch.verify(args.name, args.root)
    return 0


SUBCOMMANDS = {"sweep": run_sweep, "summarize": run_summarize, "evaluate": run_evaluate, "select": run_select,
               "data": run_data}


class Terminated(BaseException):
    """SIGTERM (what schedulers and ``kill`` send), raised where the process is, as SIGINT raises
    KeyboardInterrupt: not an error of the run, so it is recorded as interrupted and --resume continues it."""


def _terminate(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut short the record of the first
    raise Terminated(signal.Signals(signum).name)


@contextlib.contextmanager
def sigterm_raises():
    """SIGTERM raises ``Terminated`` for the block, then the previous handler is back; signals reach the
    main thread alone, so elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_config(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    from pilot.configure import load_config
    from pilot.engine import run_experiment, summary_line

    config = load_config(args.config, args.overrides, {"progress": False} if args.quiet else None)
    for result in run_experiment(config, resume=args.resume, restart=args.restart):
        print(summary_line(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    warnings.formatwarning = lambda message, *_, **__: f"pilot: warning: {message}\n"
    command = SUBCOMMANDS[argv[0]] if argv and argv[0] in SUBCOMMANDS else None
    try:
        with sigterm_raises():
            return command(argv[1:]) if command else run_config(argv)
    except PilotError as err:
        print(f"pilot: error: {err}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as err:
        print("pilot: interrupted; continue with --resume", file=sys.stderr)
        return 143 if isinstance(err, Terminated) else 130  # 128 + the signal's number, as a shell reports it
    except Exception as err:  # a bug, not the user's input: its traceback is what a report needs
        traceback.print_exc()
        print(internal_error_message(err), file=sys.stderr)
        return 1


def internal_error_message(err: BaseException) -> str:
    """What the CLI says under a bug's traceback: where the run it stopped recorded it, only if one did."""
    message = ("pilot: internal error: the traceback above is a bug in pilot or in a learner, not a fault of the "
               "input; please report it.")
    record = failure_record(err)
    if record is None:
        return message
    return f"{message} The run recorded it in '{record}', and --resume continues from its last checkpoint."


def failure_record(err: BaseException) -> Path | None:
    """The results.json that records ``err``: a run that had started writes it there as it fails (in the
    directory of a frame's ``self.run_dir``); None where no file says so (the error came before)."""
    for frame, _ in traceback.walk_tb(err.__traceback__):
        run_dir = getattr(frame.f_locals.get("self"), "run_dir", None)
        if run_dir is None:
            continue
        path = Path(run_dir) / "results.json"
        with contextlib.suppress(OSError, ValueError, AttributeError):
            error = json.loads(path.read_text(encoding="utf-8")).get("error", {})
            if error.get("type") == type(err).__name__ and error.get("message") == str(err):
                return path
    return None


if __name__ == "__main__":
    sys.exit(main())
