"""`harness` command line.

    harness train EXPERIMENT.yaml [--set key=value ...] [--run-dir DIR]
    harness sweep EXPERIMENT.yaml [--workers N] [--storage URL] [--study NAME]
    harness bench [--cases a,b] [--steps N]   (harness bench --help)

Bad input (a config field, a data file, row or field, a model name) is printed as one paragraph
saying what is wrong, where and what to do, with exit code 2; `--traceback`, anywhere on the
line, shows the Python traceback instead. Any other error is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from harness import metrics
from harness.config import ConfigError, load_config, parse_value
from harness.errors import InputError

TRACEBACK = "--traceback"
CONFIG_ADVICE = ("Every field, its default and range is documented in harness/config/run.py "
                 "(a study's sweep section in harness/config/sweep.py)")


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set dpo.beta=0.3")
        out[key.strip()] = parse_value(value)
    return out


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.experiment, _overrides(args.set))
    from harness.train import RunDiverged, train  # torch import only when needed

    try:
        summary = train(cfg, run_dir=args.run_dir)
    except FileExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunDiverged as err:
        print(f"error: the run diverged ({err}); its files say status `diverged`. Lower train.lr "
              "or raise dpo.beta", file=sys.stderr)
        return 1
    final = {"status": summary["status"], "steps": summary["steps"], **metrics.headline(summary),
             "wall_s": summary["wall_s"]}
    print(json.dumps(final, indent=2))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from harness.sweep import SweepIncomplete, run_sweep

    try:
        run_sweep(args.experiment, workers=args.workers, storage=args.storage, study=args.study,
                  results_dir=args.results_dir)
    except SweepIncomplete as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness", description=__doc__)
    parser.add_argument(TRACEBACK, action="store_true",
                        help="on bad input, raise with the Python traceback instead of printing one "
                             "paragraph (accepted anywhere on the line)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="one DPO run from an experiment YAML")
    p.add_argument("experiment", help="experiment YAML, e.g. experiments/smoke.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set dpo.beta=0.3 (repeatable)")
    p.add_argument("--run-dir", default=None, help="run directory (default results/runs/<name>-<time>)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sweep", help="a study: grid cells x Optuna trials x seeds")
    p.add_argument("experiment", help="experiment YAML with a `sweep:` section")
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
    p.add_argument("--storage", default=None,
                   help="Optuna storage URL (default: $DPO_HARNESS_STORAGE, else "
                        "sqlite:///<results>/<study>/optuna.db); postgresql://... to share a study "
                        "between machines")
    p.add_argument("--study", default=None, help="study name (default: the experiment's name)")
    p.add_argument("--results-dir", default=None, help="default: the experiment's tracking.results_dir")
    p.set_defaults(func=cmd_sweep)

    sub.add_parser("bench", help="the DPO step against the seed notebook's path (harness bench --help)",
                   add_help=False)
    return parser


def paragraph(err: Exception) -> str:
    """An error's message as one paragraph: its lines joined, advice added to config errors."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = "; ".join(lines) or type(err).__name__
    if isinstance(err, ConfigError):
        text = f"{text.rstrip('.')}. {CONFIG_ADVICE}"
    return text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    show_traceback = TRACEBACK in argv
    argv = [a for a in argv if a != TRACEBACK]
    try:
        if argv[:1] == ["bench"]:
            from harness.bench import main as bench_main

            return bench_main(argv[1:])
        args = build_parser().parse_args(argv)
        return args.func(args)
    except (InputError, ConfigError) as err:  # bad input only: a bug keeps its traceback
        if show_traceback:
            raise
        print(f"error: {paragraph(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
