"""Command line: ``pilot --config exps/simplecil.json [--set key=value ...] [--resume]``."""
from __future__ import annotations

import argparse
import sys
import warnings

from pilot.errors import PilotError

EPILOG = """\
examples:
  pilot --config exps/quickstart.json
  pilot --config exps/simplecil.json --set seed=[1993,1994] --set train_per_class=20
  pilot --config exps/simplecil.json --resume        # continue a run that was killed

Each seed's run writes results.json, metrics.csv, run.log, tensorboard/ and checkpoint.pt under
<log_dir>/<model_name>/<dataset>/<init_cls or 0>/<increment>/<prefix>_<seed>_<backbone>/.
Plot runs with: python tools/plot.py <run dirs...>
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pilot", description="Run a class-incremental learning experiment from a JSON config.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="JSON config (PILOT's key names), e.g. exps/simplecil.json")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key; VALUE is parsed as JSON when it can be (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue each seed's run from its last checkpoint (the config must be unchanged)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    warnings.formatwarning = lambda message, *_, **__: f"pilot: warning: {message}\n"
    try:
        from pilot.configure import load_config
        from pilot.engine import run_experiment, summary_line

        overrides = args.overrides + (["progress=false"] if args.quiet else [])
        config = load_config(args.config, overrides)
        for result in run_experiment(config, resume=args.resume):
            print(summary_line(result))
    except PilotError as err:
        print(f"pilot: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pilot: interrupted; continue with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
