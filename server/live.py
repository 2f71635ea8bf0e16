"""What `echocare-server` shows while a run goes on: a live table of the round in progress, then one table per
finished round and the run's other events (read from `progress.jsonl`; the events are listed in
`echocare_core.federation.coordinator.EVENTS`)."""

from __future__ import annotations

import time

from rich.live import Live
from rich.table import Table

from echocare_core.cli.common import console

__all__ = ["RunView"]


def _round_table(title: str, sites: list[dict]) -> Table:
    """Per site: its task (multi-task runs), samples, steps, train loss, the main validation metric of its task
    for the received and the trained model, the epsilon its data has spent (DP jobs), seconds until its reply,
    MB each way."""
    table = Table(title=title)
    private, multi = any("epsilon" in s for s in sites), len({s["task"] for s in sites}) > 1
    metrics = {s["metric"] for s in sites}
    metric = "" if len(metrics) != 1 else f" {metrics.pop()}"
    for col in (
        "site",
        *(["task"] * multi),
        "samples",
        "steps",
        "loss",
        f"global{metric}",
        f"local{metric}",
        *(["epsilon"] * private),
        "reply s",
        "MB to",
        "MB from",
    ):
        if col == "site":  # names in full, also in an 80-column log
            table.add_column(col, no_wrap=True, min_width=max([len(s["site"]) for s in sites], default=4))
        else:
            table.add_column(col, justify="right")
    for s in sites:
        spent = [f"{s['epsilon']:.2f}" if "epsilon" in s else "no DP"] if private else []
        main, named = s["metric"], "" if metric else f"{s['metric']} "
        table.add_row(
            s["site"],
            *([s["task"]] * multi),
            f"{s['num-examples']:.0f}",
            f"{s.get('train_steps', float('nan')):.0f}",
            f"{s.get('train_loss', float('nan')):.3f}",
            f"{named}{s.get(f'global_{main}', float('nan')):.3f}",
            f"{named}{s.get(f'local_{main}', float('nan')):.3f}",
            *spent,
            f"{s.get('seconds', float('nan')):.1f}",
            f"{s['bytes_sent'] / 1e6:.2f}",
            f"{s['bytes_received'] / 1e6:.2f}",
        )
    return table


class RunView:
    """What `echocare-server` shows: a live table of the round in progress (sites that replied so far, how
    many are still training, time), then one table per finished round and the run's other events."""

    def __init__(self) -> None:
        self.round, self.sites, self.asked, self.left_out, self.t0 = 0, [], 0, 0, 0.0
        self.live = Live(self, console=console, transient=True, refresh_per_second=2)

    def __rich__(self) -> Table:
        waiting = self.asked - len(self.sites) - self.left_out
        return _round_table(
            f"round {self.round}, {time.time() - self.t0:.0f} s: {len(self.sites)} of {self.asked} "
            f"site(s) replied"
            + (f", {self.left_out} refused or left out" if self.left_out else "")
            + (f", waiting for {waiting}" if waiting > 0 else ""),
            self.sites,
        )

    def show(self, event: dict) -> None:
        kind = event["event"]
        if kind == "round_start":
            self.round, self.sites, self.asked, self.left_out = event["round"], [], event["sites"], 0
            self.t0 = event["time"]
            self.live.start()
        elif kind == "reply":
            self.sites.append(event)
        elif kind in ("refused", "rejected"):
            self.left_out += 1
        elif kind in ("round_end", "failed", "done"):
            self.live.stop()
        if kind == "round_end":
            console.print(_round_table(f"round {event['round']} ({event['seconds']:.1f} s)", event["sites"]))
        elif kind == "refused":
            console.print(f"[yellow]round {event['round']}: {event['reason']}[/]")
        elif kind == "rejected":
            console.print(
                f"[yellow]round {event['round']}: the reply of site {event['site']} was left out: {event['reason']}[/]"
            )
        elif kind == "done":
            console.print(f"report: {event['report']}")
        elif kind == "failed":
            console.print(f"[red]run failed: {event['reason']}[/]")
        elif kind == "start":
            after = event["resumed_after"]
            console.print(
                f"federated run started ({event['rounds']} rounds, job hash {event['job_hash']})"
                + (f", resuming after round {after}" if after else "")
            )
