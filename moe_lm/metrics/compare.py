"""`moe-lm compare`: a markdown table and plots that put finished runs side by side.

Reads only what every run leaves in its directory (summary.json, metrics.jsonl, config.yaml), so runs from
different machines or checkouts compare as long as they have those files. Runs whose configs differ only in
the seed (and in run/wandb naming) form a group that gets an extra mean ± std row: that is how a router
comparison separates a real difference from seed noise.
"""

from __future__ import annotations

import copy
import json
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter
from omegaconf import OmegaConf

RUN_FILES = ("summary.json", "metrics.jsonl", "config.yaml")
NOT_IN_GROUP_KEY = ("run", "wandb", "train.seed", "train.resume", "train.resume_weights_only")
"""Config keys that may differ between seeds of one experiment."""
COLUMNS: tuple[tuple[str, str, Callable[[float], str]], ...] = (
    ("val ppl", "val_ppl", "{:.2f}".format),
    ("load CV", "moe/load_cv_mean", "{:.3f}".format),
    ("max/mean", "moe/max_over_mean_mean", "{:.2f}".format),
    ("collapse rate", "moe/collapse_rate", "{:.3f}".format),
    ("token entropy", "moe/token_entropy", "{:.3f}".format),
    ("tokens/s", "tokens_per_s", "{:,.0f}".format),
    ("MFU", "mfu", "{:.2%}".format),
)
"""(header, key in summary.json — else the last value in metrics.jsonl, format) of each table column."""
LINESTYLES = ("-", "--", ":", "-.")


class NotARunError(FileNotFoundError):
    """A folder given to compare is not a finished run: missing, without one of `RUN_FILES`, or with a
    summary.json that is not a run's. The message names the folder and what is wrong."""


@dataclass
class Run:
    """One run directory, read."""

    label: str
    dir: Path
    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    config: dict[str, Any]

    def value(self, key: str) -> float | None:
        """Final value of `key`: summary.json's, else the last one logged in metrics.jsonl, else None."""
        if key in self.summary:
            return self.summary[key]
        series = _series(self.rows, key)
        return series[1][-1] if series[1] else None

    def group_key(self) -> str:
        """The config without the keys seeds of one experiment may differ in (`NOT_IN_GROUP_KEY`)."""
        config = copy.deepcopy(self.config)
        for dotted in NOT_IN_GROUP_KEY:
            *parents, leaf = dotted.split(".")
            node = config
            for parent in parents:
                node = node.get(parent, {})
            node.pop(leaf, None)
        return json.dumps(config, sort_keys=True)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if i == len(lines):  # a run killed mid-write leaves a partial last line
                break
            raise ValueError(f"{path}:{i} is not JSON: {exc}") from exc
    return rows


def load_run(run_dir: Path, label: str) -> Run:
    """Read a run directory; a missing folder or file raises `NotARunError` naming the folder and the file."""
    if not run_dir.is_dir():
        raise NotARunError(f"run dir {run_dir}: " + ("is a file, not a run folder" if run_dir.exists()
                                                      else "no such folder (nor is it a wandb run path)"))
    missing = [name for name in RUN_FILES if not (run_dir / name).is_file()]
    if missing:
        unfinished = " (a run writes summary.json when it finishes)" if missing == ["summary.json"] else ""
        raise NotARunError(f"run dir {run_dir}: missing {', '.join(missing)}{unfinished}; a run directory needs "
                           f"{', '.join(RUN_FILES)}")
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise NotARunError(f"run dir {run_dir}: summary.json is not JSON ({exc})") from exc
    if not isinstance(summary, dict) or "router" not in summary:
        raise NotARunError(f"run dir {run_dir}: summary.json has no 'router'")
    config = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=False)
    return Run(label, run_dir, summary, _read_jsonl(run_dir / "metrics.jsonl"), config)


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[Any]]:
    """(steps, values) of `key`, sorted by step; a step logged twice (resumed run) keeps its last value."""
    by_step = {row["step"]: row[key] for row in rows if key in row}
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _tokens_at(run: Run, steps: list[int]) -> np.ndarray:
    """Tokens seen at each of `steps`, interpolated from the rows that carry `tokens` (and the summary)."""
    known = {0: 0, **dict(zip(*_series(run.rows, "tokens")))}
    if "steps" in run.summary and "tokens" in run.summary:
        known.setdefault(run.summary["steps"], run.summary["tokens"])
    xs = sorted(known)
    return np.interp(steps, xs, [known[x] for x in xs])


def _mean_std(values: list[float], fmt: Callable[[float], str]) -> str:
    if len(values) < 2:
        return fmt(values[0]) if values else "–"
    return f"{fmt(statistics.fmean(values))} ± {fmt(statistics.stdev(values))}"


def _table(runs: list[Run], groups: list[list[Run]]) -> list[str]:
    header = ["run", "router", "seed"] + [c[0] for c in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        cells = [run.label, str(run.summary["router"]), str(run.config.get("train", {}).get("seed", "–"))]
        cells += ["–" if (v := run.value(key)) is None else fmt(v) for _, key, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    for group in groups:
        if len(group) < 2:
            continue
        cells = [" + ".join(r.label for r in group), str(group[0].summary["router"]),
                 f"mean ± std ({len(group)} seeds)"]
        cells += [_mean_std([v for r in group if (v := r.value(key)) is not None], fmt) for _, key, fmt in COLUMNS]
        lines.append("| " + " | ".join(f"**{c}**" for c in cells) + " |")
    return lines


def _style(groups: list[list[Run]]) -> dict[str, dict[str, Any]]:
    """One colour per group (seeds of one experiment), one line style per run within it."""
    style = {}
    for g, group in enumerate(groups):
        for i, run in enumerate(group):
            style[run.label] = {"color": f"C{g % 10}", "linestyle": LINESTYLES[i % len(LINESTYLES)]}
    return style


def _new_figure(width: float, height: float) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def _line_plot(path: Path, series: Sequence[tuple[str, dict[str, Any], Any, Any]], title: str, xlabel: str,
               ylabel: str, x_engineering: bool = False) -> None:
    fig, ax = _new_figure(8, 5)
    for label, style, xs, ys in series:
        ax.plot(xs, ys, label=label, marker="o" if len(xs) < 30 else None, markersize=3, linewidth=1.8, **style)
    if series:
        ax.legend(fontsize=9)
    else:
        ax.text(0.5, 0.5, "no data in metrics.jsonl", ha="center", va="center", transform=ax.transAxes)
    if x_engineering:
        ax.xaxis.set_major_formatter(EngFormatter())
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    fig.savefig(path)


def _heatmap(path: Path, run: Run, shares_LE: np.ndarray, step: int) -> None:
    """Layers × experts of the load share; white = the uniform share 1/E, blue under, red over."""
    num_layers, num_experts = shares_LE.shape
    fig, ax = _new_figure(min(max(6.0, 0.5 * num_experts + 2.5), 18), min(max(3.0, 0.4 * num_layers + 1.8), 14))
    uniform = 1 / num_experts
    norm = TwoSlopeNorm(vmin=0, vcenter=uniform, vmax=max(float(shares_LE.max()), 2 * uniform))
    image = ax.imshow(shares_LE, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
    fig.colorbar(image, ax=ax).set_label(f"load share f_e\n(white = uniform 1/{num_experts})")
    if num_layers * num_experts <= 256:
        for (layer, expert), share in np.ndenumerate(shares_LE):
            ax.text(expert, layer, f"{share:.2f}", ha="center", va="center", fontsize=9,
                    color="white" if abs(share - uniform) > 0.6 * (norm.vmax - uniform) else "black")
    if num_experts <= 32:
        ax.set_xticks(range(num_experts))
    if num_layers <= 32:
        ax.set_yticks(range(num_layers))
    ax.set(title=f"{run.label} ({run.summary['router']}): expert load at step {step}", xlabel="expert",
           ylabel="MoE layer")
    fig.savefig(path)


def _labels(run_dirs: list[Path]) -> list[str]:
    """Directory names, made unique and file-name safe."""
    labels: list[str] = []
    for run_dir in run_dirs:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", run_dir.resolve().name) or "run"
        label, n = base, 1
        while label in labels:
            n += 1
            label = f"{base}-{n}"
        labels.append(label)
    return labels


WANDB_RUN_PATH = re.compile(r"^[\w.-]+/[\w.-]+/[\w-]+$")
"""entity/project/run_id, as wandb prints it."""


def fetch_wandb_run(path: str, dest: Path, api: Any = None) -> Path:
    """Materialise an online wandb run as a run directory (config.yaml, summary.json, metrics.jsonl) in `dest`."""
    if api is None:
        import wandb

        api = wandb.Api()
    run = api.run(path)
    dest.mkdir(parents=True, exist_ok=True)
    config = OmegaConf.create(dict(run.config))
    (dest / "config.yaml").write_text(OmegaConf.to_yaml(config), encoding="utf-8")
    summary = {k: v for k, v in dict(run.summary).items() if not k.startswith("_")}
    summary.setdefault("router", OmegaConf.select(config, "model.moe.router.name"))
    (dest / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    with open(dest / "metrics.jsonl", "w", encoding="utf-8") as out:
        for row in run.scan_history():
            step = row.get("_step")
            out.write(json.dumps({"step": step, **{k: v for k, v in row.items() if not k.startswith("_")}}) + "\n")
    return dest


def resolve_runs(runs: Sequence[str | Path], out_dir: Path) -> list[Path]:
    """Run directories as given; wandb run paths (entity/project/id) are fetched into out_dir/wandb_runs/<id>."""
    resolved = []
    for run in runs:
        # a path whose first folder exists here (runs/a/b) is a local path, even if it looks like entity/project/id
        local = Path(run).exists() or Path(str(run).split("/", 1)[0]).is_dir()
        if local or not WANDB_RUN_PATH.match(str(run)):
            resolved.append(Path(run))
        else:
            resolved.append(fetch_wandb_run(str(run), Path(out_dir) / "wandb_runs" / str(run).rsplit("/", 1)[1]))
    return resolved


def compare_runs(run_dirs: Sequence[str | Path], out_dir: Path) -> Path:
    """Write out_dir/compare.md, val_loss.png, load_cv.png and expert_load_<run>.png; return compare.md's path.

    `run_dirs` may also hold wandb run paths (entity/project/run_id) of online runs."""
    if not run_dirs:
        raise ValueError("compare_runs needs at least one run directory")
    run_dirs = resolve_runs(run_dirs, Path(out_dir))
    runs = [load_run(d, label) for d, label in zip(run_dirs, _labels(run_dirs))]
    by_key: dict[str, list[Run]] = {}
    for run in runs:
        by_key.setdefault(run.group_key(), []).append(run)
    groups = list(by_key.values())
    style = _style(groups)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    val_series = []
    for run in runs:
        steps, losses = _series(run.rows, "val/loss")
        if steps:
            val_series.append((run.label, style[run.label], _tokens_at(run, steps), losses))
    _line_plot(out_dir / "val_loss.png", val_series, "Validation loss", "training tokens",
               "validation loss (nats/token)", x_engineering=True)
    cv_series = [(run.label, style[run.label], *_series(run.rows, "moe/load_cv_mean")) for run in runs]
    _line_plot(out_dir / "load_cv.png", [s for s in cv_series if s[2]], "Expert load imbalance", "optimizer step",
               "load CV = std/mean of expert load (mean over layers)")

    plots = ["![validation loss](val_loss.png)", "![load CV](load_cv.png)"]
    for run in runs:
        steps, matrices = _series(run.rows, "moe/load_shares")
        if steps:
            name = f"expert_load_{run.label}.png"
            _heatmap(out_dir / name, run, np.asarray(matrices[-1], dtype=float), steps[-1])
            plots.append(f"![expert load of {run.label}]({name})")
        else:
            plots.append(f"{run.label}: no `moe/load_shares` rows in metrics.jsonl, so no expert-load heatmap.")

    lines = ["# Run comparison", ""]
    lines += [f"- `{run.label}`: {run.dir}" for run in runs]
    lines += ["", *_table(runs, groups), "",
              "Final values from summary.json (else the last logged in metrics.jsonl); MoE columns are "
              "summaries over layers (docs/metrics.md). Bold rows: runs whose configs differ only in the seed, "
              "mean ± sample std.", ""]
    lines += [p for plot in plots for p in (plot, "")]
    path = out_dir / "compare.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
