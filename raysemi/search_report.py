"""The end of a search: leaderboard (printed and CSV), best_config.yaml, the best checkpoint and
plots (validation Dice per trial coloured by strategy, best Dice per strategy, parameter
importance from Optuna)."""

from __future__ import annotations

import csv
import math
import shutil
import warnings
from pathlib import Path
from typing import Any

from raysemi.config import TrainConfig, from_dict, save_yaml
from raysemi.search_space import Dist, at_base_config, trial_values
from raysemi.trainable import METRIC, TIME_ATTR


def trial_rows(results, max_iterations: int) -> list[dict[str, Any]]:
    """One row per trial: best reported validation Dice, its HD95, status and searched values."""
    rows = []
    for r in results:
        df = r.metrics_dataframe
        last = r.metrics or {}
        method, values = trial_values(r.config) if r.config else ("?", {})
        best_dice, best_hd95, best_it, curve = float("nan"), float("nan"), 0, []
        if df is not None and METRIC in df:
            ok = df[df.get("diverged", 0) == 0] if "diverged" in df else df
            curve = list(zip(ok[TIME_ATTR].tolist(), ok[METRIC].tolist()))  # validations only
            if len(ok):
                i = ok[METRIC].idxmax()
                best_dice = float(ok.loc[i, METRIC])
                best_hd95 = float(ok.loc[i, "val/hd95"]) if "val/hd95" in ok else float("nan")
                best_it = int(ok.loc[i, TIME_ATTR])
        if r.error is not None:
            status, reason = "failed", str(r.error).strip().splitlines()[-1][:300] if str(r.error).strip() else "error"
        elif last.get("diverged"):
            status, reason = "failed", str(last.get("failure_reason", "diverged"))
        elif int(last.get(TIME_ATTR, 0)) < max_iterations:
            status, reason = "stopped_early", ""
        else:
            status, reason = "completed", ""
        rows.append({"trial_id": last.get("trial_id", Path(r.path).name if r.path else "?"), "method": method,
                     "status": status, "best_val_dice": best_dice, "val_hd95_at_best": best_hd95,
                     "best_iteration": best_it, "iterations": int(last.get(TIME_ATTR, 0)), "failure_reason": reason,
                     "values": values, "curve": curve, "result": r})
    ok = [row for row in rows if row["status"] != "failed" and not math.isnan(row["best_val_dice"])]
    ok.sort(key=lambda row: -row["best_val_dice"])
    failed = [row for row in rows if row not in ok]
    ranked = ok + failed
    for i, row in enumerate(ranked, 1):
        row["rank"] = i if row in ok else ""
    return ranked


def write_leaderboard(rows: list[dict[str, Any]], path: Path) -> list[str]:
    params = sorted({k for row in rows for k in row["values"]})
    header = ["rank", "trial_id", "method", "status", "best_val_dice", "val_hd95_at_best", "best_iteration",
              "iterations"] + params + ["failure_reason", "at_base_config"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for row in rows:
            w.writerow([row["rank"], row["trial_id"], row["method"], row["status"], f"{row['best_val_dice']:.6g}",
                        f"{row['val_hd95_at_best']:.6g}", row["best_iteration"], row["iterations"]]
                       + [row["values"].get(p, "") for p in params]
                       + [row["failure_reason"], str(row.get("at_base_config", False)).lower()])
    return params


def format_leaderboard(rows: list[dict[str, Any]], limit: int = 20) -> str:
    lines = [f"{'rank':>4}  {'strategy':<31}{'status':<14}{'val dice':>9}{'hd95':>9}{'iter':>7}  searched values"]
    for row in rows[:limit]:
        vals = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row["values"].items())
        if row.get("at_base_config"):
            vals = f"{vals}  (base config)"
        if row["failure_reason"]:
            vals = f"{vals}  [{row['failure_reason'][:80]}]"
        lines.append(f"{row['rank']!s:>4}  {row['method']:<31}{row['status']:<14}{row['best_val_dice']:>9.4f}"
                     f"{row['val_hd95_at_best']:>9.2f}{row['iterations']:>7}  {vals}")
    if len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more in leaderboard.csv")
    return "\n".join(lines)


def strategy_colors(methods) -> dict[str, tuple]:
    """One colour per strategy, by its place among the registered ones: the same in every plot of
    every search (mean teacher is always the same colour)."""
    import matplotlib.pyplot as plt

    from raysemi.methods import list_methods

    order = list_methods()
    return {m: plt.cm.tab10((order.index(m) if m in order else len(order) + i) % 10) for i, m in enumerate(methods)}


def plot_curves(rows, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({r["method"] for r in rows})
    colors = strategy_colors(methods)
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        if r["curve"]:
            x, y = zip(*r["curve"])
            ax.plot(x, y, color=colors[r["method"]], alpha=0.8, marker="." if len(x) < 30 else None)
    for m in methods:
        ax.plot([], [], color=colors[m], label=m)
    ax.set(xlabel="iteration", ylabel="validation Dice", title="Validation Dice per trial")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_best_per_strategy(rows, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({r["method"] for r in rows})
    colors = strategy_colors(methods)  # as in the curves' plot
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(methods)), 4.5))
    for i, m in enumerate(methods):
        vals = [r["best_val_dice"] for r in rows if r["method"] == m and r["status"] != "failed"
                and not math.isnan(r["best_val_dice"])]
        ax.scatter([i] * len(vals), vals, alpha=0.6, color=colors[m])
        if vals:
            ax.bar(i, max(vals), alpha=0.25, color=colors[m])
    ax.set_xticks(range(len(methods)), methods, rotation=20, ha="right", fontsize=8)
    ax.set(ylabel="best validation Dice", title="Best Dice per strategy (bars) and per trial (dots)")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def param_importances(rows, spaces: dict[str, dict[str, Dist]]) -> dict[str, dict[str, float]]:
    """Optuna's parameter importances (its default evaluator: PED-ANOVA in Optuna 5) per strategy
    and of the strategy choice, from finished trials."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    def dist(d: Dist):
        if d.type == "choice":
            return CategoricalDistribution(list(d.values))
        if d.type == "int":
            return IntDistribution(int(d.low), int(d.high), step=int(d.step or 1), log=d.log)
        return FloatDistribution(d.low, d.high, log=d.type == "loguniform", step=d.step)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    done = [r for r in rows if r["status"] != "failed" and not math.isnan(r["best_val_dice"])]
    out: dict[str, dict[str, float]] = {}
    groups = {m: [r for r in done if r["method"] == m] for m in spaces}
    if len([m for m in spaces if groups[m]]) > 1:
        groups["strategy"] = done
    for m, trials in groups.items():
        if len(trials) < 2:
            continue
        study = optuna.create_study(direction="maximize")
        for r in trials:
            if m == "strategy":
                params, dists = {"method": r["method"]}, {"method": CategoricalDistribution(list(spaces))}
            else:
                params = {k: v for k, v in r["values"].items() if k in spaces[m]}
                dists = {k: dist(spaces[m][k]) for k in params}
            try:
                trial = optuna.trial.create_trial(params=params, distributions=dists, value=r["best_val_dice"])
            except ValueError:  # a value outside the space (a search continued after its files changed): left out
                continue
            study.add_trial(trial)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                imp = optuna.importance.get_param_importances(study)
        except (RuntimeError, ValueError, ZeroDivisionError):  # e.g. all values equal
            continue
        if any("Parameter importances will be equal" in str(w.message) for w in caught):
            continue  # too few (or tied) trials for PED-ANOVA: equal importances, which tell nothing
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        out[m] = {k: float(v) for k, v in imp.items()}
    return out


def plot_importances(importances: dict[str, dict[str, float]], path: Path) -> Path | None:
    if not importances:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(importances), figsize=(4.2 * len(importances), 3.6), squeeze=False)
    for ax, (m, imp) in zip(axes[0], importances.items()):
        names = list(imp)[::-1]
        ax.barh(names, [imp[n] for n in names])
        ax.set(title=m, xlabel="importance")
        ax.tick_params(axis="y", labelsize=8)
    fig.suptitle("Parameter importance (Optuna's default evaluator)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def summarize(results, base: TrainConfig, methods: list[str], spaces: dict[str, dict[str, Dist]],
              exp_dir: Path) -> dict[str, Any]:
    """Write leaderboard.csv, best_config.yaml, best_checkpoint.pt and plots/; print the table."""
    rows = trial_rows(results, base.max_iterations)
    for row in rows:
        row["at_base_config"] = at_base_config(row["values"], base.to_dict())
    exp_dir.mkdir(parents=True, exist_ok=True)
    write_leaderboard(rows, exp_dir / "leaderboard.csv")
    counts = {s: sum(r["status"] == s for r in rows) for s in ("completed", "stopped_early", "failed")}
    print(f"\nleaderboard ({len(rows)} trials: {counts['completed']} completed, {counts['stopped_early']} "
          f"stopped early by ASHA, {counts['failed']} failed), ranked by best validation Dice:")
    print(format_leaderboard(rows))
    artifacts = [exp_dir / "leaderboard.csv"]
    best = rows[0] if rows and rows[0]["rank"] == 1 else None
    summary: dict[str, Any] = {"rows": rows, "counts": counts, "artifacts": artifacts,
                               "best_dice": best["best_val_dice"] if best else float("nan"),
                               "best_method": best["method"] if best else ""}
    if best:
        cfg = from_dict({**base.to_dict(), **best["values"], "method": best["method"], "output": "", "run_name": "",
                         "device": "auto"}, source="best trial").validate(source="best trial")
        save_yaml(cfg, exp_dir / "best_config.yaml")
        artifacts.append(exp_dir / "best_config.yaml")
        ckpt = best["result"].checkpoint
        if ckpt is not None:
            with ckpt.as_directory() as d:
                src = Path(d) / "best_seed0.pt"
                if src.is_file():
                    shutil.copy(src, exp_dir / "best_checkpoint.pt")
                    artifacts.append(exp_dir / "best_checkpoint.pt")
    plots = exp_dir / "plots"
    plots.mkdir(exist_ok=True)
    artifacts.append(plot_curves(rows, plots / "val_dice_per_trial.png"))
    artifacts.append(plot_best_per_strategy(rows, plots / "best_dice_per_strategy.png"))
    imp = plot_importances(param_importances(rows, spaces), plots / "param_importance.png")
    if imp is not None:
        artifacts.append(imp)
    else:
        print("parameter importance: not plotted, too few finished trials of a strategy to tell its parameters "
              "apart")
    return summary
