"""Methods compared on the controlled task: a run's method from its config, the colour each method
is drawn in, the Pareto front of reward against KL, and the best-of-N baseline file.

A method is named from `dpo.loss` (and `dpo.label_smoothing`): sigmoid is DPO (cDPO with label
smoothing above 0), ipo IPO, hinge SLiC (hinge), sft Preferred-FT (SFT on the chosen responses);
any other loss keeps its own name.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.load import in_scope

NAMES = {"sigmoid": "DPO", "ipo": "IPO", "hinge": "SLiC (hinge)", "sft": "Preferred-FT"}
WITHOUT_BETA = {"Preferred-FT"}  # methods whose loss has no β: no β marker or label
BEST_OF_N = "best-of-N"

# Okabe & Ito's colour-blind-safe palette, one fixed colour per known method; other methods take
# the remaining ones in name order.
PALETTE = {"DPO": "#0072B2", "cDPO": "#56B4E9", "IPO": "#009E73", "SLiC (hinge)": "#D55E00",
           "Preferred-FT": "#CC79A7", "DPO + NLL": "#E69F00", BEST_OF_N: "#000000"}
SPARE = ["#F0E442", "#999999", "#882255", "#44AA99", "#117733"]

BEST_OF_N_FILE = Path("baselines") / "best_of_n.csv"  # under results/<study>/
BEST_OF_N_COLUMNS = ["model.name", "n", "reward", "reward_se", "kl", "kl_se", "kl_bound", "kl_kind"]
# The first layout (KL: only the closed-form bound), still read: its kl is the bound.
BEST_OF_N_COLUMNS_V1 = ["model.name", "n", "reward", "reward_se", "kl", "kl_kind"]


def method_of(loss: str | None, label_smoothing: float | None = 0.0,
              sft_weight: float | None = 0.0) -> str:
    """The method a run's `dpo.loss` and `dpo.label_smoothing` stand for (None: the default,
    sigmoid)."""
    loss = "sigmoid" if loss is None or loss != loss else str(loss)
    if loss == "sigmoid" and _positive(label_smoothing):
        return "cDPO"
    name = NAMES.get(loss, loss)
    # dpo.sft_weight adds the chosen NLL (RPO, Pang et al. 2024): DPO + NLL is its own method.
    return f"{name} + NLL" if _positive(sft_weight) and loss != "sft" else name


def _positive(value) -> bool:
    """A number read back by pandas (None or NaN count as unset) that is above zero."""
    return value is not None and value == value and float(value) > 0


def add_method(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` with a `method` column from its `dpo.loss`, `dpo.label_smoothing` and `dpo.sft_weight`
    columns."""
    frame = frame.copy()
    loss = frame["dpo.loss"] if "dpo.loss" in frame else pd.Series(None, index=frame.index, dtype=object)
    eps = frame["dpo.label_smoothing"] if "dpo.label_smoothing" in frame else pd.Series(
        0.0, index=frame.index)
    nll = frame["dpo.sft_weight"] if "dpo.sft_weight" in frame else pd.Series(0.0, index=frame.index)
    frame["method"] = [method_of(a, b, w) for a, b, w in zip(loss, eps, nll, strict=True)]
    return frame


def colours(methods) -> dict[str, str]:
    """A colour per method, in PALETTE's order then by name: the fixed one of PALETTE, else the
    next spare one."""
    known = [m for m in PALETTE if m in set(methods)]
    spare = iter(SPARE)
    out = {m: PALETTE[m] for m in known}
    for m in sorted(set(methods) - set(known)):
        out[m] = next(spare, "#555555")
    return out


def pareto_front(points: pd.DataFrame, x: str = "gen/kl", y: str = "gen/reward") -> pd.DataFrame:
    """The upper-left envelope of `points`: the rows no other row dominates (dominating = KL no
    higher and reward no lower, one of them strictly), sorted by KL. Equal points are both kept."""
    pts = points.dropna(subset=[x, y])
    keep = []
    for i, row in pts.iterrows():
        others = pts.drop(index=i)
        dominated = ((others[x] <= row[x]) & (others[y] >= row[y])
                     & ((others[x] < row[x]) | (others[y] > row[y]))).any()
        if not dominated:
            keep.append(i)
    return pts.loc[keep].sort_values([x, y], kind="stable")


def read_best_of_n(results: Path) -> pd.DataFrame | None:
    """Every study's results/<study>/baselines/best_of_n.csv, with a `study` column; None when no
    study has one. A file whose columns are not exactly BEST_OF_N_COLUMNS is refused by name."""
    frames = []
    for path in sorted(Path(results).glob(f"*/{BEST_OF_N_FILE.as_posix()}")):
        if not in_scope(path, Path(results)):
            continue
        df = pd.read_csv(path)
        if list(df.columns) == BEST_OF_N_COLUMNS_V1:
            df = df.assign(kl_se=float("nan"), kl_bound=df["kl"])[BEST_OF_N_COLUMNS]
        if list(df.columns) != BEST_OF_N_COLUMNS:
            raise ValueError(f"{path}: columns {list(df.columns)}; expected exactly "
                             f"{', '.join(BEST_OF_N_COLUMNS)}")
        df.insert(0, "study", path.parent.parent.name)
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else None


def closest_n(baseline: pd.DataFrame, kl: float) -> pd.Series:
    """The best-of-N row whose KL is closest to `kl` (the smaller N on a tie)."""
    gap = (baseline["kl"] - kl).abs()
    order = pd.DataFrame({"gap": gap, "n": baseline["n"]}).sort_values(["gap", "n"], kind="stable")
    return baseline.loc[order.index[0]]


def compare_fronts(a: pd.DataFrame, b: pd.DataFrame, x: str = "gen/kl", y: str = "gen/reward") -> dict:
    """Front `a` against front `b` (rows with x, y, y_half and examples_seen, as
    analysis.fig_frontier.fronts) over the KL range both cover: from the larger of their smallest
    trained points' KL (the shared SFT reference left out) to the smaller of their largest. At
    every front point's KL k in that range each front's value is its best reward at KL <= k;
    `above` counts the ks where a's value is higher, `separated` those where a's 95% interval lies
    wholly above b's. Returns {range: (lo, hi) or None, n, above, separated, min_gap}."""
    def trained(front):
        return front[front["examples_seen"] > 0] if "examples_seen" in front else front

    ta, tb = trained(a), trained(b)
    if ta.empty or tb.empty:
        return {"range": None, "n": 0, "above": 0, "separated": 0, "min_gap": float("nan")}
    lo, hi = max(ta[x].min(), tb[x].min()), min(ta[x].max(), tb[x].max())
    ks = sorted(k for k in set(ta[x]) | set(tb[x]) if lo <= k <= hi)
    if lo > hi or not ks:
        return {"range": None, "n": 0, "above": 0, "separated": 0, "min_gap": float("nan")}

    def value(front, k):
        row = front[front[x] <= k].sort_values(y).iloc[-1]
        return row[y], row.get("y_half", 0.0)

    gaps, above, separated = [], 0, 0
    for k in ks:
        (va, ha), (vb, hb) = value(a, k), value(b, k)
        gaps.append(va - vb)
        above += va > vb
        separated += (va - ha) > (vb + hb)
    return {"range": (lo, hi), "n": len(ks), "above": above, "separated": separated,
            "min_gap": min(gaps)}
