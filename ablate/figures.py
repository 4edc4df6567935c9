"""Write a study's figures (PDF + PNG) and results tables (LaTeX + Markdown) from results on disk.

    python -m ablate.figures --study default --out paper/figures
    python -m ablate.figures --study runs/default --out paper/figures --no-redundancy
    python -m ablate.figures --study hub-small --storage postgresql://u:p@db/ablate --out paper/hub-small

``--study`` is a study folder or a study name under ``--runs`` (default ``runs/``). The
same results give byte-identical files. Running and waiting trials are left out, so a
study still in progress can be drawn; a figure without enough trials becomes a panel
saying so. The layer-redundancy figure loads each base model once (cached in the study
folder as ``redundancy.json``); ``--no-redundancy`` skips it. Nothing here trains.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from ablate import plots, studyplots
from ablate.errors import UserError, cli
from ablate.fsutil import atomic_write_text, check_writable
from ablate.objective import ObjectiveConfig
from ablate.plots import arm_stats, best_m, human_count
from ablate.preflight import resolve_device
from ablate.redundancy import study_redundancy
from ablate.results import load, open_study, study_dir_info

__all__ = ["make_figures", "resolve_study_dir", "objective_label", "read_curves", "results_table", "main"]

FINISHED = ("complete", "pruned", "fail")


def resolve_study_dir(study: str, runs: str | Path = "runs") -> Path:
    """A study folder from a path or a name under ``runs``; a one-line UserError if neither exists."""
    for candidate in (Path(study).expanduser(), Path(runs).expanduser() / study):
        if (candidate / "study.json").is_file():
            return candidate
    raise UserError(f"no study {study!r}: neither {study} nor {Path(runs) / study} is a study folder with a "
                    "study.json; pass --study PATH to <out>/<study name>, or --runs DIR")


def objective_label(info: dict) -> tuple[str, str, str]:
    """``(axis label, full description, direction)`` of the study's objective, from its ``study.json``."""
    direction = info.get("direction", "minimize")
    spec = info.get("config", {}).get("eval", {}).get("objective", {"kind": "val_loss"})
    try:
        text = ObjectiveConfig.model_validate(spec).describe()
    except (ImportError, ValueError):  # a study.json from another version: show the recorded spec as is
        keys = spec.get("keys")
        text = spec.get("kind", "objective") + (f" of {', '.join(keys)}" if keys else "")
    if text in ("val_loss", "held-out loss"):
        text = "held-out loss (nats/token)"
    better = f"({'lower' if direction == 'minimize' else 'higher'} is better)"
    short = text
    if len(text) > 30:  # an axis label holds ~30 characters per line at column width; captions say the rest
        keys = spec.get("keys") or []
        short = f"mean of {len(keys)} task metrics" if spec.get("kind") == "mean" and keys else spec.get("kind", text)
    return f"{short} {better}", f"{text} {better}", direction


def read_curves(study_dir: Path, trials) -> dict:
    """trial number -> DataFrame of its ``metrics.jsonl`` rows that carry a held-out loss."""
    import pandas as pd

    out = {}
    for number in sorted(int(t) for t in trials):
        path = Path(study_dir) / "trials" / str(number) / "metrics.jsonl"
        if not path.is_file():
            continue
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        frame = pd.DataFrame([r for r in records if r.get("val_loss") is not None], columns=["step", "tokens",
                                                                                            "val_loss"])
        if len(frame):
            out[number] = frame.sort_values("step").reset_index(drop=True)
    return out


def _fmt(x: float, digits: int = 4) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def results_table(df, *, direction: str, bases: list[str] | None = None, score: str = "score"):
    """Per base (in ``bases`` order) and method: m, s, sizes, tokens, score mean with a 95% t-interval
    (or n=1 with one seed), val loss, and notes (unchanged base, best m)."""
    import pandas as pd

    stats = arm_stats(df, "objective")
    rank = {b: i for i, b in enumerate(bases or [])}
    stats = stats.assign(_rank=stats["base"].map(lambda b: rank.get(b, len(rank)))).sort_values(
        ["_rank", "base", "method", "m"], kind="stable")
    losses = arm_stats(df, "val_loss").set_index(["base", "method", "m"])
    best = best_m(df, direction)
    rows = []
    for _, r in stats.iterrows():
        if r["count"] > 1:
            value = f"{_fmt(r['mean'])} [{_fmt(r['lo'])}, {_fmt(r['hi'])}]"
        else:
            value = f"{_fmt(r['mean'])} (n=1)"
        note = []
        dus = r["method"] == "dus"
        if dus and r["m"] == r["n"] / 2:
            note.append("unchanged base")
        if dus and r["m"] == best.get(r["base"]):
            note.append("best m")
        key = (r["base"], r["method"], r["m"])
        loss = losses.loc[key, "mean"] if key in losses.index else math.nan
        rows.append({"base": r["base"], "method": "DUS" if dus else "MoE", "m": str(int(r["m"])) if dus else "-",
                     "s": str(int(r["s"])) if not math.isnan(r["s"]) else "-",
                     "params (total)": human_count(r["params_total"]),
                     "params (active)": human_count(r["params_active"]),
                     "tokens": human_count(r["tokens"]), "seeds": str(int(r["count"])),
                     f"{score} (95% CI)": value, "val loss": _fmt(float(loss)), "note": ", ".join(note)})
    return pd.DataFrame(rows)


def _markdown(table) -> str:
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" if c in ("base", "method", "note") else "---:"
                                                            for c in cols) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
               "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _latex(table, caption: str) -> str:
    align = "".join("l" if c in ("base", "method", "note") else "r" for c in table.columns)
    caption = "".join(TEX_SPECIAL.get(ch, ch) for ch in caption)  # to_latex escapes cells, not the caption
    body = table.to_latex(index=False, escape=True, column_format=align, caption=caption, label="tab:results")
    return "% written by python -m ablate.figures; needs \\usepackage{booktabs}\n" + body


def make_figures(study_dir: str | Path, out: str | Path, *, storage: str | None = None, redundancy: bool = True,
                 device: str = "cpu", rows: int = 32) -> list[Path]:
    """Write every figure and both tables of a study to ``out``; return the written paths."""
    study_dir, out = Path(study_dir), Path(out)
    info = study_dir_info(study_dir)
    name = info.get("name", study_dir.name)
    df = load(study_dir, storage=storage)
    df = df[df["state"].isin(FINISHED)].reset_index(drop=True)  # running / waiting trials are left out
    if df.empty:
        raise UserError(f"study {name!r} in {study_dir} has no finished trials yet; run python -m ablate.study "
                        "first, or wait for its first trial")
    config = info.get("config", {})
    order = [b.get("label") or Path(b["model"].rstrip("/")).name for b in config.get("bases", [])]
    label, description, direction = objective_label(info)
    loss_label = "held-out loss after CPT (nats/token; lower is better)"
    study = open_study(study_dir, info, storage)

    def optuna_figure(title: str, draw):
        if study is None:
            return plots.message_figure(title, "the study's Optuna storage cannot be opened here (trial "
                                        "folders only); pass --storage URL")
        return draw()

    def redundancy_figure():
        try:
            distances = study_redundancy(config, study_dir, rows=rows, device=device)
        except UserError as exc:  # a base that cannot load here must not cost the other figures
            print(f"warning: layer redundancy skipped: {exc}", file=sys.stderr)
            return plots.message_figure("layer redundancy", f"not available: {exc}")
        return plots.redundancy(distances, plots.best_m(df, direction))

    figures = {
        "score_vs_m": lambda: plots.score_vs_m(df, label=label, direction=direction, bases=order),
        "val_loss_vs_m": lambda: plots.score_vs_m(df, column="val_loss", label=loss_label, direction="minimize",
                                                  bases=order),
        "score_vs_params": lambda: plots.score_vs_params(df, label=label, direction=direction, bases=order),
        "loss_curves": lambda: plots.loss_curves(df, read_curves(study_dir, df["trial"]), bases=order),
        "tasks_vs_m": lambda: plots.tasks_vs_m(df, bases=order),
        "study_history": lambda: optuna_figure("optimisation history",
                                               lambda: studyplots.optimization_history(study, label=label)),
        "study_importance": lambda: optuna_figure("parameter importances",
                                                  lambda: studyplots.param_importances(study, label=label)),
        "study_timeline": lambda: optuna_figure("trial timeline", lambda: studyplots.timeline(study)),
    }
    if redundancy:
        figures["redundancy"] = redundancy_figure
    import matplotlib.pyplot as plt

    written = []
    for fig_name, draw in figures.items():  # one at a time: a real study's figures need not all fit in memory
        fig = draw()
        written += plots.save(fig, out / fig_name)
        plt.close(fig)  # Optuna's figures live in pyplot's registry; closing ours is harmless
    table = results_table(df, direction=direction, bases=order)
    caption = f"Study {name}: {description}; mean over seeds with a 95% t-interval, after the same CPT tokens."
    atomic_write_text(out / "results.md", f"**{caption}**\n\n" + _markdown(table))
    atomic_write_text(out / "results.tex", _latex(table, caption))
    return written + [out / "results.md", out / "results.tex"]


@cli
def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m ablate.figures", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write a study's figures (PDF + PNG) and results tables (LaTeX + Markdown).",
        epilog="examples:\n  python -m ablate.figures --study default --out paper/figures\n"
               "  python -m ablate.figures --study runs/default --out /tmp/fig --no-redundancy")
    parser.add_argument("--study", required=True, help="a study folder, or a study name under --runs")
    parser.add_argument("--runs", default="runs", help="folder of study folders (default runs/)")
    parser.add_argument("--storage", default=None, help="Optuna storage URL, when study.json's is redacted or moved")
    parser.add_argument("--out", required=True, help="folder for the figures and tables (created)")
    parser.add_argument("--no-redundancy", action="store_true", help="skip the layer-redundancy figure (it loads "
                        "every base model once; cached in <study>/redundancy.json)")
    parser.add_argument("--device", default="auto", help="device for the redundancy pass: auto, cpu, cuda")
    parser.add_argument("--rows", type=int, default=32, help="held-out rows for the redundancy pass (default 32)")
    args = parser.parse_args(argv)
    if args.rows < 1:
        raise UserError(f"--rows {args.rows}: use at least one held-out row, e.g. --rows 32")
    import matplotlib  # lazy: the backend must be chosen before pyplot is first imported

    matplotlib.use("Agg")  # files only; no display needed
    study_dir = resolve_study_dir(args.study, args.runs)
    check_writable(Path(args.out))  # --out naming a file, or a folder that cannot be written: one line now
    device = resolve_device(args.device) if not args.no_redundancy else "cpu"
    paths = make_figures(study_dir, args.out, storage=args.storage, redundancy=not args.no_redundancy,
                         device=device, rows=args.rows)
    print(f"wrote {len(paths)} files to {args.out}")
    return 0


if __name__ == "__main__":
    main()
