"""What a benchmark reports: medians and (min–max) of the repeats, Markdown tables, the machine and versions,
and the JSON file under benchmarks/results/."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

from benchmarks.harness import REPO, alternate

RESULTS = REPO / "benchmarks" / "results"


def compare(systems: dict[str, Any], args: Any, work: Path) -> tuple[dict[str, list], dict[str, Any], dict[str, Any]]:
    """The systems' rounds (`harness.alternate`, with the options of `harness.add_run_arguments`); returns the runs,
    their summary and the machine (with its load average before and after)."""
    log = work / "children.log"
    print(f"children's output: {log}", file=sys.stderr)
    info = machine(args.threads)
    runs = alternate(systems, args.repeats, vars(args).get("warmup_rounds", 0), args.threads, log, args.quiet,
                     args.max_wait)
    info["load_average_at_end"] = os.getloadavg()
    return runs, summarize(runs), info


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, dict[str, float]]]:
    """{system: {figure: spread}} over every number its runs reported (the disturbed runs left out)."""
    summary = {}
    for name, results in runs.items():
        if name == "disturbed" or not results:
            continue
        keys = [k for k, v in results[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        summary[name] = {k: spread([r[k] for r in results]) for k in keys}
    return summary


def interference_note(summary: dict[str, Any], runs: dict[str, list[dict[str, Any]]]) -> str:
    worst = max(s["other_cpu_fraction"]["max"] for s in summary.values())
    return (f"Other processes used at most {100 * worst:.0f}% of the CPU during a counted run; "
            f"{len(runs.get('disturbed', []))} disturbed runs were repeated.")


def cell(stats: dict[str, float], fmt: str, scale: float = 1.0) -> str:
    median, low, high = (stats[k] * scale for k in ("median", "min", "max"))
    return f"{median:{fmt}} ({low:{fmt}}–{high:{fmt}})"


def ratio(summary: dict[str, Any], a: str, b: str, key: str) -> float:
    """The median of `key` of system `a` over that of system `b`."""
    return summary[a][key]["median"] / summary[b][key]["median"]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def figure_table(figures: dict[str, Any]) -> str:
    """A two-column table of named figures."""
    return markdown_table(["figure", "value"], [[key, str(value)] for key, value in figures.items()])


def machine(threads: int) -> dict[str, Any]:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "load_average_at_start": os.getloadavg()}


def versions(*packages: str) -> dict[str, Any]:
    """Installed versions (None for a package that is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, Any] = {}
    for package in packages:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def command_line() -> str:
    """How this benchmark was started, as it would be typed from the repository root."""
    script = Path(sys.argv[0]).resolve()
    module = ".".join(script.relative_to(REPO).with_suffix("").parts) if script.is_relative_to(REPO) else script
    return " ".join(["python -m", str(module), *sys.argv[1:]])


def write_results(name: str, payload: dict[str, Any], folder: Path = RESULTS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def publish(name: str, payload: dict[str, Any], table: str) -> Path:
    """Prints `table`, writes `payload` (with the command and the table) to benchmarks/results/NAME.json."""
    path = write_results(name, {"command": command_line(), **payload, "table": table})
    print(table)
    print(f"\nwritten: {path}")
    return path
