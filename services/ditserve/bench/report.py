"""Results of one scenario: raw samples, a summary, a Markdown table, the machine.

Each scenario returns a `Report`; `write` puts `<name>.json` (samples + summary + machine)
and `<name>.md` (the table, the command and the machine) in the output folder.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Report:
    """What a scenario measured."""

    scenario: str
    """Scenario name (file stem of its outputs)."""
    rows: list[dict[str, Any]]
    """Summary rows, one per variant (the table)."""
    columns: list[tuple[str, str]]
    """(key in a row, column header) of the Markdown table, in order."""
    samples: dict[str, Any] = field(default_factory=dict)
    """Raw measurements, by variant."""
    notes: list[str] = field(default_factory=list)
    """Method and conditions, one sentence each (thread counts, what drives what)."""
    settings: dict[str, Any] = field(default_factory=dict)
    """The scenario's settings as run."""


def spread(values: list[float]) -> dict[str, float]:
    """Median, min, max and interquartile range of repeated measurements."""
    ordered = sorted(values)
    q1, _, q3 = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else (ordered[0],) * 3
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1],
            "q1": q1, "q3": q3, "n": len(ordered)}


def fmt_spread(stats: dict[str, float], scale: float = 1.0, digits: int = 1) -> str:
    """"median [min–max]" for a table cell."""
    m, lo, hi = (stats[k] * scale for k in ("median", "min", "max"))
    return f"{m:.{digits}f} [{lo:.{digits}f}–{hi:.{digits}f}]"


def machine() -> dict[str, Any]:
    """CPU model, cores, torch version and threads: what the figures depend on."""
    import torch

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "python": platform.python_version(),
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")}


def markdown(report: Report) -> str:
    """The table, then the notes."""
    head = "| " + " | ".join(title for _, title in report.columns) + " |"
    rule = "|" + "---|" * len(report.columns)
    body = ["| " + " | ".join(_cell(row.get(key)) for key, _ in report.columns) + " |"
            for row in report.rows]
    notes = [f"- {note}" for note in report.notes]
    return "\n".join([head, rule, *body, "", *notes]).rstrip() + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def write(report: Report, out_dir: str | Path, command: str | None = None) -> tuple[Path, Path]:
    """Writes <scenario>.json and <scenario>.md; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    command = command or "ditserve " + " ".join(sys.argv[1:])
    info = machine()
    data = {"scenario": report.scenario, "command": command, "machine": info,
            "settings": report.settings, "summary": report.rows, "samples": report.samples,
            "notes": report.notes}
    json_path, md_path = out / f"{report.scenario}.json", out / f"{report.scenario}.md"
    json_path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    md_path.write_text(f"### {report.scenario}\n\n`{command}`\n\n{markdown(report)}\n"
                       f"Machine: {_describe(info)}.\n")
    return json_path, md_path


def _describe(info: dict[str, Any]) -> str:
    return (f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}, GPU {info['gpu']}, "
            f"{info['date']}")
