"""`harness` command line.

    harness train EXPERIMENT.yaml [--set key=value ...] [--run-dir DIR]
    harness sweep EXPERIMENT.yaml [--workers N] [--storage URL] [--study NAME]
    harness bench [--cases a,b] [--steps N]   (harness bench --help)
    harness dashboard --project P [--entity E] [--study S] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import sys

from harness import metrics
from harness.config import ConfigError, load_config, parse_value


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


def cmd_dashboard(args: argparse.Namespace) -> int:
    from harness import dashboard

    try:
        if not args.dry_run:
            dashboard.require_login()
        entity = args.entity or ("<default entity>" if args.dry_run else dashboard.default_entity())
        workspace = dashboard.build_workspace(args.project, entity, args.study)
    except (dashboard.MissingWorkspaces, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(dashboard.describe(workspace))
    if not args.dry_run:
        workspace.save()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness", description=__doc__)
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

    p = sub.add_parser("dashboard", help="a wandb workspace for a study (needs wandb-workspaces)")
    p.add_argument("--project", required=True, help="wandb project, e.g. dpo-harness")
    p.add_argument("--entity", default=None, help="wandb entity (default: your default entity)")
    p.add_argument("--study", default=None, help="only this study's runs (its wandb group)")
    p.add_argument("--dry-run", action="store_true", help="print the panels, save nothing")
    p.set_defaults(func=cmd_dashboard)

    sub.add_parser("bench", help="the DPO step against the seed notebook's path (harness bench --help)",
                   add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from harness.bench import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
