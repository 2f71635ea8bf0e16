"""Run reports: a markdown summary with PNG plots of the metrics, written into the run folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["read_metrics", "write_pretrain_report"]


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; a line cut short by a hard kill is dropped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text("utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, label in (("loss", "total"), ("loss_mim", "MIM (L1, masked pixels)"), ("loss_hie", "hierarchy BCE")):
        ax1.plot(steps, [r[key] for r in rows], label=label)
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot(steps, [r["lr"] for r in rows], color="tab:gray")
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("learning rate")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out.with_name(".tmp-" + out.name)
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, out)


def write_pretrain_report(run_dir: Path, skipped: dict[str, int]) -> Path:
    """Write `report.md` and `loss.png` from `metrics.jsonl`."""
    rows = read_metrics(run_dir / "metrics.jsonl")
    lines = ["# Pretraining report", ""]
    if rows:
        _plot(rows, run_dir / "loss.png")
        first, last = rows[0], rows[-1]
        lines += ["![loss](loss.png)", "", "| | first logged | last |", "|---|---|---|"]
        for key in ("step", "loss", "loss_mim", "loss_hie", "lr", "images_per_s", "outside_share"):
            lines.append(f"| {key} | {first.get(key, float('nan')):.4g} | {last.get(key, float('nan')):.4g} |")
    else:
        lines.append("No metrics were logged.")
    lines += ["", f"Skipped images: {skipped.get('unreadable', 0)} unreadable, "
                  f"{skipped.get('near-empty', 0)} near-empty files (listed in skipped_files*.csv)."]
    out = run_dir / "report.md"
    tmp = out.with_name(".tmp-report.md")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    return out
