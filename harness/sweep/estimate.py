"""One cell's row of the study's results table: its status, precision, best trial, parameters
(flagged when at an edge of the cell's range) and the objective estimated over fresh seed reruns
(mean, median, sd, 95% t-interval; diverged, degenerate and failed runs, and runs computed in
another precision than the study's, counted apart, never averaged in).

And adaptive searches (`sweep.target_halfwidth`): a cell's searches beyond `sweep.searches` run
one at a time, each only once every earlier search of the cell has its estimate and the 95%
half-width over them is still above the target, up to `sweep.max_searches`. The decision is read
from the storage alone, so a study continued after a kill, or by another worker, takes the same
one.

`sweep` is a harness.sweep.schedule.Sweep (exp, storage, precision, search_study).
"""

from __future__ import annotations

from typing import Any

from harness import stats
from harness.config import Cell
from harness.sweep import faults
from harness.sweep.status import find_study

NOT_NEEDED = "not needed"  # the status of an adaptive search the target made unnecessary


def cell_row(sweep, cell: Cell) -> dict[str, Any]:
    """The cell's row: status (done, incomplete, failed, no result, not needed), counts, the best
    trial and its parameters, and the estimate over its fresh reruns (`estimate`)."""
    spec = sweep.exp.spec
    search = sweep.search_study(cell)
    trials = search.get_trials(deepcopy=False)
    diverged = [t for t in trials if t.user_attrs.get("outcome") == "diverged"]
    row: dict[str, Any] = {"cell": cell.id, **dict(cell.values), "status": "done", "error": "",
                           "precision": sweep.precision}
    if cell.search is not None:  # one of the cell's independent searches (sweep.searches)
        row["search"] = cell.search
    row.update({
        "trials": sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials),
        "pruned": sum(t.state.name == "PRUNED" for t in trials) - len(diverged),
        "diverged": len(diverged),
        "failed": sum(faults.real_failure(t) for t in trials),
        "objective": spec.objective.metric, "direction": spec.objective.direction,
        "kl_budget": spec.objective.kl_budget, "kl_penalty": spec.objective.kl_penalty,
    })
    if is_extra(spec, cell) and not trials and extra_search_wanted(sweep, cell) is False:
        row["status"] = NOT_NEEDED  # the cell's interval reached the target without it
        return row
    failure = faults.cell_failure(search, spec.max_failures)
    if failure:
        row.update({"status": "failed", "error": failure})
    elif row["trials"] < spec.trials:
        row["status"] = "incomplete"
    if not any(t.state.name == "COMPLETE" for t in trials):
        if row["status"] == "done":  # every trial pruned or diverged: nothing to report
            row.update({"status": "no result", "error": "no trial completed"})
        return row
    seeds = find_study(sweep.storage, f"{search.study_name}/seeds")
    recorded = seeds.user_attrs.get("best_trial") if seeds is not None else None
    best = search.best_trial if recorded is None else next(t for t in trials if t.number == recorded)
    reruns = seeds.get_trials(deepcopy=False) if seeds is not None else []
    done = [t for t in reruns if t.state.name == "COMPLETE"]
    space = sweep.exp.space(cell)
    edges = [f"{k}={e}" for k, v in best.params.items() if k in space and (e := space[k].at_edge(v))]
    row.update({"best_trial": best.number, "search_value": best.value,
                **{f"param/{k}": v for k, v in best.params.items()},
                "at_edge": ";".join(edges),
                "seeds_done": len(done),
                "seeds_diverged": sum(t.user_attrs.get("outcome") == "diverged" for t in reruns),
                "seeds_degenerate": sum(bool(t.user_attrs.get("degenerate")) for t in done)})
    row["degenerate"] = spec.objective.degenerate
    row.update(estimate(best, done, spec.seeds, selected=spec.trials > 1, precision=sweep.precision,
                         keep_degenerate=spec.objective.degenerate == "count"))
    if row["status"] == "done" and len(done) + row["seeds_diverged"] < spec.seeds - 1:
        row["status"] = "incomplete"
    return row


def estimate(best, done: list, seeds: int, selected: bool = True,
              precision: str | None = None, keep_degenerate: bool = False) -> dict[str, Any]:
    """The cell's reported value: from its fresh seed reruns only (never the search trial that
    picked the parameters: its value is biased upward by the selection), degenerate runs left out
    and counted (averaged in, and counted, with `keep_degenerate`). With one trial per cell (`selected` False) nothing was picked, so that trial is
    one more fresh seed and counts too. A study without reruns (seeds: 1) reports its search
    trial, saying so. With the study's `precision` given, a run that computed in another one (or
    recorded none: an older harness) is left out and counted in `other_precision`."""
    def kept(trials: list) -> list:
        return trials if keep_degenerate else [t for t in trials if not t.user_attrs.get("degenerate")]

    counted = kept(done)
    source = "seed reruns"
    if seeds == 1:
        counted, source = [best], "search trial"
    elif not selected:
        counted = kept([best]) + counted
        source = "every seed (one trial: no selection)"
    apart = [precision is not None and t.user_attrs.get("precision") != precision for t in counted]
    other = [t for t, a in zip(counted, apart, strict=True) if a]
    counted = [t for t, a in zip(counted, apart, strict=True) if not a]
    out: dict[str, Any] = {"estimate_from": source, "estimate_n": len(counted),
                           "other_precision": len(other)}
    if counted:
        e = stats.estimate([t.value for t in counted])
        out.update({"objective_mean": e.mean, "objective_median": e.median, "objective_sd": e.sd,
                    "objective_ci_low": e.low, "objective_ci_high": e.high})
    out["run_dirs"] = ";".join(r for t in counted if (r := t.user_attrs.get("run_dir")))
    return out


def is_extra(spec, cell: Cell) -> bool:
    """A search beyond `sweep.searches`: run only when the cell's interval is still too wide."""
    return cell.search is not None and cell.search >= spec.searches


def halfwidth(values: list[float]) -> float:
    """The 95% t-interval's half-width of the mean of `values`; infinite below 2 values."""
    if len(values) < 2:
        return float("inf")
    e = stats.estimate(values)
    return (e.high - e.low) / 2


def earlier_searches(sweep, cell: Cell) -> list[dict[str, Any]] | None:
    """The rows of searches 0..r-1 of search r's cell, or None while one of them is still
    incomplete (its estimate is not final yet)."""
    rows = [cell_row(sweep, Cell(cell.values, r)) for r in range(cell.search or 0)]
    return None if any(r["status"] == "incomplete" for r in rows) else rows


def extra_search_wanted(sweep, cell: Cell) -> bool | None:
    """Whether adaptive search `cell` (is_extra) runs: True when every earlier search of its cell
    has its estimate and the half-width over their fresh reruns exceeds sweep.target_halfwidth;
    False when it does not; None while an earlier one is still incomplete."""
    rows = earlier_searches(sweep, cell)
    if rows is None:
        return None
    values = [r["objective_mean"] for r in rows if r.get("estimate_n")]
    return halfwidth(values) > sweep.exp.spec.target_halfwidth


def opened(sweep, cell: Cell) -> bool:
    """An adaptive search that has begun (any trial in its study) runs to its end."""
    study = find_study(sweep.storage, f"{sweep.exp.study}/{cell.id}")
    return study is not None and len(study.get_trials(deepcopy=False)) > 0
