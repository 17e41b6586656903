"""`harness` command line.

    harness train EXPERIMENT.yaml [--set key=value ...] [--run-dir DIR] [--dry-run]
    harness data EXPERIMENT.yaml [--set key=value ...]   (the first pair and the pairs per split)
    harness plan EXPERIMENT.yaml [--device D] [--measure]   (memory per run: fits? runs per GPU?)
    harness replicate EXPERIMENT.yaml [--workers N|auto]
    harness sweep EXPERIMENT.yaml [--workers N|auto] [--devices 0,1] [--storage URL] [--study NAME]
    harness status EXPERIMENT.yaml [--storage URL] [--study NAME]
    harness baselines EXPERIMENT.yaml [--n-max 64] [--force]   (best-of-N from the SFT reference)
    torchrun --nproc-per-node K -m harness train EXPERIMENT.yaml   (one run, data-parallel)
    harness bench [--cases a,b] [--steps N]   (harness bench --help)
    harness dashboard --project P [--entity E] [--study S] [--dry-run]

Bad input (a config field, a data file, row or field, a model name) is printed as one paragraph
saying what is wrong, where and what to do, with exit code 2; `--traceback`, anywhere on the
line, shows the Python traceback instead. Any other error is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from harness import metrics
from harness.config import ConfigError, load_config, parse_value
from harness.errors import InputError
from harness.quiet import quiet_libraries

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


def cmd_data(args: argparse.Namespace) -> int:
    """The experiment's data as a run would see it: the first train pair, tokenized, with the
    tokens that do not count marked, and the pairs per split. Writes no run files."""
    cfg = load_config(args.experiment, _overrides(args.set))
    from harness import data, prepare  # torch import only when needed

    prep = prepare.preview(cfg)
    d = cfg.data
    print(f"{cfg.name}: {d.source} (format {d.format}; tokenizer {prep.info['tokenizer_source']})")
    print(f"first train pair as the model sees it; {data.MASKED[0]}...{data.MASKED[1]}: tokens that do "
          f"not count in its log-probs (dpo.mask_prompt: {str(cfg.dpo.mask_prompt).lower()})")
    print(data.show_pair(prep.splits["train"][0], prep.tokenizer, cfg.dpo.mask_prompt))
    kinds = ["total", "kept", "truncated", "dropped_too_long", "dropped_identical", "dropped_score_gap"]
    print("\n" + f"{'pairs':<10}" + "".join(f"  {k}" for k in kinds))
    for split in ("train", "validation", "test"):
        print(f"{split:<10}" + "".join(f"  {prep.counts.get(f'data/{split}/{k}', 0):>{len(k)}}" for k in kinds))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """The estimated peak memory of each run (each grid cell) of an experiment, by part; whether
    it fits the device and how many share one; with --measure, a few real steps of each beside."""
    import torch

    from harness import plan
    from harness.device import pick_device

    device = torch.device(args.device) if args.memory_gb else pick_device(args.device)
    capacity = args.memory_gb * 1e9 if args.memory_gb else None
    runs = plan.runs_of(args.experiment, _overrides(args.set))
    if args.measure:  # the plan of what is measured: the runs' first --steps steps
        runs = [(label, plan.quick(cfg, args.steps)) for label, cfg in runs]
    plans = [plan.plan_run(cfg, device, capacity) for _, cfg in runs]
    measured = None
    if args.measure:
        if device.type != "cpu" and device.type != "cuda":
            raise ConfigError(f"--measure: measures on cpu or cuda, not {device.type}")
        measured = {}
        for (_, cfg), p in zip(runs, plans, strict=True):
            print(f"measuring {p.name} ({args.steps} steps) ...", file=sys.stderr, flush=True)
            measured[p.name] = plan.measure(cfg, args.steps)
    where = "GPU memory allocated" if device.type == "cuda" else "peak RSS increase"
    print(f"{args.experiment} on {device} ({where}; GB; estimate: harness/plan.py)")
    print(plan.table(plans, measured))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    if args.dry_run:
        return cmd_data(args)
    cfg = load_config(args.experiment, _overrides(args.set))
    from harness import distributed
    from harness.errors import RunDiverged
    from harness.train import train  # torch import only when needed

    try:
        summary = train(cfg, run_dir=args.run_dir)
    except FileExistsError as err:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank raises it
            print(f"error: {err}", file=sys.stderr)
        return 2
    except RunDiverged as err:
        print(f"error: the run diverged ({err}); its files say status `diverged`. Lower train.lr "
              "or raise dpo.beta", file=sys.stderr)
        return 1
    finally:
        distributed.shutdown()
    if summary.get("world_size", 1) > 1 and os.environ.get("RANK", "0") != "0":
        return 0  # rank 0 reports a data-parallel run
    final = {"status": summary["status"], "steps": summary["steps"], **metrics.headline(summary),
             "wall_s": summary["wall_s"]}
    print(json.dumps(final, indent=2))
    return 0


def _run_study(args: argparse.Namespace, work) -> int:
    """Run `work()` (a sweep, or a study twice) as a command: refused under torchrun, Ctrl-C
    answered, exit 1 naming the cells a study could not finish."""
    from harness.distributed import launched
    from harness.sweep import SweepIncomplete

    if launched():
        raise ConfigError(f"harness {args.command} runs its own worker processes: start it without "
                          "torchrun (--workers/--devices give each worker a device)")
    # Its workers answer Ctrl-C (SIGINT) even when started from a script in the background, which
    # leaves SIGINT ignored; the command must too, or it would report them dead instead.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        work()
    except SweepIncomplete as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from harness.sweep import run_sweep

    devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else None
    return _run_study(args, lambda: run_sweep(
        args.experiment, workers=args.workers, storage=_storage(args), study=args.study,
        results_dir=args.results_dir, devices=devices, view=args.view))


def cmd_replicate(args: argparse.Namespace) -> int:
    from harness.sweep.replicate import run_replicate

    return _run_study(args, lambda: run_replicate(args.experiment, workers=args.workers,
                                                  results_dir=args.results_dir, view=args.view))


def _storage(args: argparse.Namespace) -> str | None:
    """--storage, else the URL in the variable --storage-env names (None: the default)."""
    if args.storage or not args.storage_env:
        return args.storage
    url = os.environ.get(args.storage_env)
    if not url:
        raise ConfigError(f"--storage-env {args.storage_env}: that environment variable is not set "
                          "(export it with the study's storage URL)")
    return url


def _workers(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: a number of workers or `auto`") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: at least one worker")
    return n


def cmd_status(args: argparse.Namespace) -> int:
    from pathlib import Path

    from harness.config import load_experiment
    from harness.sweep.status import render, study_status
    from harness.sweep.storage import masked, resolve

    exp = load_experiment(args.experiment, args.study)
    results = Path(args.results_dir or exp.base.tracking.results_dir)
    url = resolve(_storage(args), results, exp.study)
    rows = study_status(exp, url)
    if args.json:
        print(json.dumps(rows, indent=1, default=str))
    else:
        print(f"study {exp.study} | storage {masked(url)}")
        print(render(rows, exp.spec.objective.direction))
    return 0


def cmd_baselines(args: argparse.Namespace) -> int:
    from harness.baselines import run_baselines
    from harness.config import load_experiment

    exp = load_experiment(args.experiment, args.study)
    run_baselines(exp, args.results_dir or exp.base.tracking.results_dir, args.n_max, args.force)
    return 0


def _study_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage", default=None,
                   help="Optuna storage URL (default: $DPO_HARNESS_STORAGE, else "
                        "sqlite:///<results>/<study>/optuna.db); postgresql://... to share a study "
                        "between machines")
    p.add_argument("--storage-env", default=None, metavar="VAR",
                   help="read the storage URL from environment variable VAR (keeps a password "
                        "out of the command line and shell history)")
    p.add_argument("--study", default=None, help="study name (default: the experiment's name)")
    p.add_argument("--results-dir", default=None, help="default: the experiment's tracking.results_dir")


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


def _sweep_commands(sub) -> None:
    """`sweep` and `replicate`: a study, and a study run twice."""
    p = sub.add_parser("sweep", help="a study: grid cells x Optuna trials x seeds")
    p.add_argument("experiment", help="experiment YAML with a `sweep:` section")
    p.add_argument("--workers", type=_workers, default=1,
                   help="worker processes on this machine, or `auto`: one per --devices entry, "
                        "else one per visible CUDA device, else one per CPU core")
    p.add_argument("--devices", default=None, metavar="IDS",
                   help="CUDA devices for the workers, e.g. 0,1,2,3: worker i sees only device i "
                        "(round-robin when there are more workers than devices)")
    p.add_argument("--view", choices=("auto", "live", "plain", "off"), default="auto",
                   help="progress while it runs: live (a table redrawn in place; worker output to "
                        "results/<study>/workers.log), plain (a line per finished run), off; "
                        "auto: live when stderr is a terminal, else plain")
    _study_options(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("replicate", help="a study run twice, independently (other sampler and "
                       "training seeds): replication.md says which of its findings hold")
    p.add_argument("experiment", help="experiment YAML with a `sweep:` section")
    p.add_argument("--workers", type=_workers, default=1, help="worker processes, as for sweep")
    p.add_argument("--view", choices=("auto", "live", "plain", "off"), default="auto",
                   help="progress while each replica runs, as for sweep")
    p.add_argument("--results-dir", default=None,
                   help="where the two studies and <study>-replication/ go (default: the "
                        "experiment's tracking.results_dir)")
    p.set_defaults(func=cmd_replicate)


def _experiment_command(sub, name: str, help: str, example: str, example_set: str):  # noqa: A002
    """A subcommand that takes an experiment YAML and --set overrides."""
    p = sub.add_parser(name, help=help)
    p.add_argument("experiment", help=f"experiment YAML, e.g. {example}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config field, e.g. --set {example_set} (repeatable)")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness", description=__doc__)
    parser.add_argument(TRACEBACK, action="store_true",
                        help="on bad input, raise with the Python traceback instead of printing one "
                             "paragraph (accepted anywhere on the line)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = _experiment_command(sub, "train", "one DPO run from an experiment YAML",
                            "experiments/smoke.yaml", "dpo.beta=0.3")
    p.add_argument("--run-dir", default=None, help="run directory (default results/runs/<name>-<time>)")
    p.add_argument("--dry-run", action="store_true",
                   help="train nothing: print what `harness data` prints, then stop")
    p.set_defaults(func=cmd_train)

    p = _experiment_command(sub, "data", "check an experiment's data in seconds: the first pair as "
                            "the model sees it (masked tokens marked) and the pairs per split",
                            "experiments/seed_polite.yaml", "data.limit=100")
    p.set_defaults(func=cmd_data)

    p = _experiment_command(sub, "plan", "memory per run of an experiment (each grid cell of a "
                            "study is one run): weights, gradients, optimizer, reference, "
                            "activations; whether it fits; runs per device",
                            "experiments/sizes.yaml", "model.lora.r=16")
    p.add_argument("--device", default="auto", help="the device to plan for: auto, cpu, cuda, cuda:1")
    p.add_argument("--measure", action="store_true",
                   help="also run --steps optimizer steps of each run in a fresh process and show "
                        "its measured peak beside the estimate")
    p.add_argument("--steps", type=int, default=3, help="steps per measured run (default 3)")
    p.add_argument("--memory-gb", type=float, default=None,
                   help="plan for a device of this much memory that need not be here, e.g. "
                        "--device cuda --memory-gb 141 for an H200")
    p.set_defaults(func=cmd_plan)

    _sweep_commands(sub)
    p = sub.add_parser("status", help="where a study stands, from its storage (any machine)")
    p.add_argument("experiment", help="the study's experiment YAML")
    p.add_argument("--json", action="store_true", help="the rows as JSON")
    _study_options(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("baselines", help="best-of-N sampling from a study's SFT reference: "
                                         "results/<study>/baselines/best_of_n.csv")
    p.add_argument("experiment", help="the study's experiment YAML")
    p.add_argument("--n-max", type=int, default=64,
                   help="samples per gen-eval prompt; N runs over 1, 2, 4, ... up to it (default 64)")
    p.add_argument("--force", action="store_true", help="sample again even when the CSV is up to date")
    p.add_argument("--study", default=None, help="study name (default: the experiment's name)")
    p.add_argument("--results-dir", default=None, help="default: the experiment's tracking.results_dir")
    p.set_defaults(func=cmd_baselines)

    p = sub.add_parser("dashboard", help="a wandb workspace for a study (needs wandb-workspaces)")
    p.add_argument("--project", required=True, help="wandb project, e.g. dpo-harness")
    p.add_argument("--entity", default=None, help="wandb entity (default: your default entity)")
    p.add_argument("--study", default=None, help="only this study's runs (its wandb group)")
    p.add_argument("--dry-run", action="store_true", help="print the panels, save nothing")
    p.set_defaults(func=cmd_dashboard)

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
    quiet_libraries()  # transformers' and the hub's bars only on a terminal
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
