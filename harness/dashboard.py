"""`harness dashboard`: a ready wandb workspace for a study, built with wandb-workspaces.

    harness dashboard --project P [--entity E] [--study S] [--dry-run]

Line plots of the DPO curves against examples seen (reward margins, accuracies, chosen and
rejected log-probs, KL), with runs grouped by β and masking, and the reward-vs-KL frontier as a
scatter of each run's final values. `build_workspace` makes the workspace object without touching
the network; `--dry-run` prints its panels, otherwise it is saved to wandb (a login is needed).
"""

from __future__ import annotations

from typing import Any

from harness import metrics
from harness.tracking import STEP_METRIC, wandb_logged_in

# Section title -> the metrics it plots, one line plot each (every name is in harness.metrics).
SECTIONS: dict[str, list[str]] = {
    "Reward margins": ["train/rewards/margins", "eval/rewards/margins", "eval/logratios/margins"],
    "Accuracies": ["train/rewards/accuracies", "eval/rewards/accuracies", "eval/pref_accuracy"],
    "Log-probs": ["train/logps/chosen", "train/logps/rejected", "eval/logps/chosen",
                  "eval/logps/rejected"],
    "KL and reward": ["gen/kl", "gen/reward"],
}
FRONTIER = ("gen/kl", "gen/reward")  # (x, y): each run's final values, one point per run
FRONTIER_SECTION = "Reward vs KL"
# Run config keys the runs are grouped by: β, and the masking label (harness.rundir.run_labels).
GROUP_BY = ("dpo.beta", "labels.masking")
INSTALL = "pip install 'dpo-harness[dashboard]' (or pip install wandb-workspaces)"


class MissingWorkspaces(ImportError):
    """wandb-workspaces is not installed."""


def _modules():
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
        from wandb_workspaces import expr
    except ImportError as err:
        raise MissingWorkspaces(f"harness dashboard needs wandb-workspaces: {INSTALL}") from err
    return ws, wr, expr


def build_workspace(project: str, entity: str, study: str | None = None) -> Any:
    """The workspace (wandb_workspaces.workspaces.Workspace) for `study`'s runs (its wandb group;
    every run of the project when None), without the study's summary run. No network."""
    ws, wr, expr = _modules()
    sections = [
        ws.Section(name=title, is_open=True, panels=[
            wr.LinePlot(title=metrics.label(name), x=STEP_METRIC, y=[name]) for name in names])
        for title, names in SECTIONS.items()
    ]
    x, y = FRONTIER
    sections.append(ws.Section(name=FRONTIER_SECTION, is_open=True, panels=[
        wr.ScatterPlot(title=f"{y} vs {x} (final values)", x=wr.SummaryMetric(x),
                       y=wr.SummaryMetric(y))]))
    filters = [expr.Metric("JobType") != "summary"]
    if study:
        filters.append(expr.Metric("Group") == study)
    return ws.Workspace(
        entity=entity, project=project, name=f"DPO {study}" if study else "DPO",
        sections=sections, settings=ws.WorkspaceSettings(x_axis=STEP_METRIC),
        runset_settings=ws.RunsetSettings(filters=filters,
                                          groupby=[expr.Config(k) for k in GROUP_BY]))


def axes(panel: Any) -> tuple[str, list[str]]:
    """(x key, y keys) of a line plot or a scatter."""
    if isinstance(panel.y, list):  # a line plot
        return panel.x, list(panel.y)
    return panel.x.name, [panel.y.name]


def describe(workspace: Any) -> str:
    """The workspace's runs, sections and panels, one line each (what --dry-run prints)."""
    rs = workspace.runset_settings
    lines = [f"workspace {workspace.name!r} in {workspace.entity}/{workspace.project}",
             f"runs: {rs.filters}; grouped by {', '.join(GROUP_BY)}"]
    for section in workspace.sections:
        lines.append(f"[{section.name}]")
        for panel in section.panels:
            x, ys = axes(panel)
            lines.append(f"  {type(panel).__name__}: {', '.join(ys)} against {x}")
    return "\n".join(lines)


class NotLoggedIn(RuntimeError):
    """Saving a workspace needs a wandb login."""


def default_entity() -> str:
    """The logged-in user's default wandb entity (asks the server)."""
    import wandb

    require_login()
    entity = wandb.Api().default_entity
    if not entity:
        raise RuntimeError("no default wandb entity: pass --entity, or `wandb login` first")
    return entity


def require_login() -> None:
    """Raise NotLoggedIn, saying what to do, when no wandb API key is available."""
    if not wandb_logged_in():
        raise NotLoggedIn("saving a workspace needs a wandb login: `wandb login` (or set "
                          "WANDB_API_KEY), or print the panels with --dry-run")
