"""`harness status EXP.yaml`: where a study stands, read from its storage alone, so it works from
any machine while the sweep runs elsewhere. Per cell: search trials done / pruned / failed /
running / queued against the budget, seed reruns, the best value so far with its parameters, and
the workers (host:pid) holding running trials."""

from __future__ import annotations

import datetime as dt
from typing import Any

from harness.config import Experiment
from harness.sweep import faults
from harness.sweep.storage import open_storage


def find_study(storage, name: str):
    """The Optuna study `name`, or None when no worker has created it yet."""
    import optuna

    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:  # not created yet: no worker got to this cell
        return None


def _held(trials, role: str, now: dt.datetime) -> list[str]:
    out = []
    for t in trials:
        if t.state.name != "RUNNING":
            continue
        where = f"slot {t.user_attrs['slot']}" if "slot" in t.user_attrs else \
            f"seed {t.user_attrs.get('seed_offset', '?')}" if role == "seeds" else "no slot yet"
        age = f", {(now - t.datetime_start).total_seconds():.0f}s" if t.datetime_start else ""
        out.append(f"{t.user_attrs.get('worker', 'unclaimed')} ({role} {where}{age})")
    return out


def cell_status(exp: Experiment, storage, cell, now: dt.datetime | None = None) -> dict[str, Any]:
    """One cell's row (see the module docstring)."""
    now = now or dt.datetime.now()
    spec = exp.spec
    row: dict[str, Any] = {"cell": cell.id, "state": "not started", "done": 0, "pruned": 0,
                           "failed": 0, "running": 0, "queued": 0, "budget": spec.trials,
                           "seeds": f"0/{spec.seeds - 1}", "best": None, "params": {},
                           "workers": [], "error": ""}
    search = find_study(storage, f"{exp.study}/{cell.id}")
    trials = search.get_trials(deepcopy=False) if search is not None else []
    if not trials and cell.search is not None and cell.search >= spec.searches:
        row["state"] = "if needed"  # an adaptive search: it runs if the cell's interval is wide
    if not trials:
        return row
    states = [t.state.name for t in trials]
    row.update({"done": states.count("COMPLETE"), "pruned": states.count("PRUNED"),
                "failed": sum(faults.real_failure(t) for t in trials),
                "running": states.count("RUNNING"), "queued": states.count("WAITING"),
                "workers": _held(trials, "search", now)})
    if row["done"]:
        best = search.best_trial
        row.update({"best": best.value, "params": best.params})
    seeds = find_study(storage, f"{exp.study}/{cell.id}/seeds")
    reruns = seeds.get_trials(deepcopy=False) if seeds is not None else []
    row["seeds"] = f"{sum(t.state.name == 'COMPLETE' for t in reruns)}/{spec.seeds - 1}"
    row["workers"] += _held(reruns, "seeds", now)
    row["running"] += sum(t.state.name == "RUNNING" for t in reruns)
    if "failed" in search.user_attrs:
        row.update({"state": "failed", "error": search.user_attrs["failed"]})
    elif row["running"] or row["queued"] or any(t.state.name == "WAITING" for t in reruns):
        row["state"] = "running"
    elif row["done"] + row["pruned"] >= spec.trials:
        settled = sum(t.state.name == "COMPLETE" or t.user_attrs.get("outcome") == "diverged"
                      for t in reruns)
        row["state"] = "done" if settled >= spec.seeds - 1 or not row["done"] else "search done"
    elif trials:
        row["state"] = "paused"  # trials left, none running: no worker is on it now
    return row


def study_status(exp: Experiment, storage_url: str) -> list[dict[str, Any]]:
    storage = open_storage(storage_url, heartbeat=False)
    now = dt.datetime.now()
    return [cell_status(exp, storage, cell, now) for cell in exp.cells]


def render(rows: list[dict[str, Any]], direction: str) -> str:
    """The rows as a text table, a line per holding worker under its cell."""
    head = f"{'cell':<28} {'state':<11} {'trials':>8} {'prun':>4} {'fail':>4} {'run':>3} " \
           f"{'seeds':>5}  best"
    lines = [head, "-" * len(head)]
    for r in rows:
        best = "" if r["best"] is None else f"{r['best']:.4g} " + " ".join(
            f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
            for k, v in r["params"].items())
        lines.append(f"{r['cell']:<28} {r['state']:<11} {r['done']:>3}/{r['budget']:<4} "
                     f"{r['pruned']:>4} {r['failed']:>4} {r['running']:>3} {r['seeds']:>5}  {best}")
        lines += [f"    held by {w}" for w in r["workers"]]
        if r["error"]:
            lines.append(f"    error: {r['error']}")
    lines.append(f"(trials: completed/budget; best: objective, {direction}d, of the search trials)")
    return "\n".join(lines)
