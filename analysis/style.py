"""One look for every figure: paper-column size, readable fonts, deterministic files."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402

from harness import metrics  # noqa: E402

COLUMN_IN = 3.4  # width of one paper column, inches
FULL_IN = 7.0  # full text width

# Axis labels of the columns that are not metrics; a metric's label comes from harness.metrics.
LABELS = {
    "examples_seen": "examples seen (pairs)",
    "n_params": "parameters (log scale)",
    "dpo.beta": "β",
    "masking": "masking",
    "trial": "trial",
}


def label(name: str) -> str:
    """The axis label of a column: a metric's from the registry (harness.metrics), a split-free pair
    metric's (`loss`, `logratios/margins`: train and validation on one axis) from its registry entry,
    other columns' from LABELS, else the name itself."""
    if name in LABELS:
        return LABELS[name]
    if name in metrics.METRICS:
        return metrics.label(name)
    pair = metrics.PAIR_METRICS.get(name)
    return pair.label if pair else name


def setup() -> None:
    sns.set_theme(context="paper", style="whitegrid", font_scale=0.9)
    plt.rcParams.update({"figure.dpi": 100, "savefig.dpi": 200, "legend.frameon": False,
                         "axes.titlesize": 9, "axes.labelsize": 8, "svg.hashsalt": "dpo-harness"})


def save(fig, out_dir: Path, name: str) -> list[Path]:
    """PNG and PDF with fixed metadata, so the same data gives the same files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    fig.savefig(paths[0], bbox_inches="tight", metadata={"Software": None})
    fig.savefig(paths[1], bbox_inches="tight", metadata={"CreationDate": None, "Creator": None,
                                                         "Producer": None})
    plt.close(fig)
    return paths


class MissingData(Exception):
    """A figure's data is not in these results; the message says what is missing."""
