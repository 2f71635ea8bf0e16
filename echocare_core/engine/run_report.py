"""Run reports: a markdown summary with PNG plots of the metrics, written into the run folder."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from echocare_core.files import write_atomic

__all__ = ["privacy_spent", "read_metrics", "write_federation_report", "write_pretrain_report"]


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


def _pyplot():  # noqa: ANN202 - matplotlib.pyplot, loaded off-screen and only when a report is written
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path) -> None:  # noqa: ANN001
    write_atomic(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    _pyplot().close(fig)


def _write_text(out: Path, lines: list[str]) -> None:
    write_atomic(out, "\n".join(lines) + "\n")


def _plot(rows: list[dict], out: Path) -> None:
    plt = _pyplot()

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
    _save(fig, out)


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
    lines += [
        "",
        f"Skipped images: {skipped.get('unreadable', 0)} unreadable, "
        f"{skipped.get('near-empty', 0)} near-empty files (listed in skipped_files*.csv).",
    ]
    _write_text(run_dir / "report.md", lines)
    return run_dir / "report.md"


def privacy_spent(history: list[dict]) -> dict[str, dict[str, float]]:
    """Each site's latest reported (epsilon, delta) in a federated run's history: what the model has cost each
    site's data so far."""
    return {
        s["site"]: {"epsilon": s["epsilon"], "delta": s["delta"]} for r in history for s in r["sites"] if "epsilon" in s
    }


def _traffic(rounds: list[dict]) -> str:
    """The run's bytes (tensor bytes): in all, with every site asked (also those refused, left out or late),
    and per site for the replies that were aggregated."""
    to, back = defaultdict(int), defaultdict(int)
    for r in rounds:
        for s in r["sites"]:
            to[s["site"]] += s["bytes_sent"]
            back[s["site"]] += s["bytes_received"]
    total_to = sum(r.get("bytes_to_sites", 0) for r in rounds) or sum(to.values())
    total_back = sum(r.get("bytes_from_sites", 0) for r in rounds) or sum(back.values())
    per_site = ", ".join(f"{site} {to[site] / 1e6:.2f} / {back[site] / 1e6:.2f}" for site in sorted(to))
    return (
        f"Traffic over {len(rounds)} round(s): {total_to / 1e6:.2f} MB to the sites and {total_back / 1e6:.2f} MB "
        f"from them, with every site asked; MB to / from each site in the rounds it was aggregated: {per_site}."
    )


def write_federation_report(run_dir: Path, shared_encoder: bool = False) -> Path:
    """Write `report.md` and `curves.png` from a federated run's `metrics.jsonl` (one line per round).

    The curves show, per site and round, the main validation metric of its task (each site row names it) for
    the global model the site received (`global_`) and for its own update after local training (`local_`),
    with the sample-weighted mean over the sites of each task of the global one; one panel per task.
    `shared_encoder`: a multi-task run, whose checkpoints hold the shared encoder only.
    """
    rounds = read_metrics(run_dir / "metrics.jsonl")
    lines = ["# Federated run report", ""]
    if not rounds:
        _write_text(run_dir / "report.md", lines + ["No round finished."])
        return run_dir / "report.md"
    plt = _pyplot()
    tasks = sorted({(s["task"], s["metric"]) for r in rounds for s in r["sites"]})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4), squeeze=False)
    for ax, (task, main) in zip(axes[0], tasks):
        names = sorted({s["site"] for r in rounds for s in r["sites"] if s["task"] == task})
        for i, name in enumerate(names):
            pts = [(r["round"], s) for r in rounds for s in r["sites"] if s["site"] == name]
            colour = f"C{i % 10}"
            ax.plot(
                [p for p, _ in pts],
                [s.get(f"global_{main}", float("nan")) for _, s in pts],
                "-o",
                color=colour,
                label=f"{name}: global model",
            )
            ax.plot(
                [p for p, _ in pts],
                [s.get(f"local_{main}", float("nan")) for _, s in pts],
                ":",
                color=colour,
                label=f"{name}: after local training",
            )
        mean = [
            (
                r["round"],
                sum(s.get(f"global_{main}", 0.0) * s["num-examples"] for s in group)
                / max(sum(s["num-examples"] for s in group), 1),
            )
            for r in rounds
            if (group := [s for s in r["sites"] if s["task"] == task])
        ]
        ax.plot(
            [m for m, _ in mean], [v for _, v in mean], "k-", linewidth=2, label="global model, sample-weighted mean"
        )
        ax.set_title(task if len(tasks) > 1 else "")
        ax.set_xlabel("round")
        ax.set_ylabel(f"validation {main} (at each site)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, run_dir / "curves.png")
    last = rounds[-1]
    lines += [
        f"{len(rounds)} round(s); the global model after round {last['round']} is in "
        f"`checkpoints/round_{last['round']:04d}` "
        + (
            "(the shared encoder: each site makes its own model from it with its head, `echocare-client model`)."
            if shared_encoder
            else "(loadable by echocare-evaluate and echocare-predict)."
        ),
        "",
        "![learning curves](curves.png)",
        "",
        f"Round {last['round']}, per site (validation split of each site):",
        "",
        "| site | task | samples | train loss | metric | global model | after local training | "
        "epsilon (delta) | MB to site | MB from site |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in last["sites"]:
        spent = f"{s['epsilon']:.3f} ({s['delta']:g})" if "epsilon" in s else "no DP"
        main = s["metric"]
        lines.append(
            f"| {s['site']} | {s['task']} | {s['num-examples']:.0f} | {s.get('train_loss', float('nan')):.4f} "
            f"| {main} | {s.get(f'global_{main}', float('nan')):.4f} | "
            f"{s.get(f'local_{main}', float('nan')):.4f} | {spent} | {s['bytes_sent'] / 1e6:.2f} | "
            f"{s['bytes_received'] / 1e6:.2f} |"
        )
    lines += ["", _traffic(rounds)]
    spent_by_site = privacy_spent(rounds)
    if spent_by_site:
        lines += [
            "",
            "Differential privacy: epsilon each site's data has spent on this run's model: "
            + ", ".join(
                f"{site} {v['epsilon']:.3f} (delta {v['delta']:g})" for site, v in sorted(spent_by_site.items())
            )
            + ". Each site's ledger has its lifetime total (`echocare-client privacy --config site.yaml`).",
        ]
    _write_text(run_dir / "report.md", lines)
    return run_dir / "report.md"
