"""`harness dashboard`: the wandb workspace of a study, built offline with wandb-workspaces; every
key a panel plots is a registered metric, the runs are grouped by keys every run config holds, and
the command says what to install when wandb-workspaces is missing."""

import sys

import pytest

from harness import cli, dashboard
from harness.metrics import METRICS
from harness.rundir import run_labels
from harness.tracking import STEP_METRIC
from tests.runs import quick_config

ws = pytest.importorskip("wandb_workspaces.workspaces")
wr = pytest.importorskip("wandb_workspaces.reports.v2")


def test_workspace_panels_plot_registered_metrics(tmp_path):
    """The workspace has one section per curve family plus the frontier; every line plot draws one
    registered metric against examples_seen, the scatter draws final gen/reward against final
    gen/kl; the runs are the study's group without its summary run, grouped by β and masking.
    It serialises to wandb's view format without a network."""
    w = dashboard.build_workspace("proj", "me", study="default")
    assert (w.entity, w.project, w.name) == ("me", "proj", "DPO default")
    assert [s.name for s in w.sections] == [*dashboard.SECTIONS, dashboard.FRONTIER_SECTION]
    lines = [p for s in w.sections[:-1] for p in s.panels]
    assert all(isinstance(p, wr.LinePlot) and p.x == STEP_METRIC for p in lines)
    plotted = [y for p in lines for y in p.y]
    assert plotted == [m for names in dashboard.SECTIONS.values() for m in names]
    for wanted in ("train/rewards/margins", "eval/rewards/accuracies", "train/logps/chosen",
                   "eval/logps/rejected", "gen/kl"):
        assert wanted in plotted
    (scatter,) = w.sections[-1].panels
    assert isinstance(scatter, wr.ScatterPlot)
    assert (scatter.x, scatter.y) == (wr.SummaryMetric("gen/kl"), wr.SummaryMetric("gen/reward"))
    unknown = sorted({*plotted, scatter.x.name, scatter.y.name} - METRICS.keys())
    assert not unknown, unknown

    filters = str(w.runset_settings.filters)
    assert "Metric(\"Group\") == 'default'" in filters and "!= 'summary'" in filters
    assert [g.name for g in w.runset_settings.groupby] == ["dpo.beta", "labels.masking"]
    model = w._to_model()  # what Workspace.save() sends
    assert model.entity == "me" and model.display_name == "DPO default"

    # The grouping keys are paths into every run's wandb config (config.json's content).
    cfg = quick_config(tmp_path, tmp_path, **{"dpo.beta": 0.3})
    config = {**cfg.to_dict(), "labels": run_labels(cfg)}
    values = []
    for key in dashboard.GROUP_BY:
        node = config
        for part in key.split("."):
            node = node[part]
        values.append(node)
    assert values == [0.3, cfg.dpo.masking]


def test_dashboard_without_a_study_covers_the_project():
    """Without --study every run of the project but the summary runs is in the workspace."""
    w = dashboard.build_workspace("proj", "me")
    assert w.name == "DPO" and "Group" not in str(w.runset_settings.filters)


def test_dry_run_prints_every_panel_and_saves_nothing(capsys, monkeypatch):
    """--dry-run prints each section and each plotted metric; without it the workspace is saved
    (Workspace.save is replaced here: the real one needs a wandb login and the network)."""
    saved = []
    monkeypatch.setattr(ws.Workspace, "save", lambda self: saved.append(self.name))
    monkeypatch.setattr(dashboard, "wandb_logged_in", lambda: True)
    assert cli.main(["dashboard", "--project", "proj", "--entity", "me", "--study", "s",
                     "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("workspace 'DPO s' in me/proj")
    for title, names in dashboard.SECTIONS.items():
        assert f"[{title}]" in out
        for name in names:
            assert f"LinePlot: {name} against {STEP_METRIC}" in out
    assert "ScatterPlot: gen/reward against gen/kl" in out
    assert saved == []
    assert cli.main(["dashboard", "--project", "proj", "--entity", "me", "--study", "s"]) == 0
    assert saved == ["DPO s"]


def test_missing_wandb_workspaces_says_what_to_install(capsys, monkeypatch):
    """Without wandb-workspaces the command exits 2 naming the extra to install."""
    monkeypatch.setitem(sys.modules, "wandb_workspaces", None)  # import fails as if absent
    assert cli.main(["dashboard", "--project", "proj", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "wandb-workspaces" in err and "dpo-harness[dashboard]" in err
    with pytest.raises(dashboard.MissingWorkspaces):
        dashboard.build_workspace("proj", "me")


def test_saving_without_a_login_says_how(capsys, monkeypatch):
    """Without --dry-run and without a wandb login the command exits 2 before building anything,
    naming `wandb login` and --dry-run."""
    monkeypatch.setattr(dashboard, "wandb_logged_in", lambda: False)
    monkeypatch.setattr(ws.Workspace, "save", lambda self: pytest.fail("saved without a login"))
    assert cli.main(["dashboard", "--project", "proj", "--entity", "me"]) == 2
    err = capsys.readouterr().err
    assert "wandb login" in err and "--dry-run" in err
