"""Write evaluation results: a terminal table, JSON, markdown and a PNG of curves and bars."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from retrieval.evaluation import RECALL_LEVELS, RetrievalReport


@dataclass(frozen=True)
class ConfigResult:
    """One configuration's scores and what it cost."""

    name: str
    description: str
    report: RetrievalReport
    seconds: float
    embed_seconds: float

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "config": self.description,
            "seconds": round(self.seconds, 3),
            "embed_seconds": round(self.embed_seconds, 3),
            **self.report.as_dict(),
        }


def _columns(results: Sequence[ConfigResult]) -> tuple[list[str], list[list[str]]]:
    ks = sorted({k for r in results for k in r.report.precision})
    recall_ks = sorted({k for r in results for k in r.report.recall})
    header = ["config", "mAP", "mAP@R", *[f"P@{k}" for k in ks], *[f"R@{k}" for k in recall_ks], "seconds"]
    rows = []
    for r in results:
        rows.append(
            [
                r.name,
                f"{r.report.mean_ap:.4f}",
                f"{r.report.map_at_r:.4f}",
                *[f"{r.report.precision.get(k, float('nan')):.4f}" for k in ks],
                *[f"{r.report.recall.get(k, float('nan')):.4f}" for k in recall_ks],
                f"{r.seconds:.1f}",
            ]
        )
    return header, rows


def format_table(results: Sequence[ConfigResult]) -> str:
    """Return an aligned plain-text table, one row per configuration."""
    header, rows = _columns(results)
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) for line in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown(results: Sequence[ConfigResult], *, title: str, context: Sequence[str] = ()) -> str:
    """Return a markdown document: the summary table, the configurations, per-class AP."""
    header, rows = _columns(results)
    out = [f"# {title}", "", *context, ""] if context else [f"# {title}", ""]
    out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    out += ["", "## Configurations", ""]
    out += [
        f"- **{r.name}**: `{r.description}` (embedding {r.embed_seconds:.1f} s of {r.seconds:.1f} s)" for r in results
    ]
    classes = sorted({c for r in results for c in r.report.per_class_ap})
    if classes:
        out += ["", "## Per-class AP", "", "| class | " + " | ".join(r.name for r in results) + " |"]
        out.append("|" + "---|" * (len(results) + 1))
        for name in classes:
            cells = [f"{r.report.per_class_ap.get(name, float('nan')):.3f}" for r in results]
            out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def write_json(path: Path, payload: dict[str, object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def plot_results(results: Sequence[ConfigResult], path: Path) -> Path:
    """Save precision-recall curves (left) and per-class AP bars (right) of every configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    classes = sorted({c for r in results for c in r.report.per_class_ap})
    palette = plt.get_cmap("tab10" if len(results) <= 10 else "tab20")
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [1, 1.6]})
    for i, r in enumerate(results):
        label = f"{r.name} (mAP {r.report.mean_ap:.3f})"
        curves.plot(RECALL_LEVELS, r.report.pr_curve, marker=".", color=palette(i % palette.N), label=label)
    curves.set(xlabel="recall", ylabel="interpolated precision", title="Precision-recall", xlim=(0, 1), ylim=(0, 1.02))
    curves.grid(alpha=0.3)
    curves.legend(fontsize=7, loc="lower left")
    width = 0.8 / max(len(results), 1)
    positions = np.arange(len(classes))
    for i, r in enumerate(results):
        values = [r.report.per_class_ap.get(c, 0.0) for c in classes]
        bars.bar(positions + i * width - 0.4 + width / 2, values, width, color=palette(i % palette.N), label=r.name)
    bars.set_xticks(positions, classes, rotation=30, ha="right", fontsize=8)
    bars.set(ylabel="average precision", title="AP per class", ylim=(0, 1.02))
    bars.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
