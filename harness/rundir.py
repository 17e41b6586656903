"""The run directory: the one owner of its file names and layouts, of a run's labels, and of the
decision to start a run or resume it. Plain paths and JSON, no torch: analysis/ reads its names.

Where runs live:

    <results>/runs/<name>-<YYYYmmdd-HHMMSS>/     a single `harness train` run (or --run-dir)
    <results>/<study>/                           a sweep's study: optuna.db (the default storage),
                                                 summary.csv (its table), workers.log
    <results>/<study>/runs/<cell>/trial-NNN/     a search trial, by slot (3 digits)
    <results>/<study>/runs/<cell>/seedK/         the cell's best parameters rerun with seed offset K

What a run directory holds:

- `config.json`: the resolved config and the run's `labels` (run_labels);
- `metrics.jsonl`: one JSON object per logged step;
- `<table>.json`: the last table logged under each key (table_file);
- `summary.json`: written at the end, status `finished` or how the run was cut off (and labels);
- `data_counts.json`: pairs per split: total, kept, truncated, dropped;
- `checkpoint/`: while a run with train.checkpoint_every is under way (its contents:
  harness.checkpoint); removed at the end unless train.keep_checkpoint;
- `model/`: a Hugging Face model directory (weights or LoRA adapter, tokenizer, model card:
  harness.export) with train.save_model; `tokenizer/` (harness.train); and `wandb/` for a single run (harness.tracking).

A run directory whose summary says `finished` is never written again. Any other earlier attempt
(cut off: no summary, or another status) resumes from its checkpoint or starts over: open_run_dir.
"""

from __future__ import annotations

import json
import shutil
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness import atomic

if TYPE_CHECKING:
    from harness.checkpoint import Checkpoint

# ----------------------------------------------------------------------------- names

CONFIG, METRICS, SUMMARY = "config.json", "metrics.jsonl", "summary.json"
DATA_COUNTS = "data_counts.json"  # pairs per split: total, kept, truncated, dropped
MODEL_DIR = "model"  # the finished run as a Hugging Face model directory (harness.export)
CHECKPOINT = "checkpoint"  # the folder of the run's checkpoint (harness.checkpoint)
FINISHED = "finished"  # the summary status of a complete run
RUNS = "runs"  # the folder of a results directory's (or a study's) runs
OPTUNA_DB = "optuna.db"  # a study's default Optuna storage (SQLite)
SUMMARY_CSV = "summary.csv"  # a study's results table (harness.sweep.summary)
WORKERS_LOG = "workers.log"  # a study's worker output under the live view (harness.sweep.supervise)
# What analysis groups runs by, in column order: study, cell, trial, role (`search` or `seeds`)
# and storage are set by a sweep (else None); masking and seed by every run.
LABELS = ("study", "cell", "trial", "role", "masking", "seed", "storage")


def table_file(key: str) -> str:
    """The file a table logged under `key` goes to (`gen/samples` -> `gen_samples.json`)."""
    return f"{key.replace('/', '_')}.json"


# ----------------------------------------------------------------------------- layouts


def single_run_dir(results_dir: str | Path, name: str) -> Path:
    """results_dir/runs/<name>-<time>: a new folder for a `harness train` run."""
    return Path(results_dir) / RUNS / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def study_dir(results_dir: str | Path, study: str) -> Path:
    """results_dir/<study>: a sweep's storage, table, worker log and runs."""
    return Path(results_dir) / study


def run_name(role: str, slot: int) -> str:
    """A sweep run's folder name: `trial-NNN` for search slot NNN, `seedK` for seed rerun K."""
    return f"trial-{slot:03d}" if role == "search" else f"seed{slot}"


def trial_dir(study: Path, cell: str, role: str, slot: int) -> Path:
    """<study dir>/runs/<cell>/<run_name>: where a sweep's run lives, re-derivable from
    (cell, role, slot) after any restart."""
    return Path(study) / RUNS / cell / run_name(role, slot)


def study_run_dirs(study: Path) -> list[Path]:
    """Every run folder of a study (<study dir>/runs/<cell>/<run>), sorted."""
    return sorted(p for p in (Path(study) / RUNS).glob("*/*") if p.is_dir())


def checkpoint_dir(run_dir: Path) -> Path:
    """The folder harness.checkpoint saves a run's checkpoints in."""
    return Path(run_dir) / CHECKPOINT


# ----------------------------------------------------------------------------- labels


def run_labels(cfg: Any, sweep: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's LABELS, written explicitly into config.json and summary.json: `sweep` gives
    study, cell, trial, role and storage (None outside a sweep); the config, masking and seed."""
    sweep = sweep or {}
    return {"study": sweep.get("study"), "cell": sweep.get("cell"), "trial": sweep.get("trial"),
            "role": sweep.get("role"), "masking": cfg.dpo.masking, "seed": cfg.train.seed,
            "storage": sweep.get("storage")}


def split_search(cell: str | None) -> tuple[str | None, int | None]:
    """A cell label's grid cell and which of its independent searches (sweep.searches) it is:
    "beta=0.1,masking=masked-sum,search=2" -> ("beta=0.1,masking=masked-sum", 2); a cell of a
    study with one search per cell -> (cell, None)."""
    if cell is None or cell != cell:  # None or NaN
        return None, None
    head, _, last = str(cell).rpartition(",")
    if last.startswith("search=") and last[7:].isdigit():
        return head or "all", int(last[7:])  # a study without grid axes: its one cell is "all"
    return str(cell), None


# ----------------------------------------------------------------------------- start or resume


def open_run_dir(results_dir: str | Path, name: str, run_dir: str | Path | None, config: dict,
                 precision: str) -> tuple[Path, Checkpoint | None]:
    """(the run directory, the checkpoint to resume from or None to start at step 0).

    `run_dir` as given, else single_run_dir(results_dir, name). A finished run is refused
    (FileExistsError). An earlier attempt resumes from its newest checkpoint when that is usable
    under `config` and `precision` (harness.checkpoint.usable) and metrics.jsonl still holds the
    rows it counted: metrics.jsonl is cut back to them and summary.json removed. Otherwise the run
    starts over: metrics.jsonl, summary.json and the checkpoint are removed. Prints one line
    saying which when run_dir held an earlier attempt."""
    run_dir = Path(run_dir) if run_dir is not None else single_run_dir(results_dir, name)
    if run_status(run_dir) == FINISHED:
        raise FileExistsError(f"{run_dir} already holds a finished run ({SUMMARY}); "
                              "pick another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    earlier = _earlier_attempt(run_dir)
    ckpt, why = _resumable(run_dir, config, precision)
    if ckpt is not None:
        p = ckpt.state["progress"]
        print(f"{run_dir}: resuming from the checkpoint at step {p['step']} ({p['seen']} pairs seen)",
              file=sys.stderr)
        return run_dir, ckpt
    _start_over(run_dir)
    if earlier:
        print(f"{run_dir}: starting over ({why})", file=sys.stderr)
    return run_dir, None


def _resumable(run_dir: Path, config: dict, precision: str) -> tuple[Checkpoint | None, str]:
    """(the checkpoint, "") when run_dir can resume from it, its files made ready; else (None,
    the reason)."""
    from harness import checkpoint  # torch: imported when a run starts, not by analysis/

    ckpt, why = checkpoint.usable(checkpoint_dir(run_dir), config, precision)
    if ckpt is None:
        return None, why
    if not resume_files(run_dir, ckpt.state["metrics_lines"]):
        return None, f"{METRICS} holds fewer rows than the checkpoint counted"
    return ckpt, ""


def run_status(run_dir: Path) -> str | None:
    """The status in run_dir's summary.json; None when there is none (or it cannot be read)."""
    try:
        return json.loads((Path(run_dir) / SUMMARY).read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def _earlier_attempt(run_dir: Path) -> bool:
    """Whether run_dir holds metrics, a summary or a checkpoint of an earlier attempt."""
    return any((Path(run_dir) / name).exists() for name in (METRICS, SUMMARY, CHECKPOINT))


def _start_over(run_dir: Path) -> None:
    """Remove what an earlier attempt left that a new one would append to or be confused by:
    metrics.jsonl, summary.json and the checkpoint."""
    run_dir = Path(run_dir)
    (run_dir / METRICS).unlink(missing_ok=True)
    (run_dir / SUMMARY).unlink(missing_ok=True)
    shutil.rmtree(checkpoint_dir(run_dir), ignore_errors=True)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl ([] when it has none yet). A run killed mid-write can
    leave half a last line: it is skipped, with a warning; a bad line before it is an error naming
    the file and line."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:
                print(f"warning: {path}: line {i + 1} is incomplete; skipped")
                continue
            raise ValueError(f"{path}: line {i + 1} is not JSON: {err}") from None
    return rows


def resume_files(run_dir: Path, lines: int) -> bool:
    """Ready run_dir to continue an earlier attempt: metrics.jsonl cut to its first `lines` rows
    (the rows a checkpoint had counted), summary.json removed. False, and nothing changed, when
    metrics.jsonl holds fewer complete rows."""
    path = Path(run_dir) / METRICS
    rows = (path.read_text(encoding="utf-8") if path.exists() else "").split("\n")[:-1]
    if len(rows) < lines:  # rows[:-1]: what follows the last newline is no complete row
        return False
    atomic.atomic_write(path, "".join(f"{r}\n" for r in rows[:lines]))
    (Path(run_dir) / SUMMARY).unlink(missing_ok=True)
    return True
