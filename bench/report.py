"""The results table: printed, and written with the machine facts to
bench/results/content.md."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Row:
    benchmark: str
    ours: float
    baseline: float
    unit: str
    baseline_label: str
    target: float | None = None

    @property
    def ratio(self) -> float:
        return self.ours / self.baseline if self.baseline else float("nan")

    def cells(self) -> list[str]:
        ratio = f"{self.ratio:.2f}"
        if self.target is not None:
            verdict = "met" if self.ratio >= self.target else "NOT met"
            ratio += f" (target >= {self.target:.2f}: {verdict})"
        return [
            self.benchmark,
            f"{self.ours:,.0f} {self.unit}",
            f"{self.baseline:,.0f} {self.unit} ({self.baseline_label})",
            ratio,
        ]


HEADER = ["benchmark", "ours", "baseline", "ratio"]


def table(rows: list[Row]) -> str:
    lines = [HEADER, *(row.cells() for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]

    def render(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [render(HEADER), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out.extend(render(cells) for cells in lines[1:])
    return "\n".join(out)


def cpu_table(
    runs: Iterable[tuple[str, float, Mapping[str, float]]],
    groups: list[str],
    *,
    first_column: str = "run",
    per: str = "op",
) -> str:
    """Where the CPU went in each run (label, rate per second, cores busy per
    process group): cores busy on average, and the server's and PostgreSQL's
    microseconds of CPU per operation."""
    lines = [
        f"| {first_column} | rate | "
        + " | ".join(f"{g} (cores)" for g in groups)
        + f" | server CPU per {per} | postgres CPU per {per} |",
        "|---" * (len(groups) + 4) + "|",
    ]
    for label, rate, cores in runs:
        per_op = [
            f"{cores[g] / rate * 1e6:,.0f} µs" if rate and g in cores else "-"
            for g in ("server", "postgres")
        ]
        cells = [label, f"{rate:,.0f}/s", *(f"{cores.get(g, 0.0):.2f}" for g in groups)]
        lines.append("| " + " | ".join([*cells, *per_op]) + " |")
    return "\n".join(lines)


def write_results(
    path: Path,
    *,
    title: str,
    run: dict[str, str],
    machine: dict[str, str],
    rows: list[Row],
    notes: list[str],
    sections: dict[str, str] | None = None,
) -> None:
    parts = [
        f"# {title}",
        "",
        "Written by `make bench` (`python -m bench`); do not edit by hand.",
        "",
    ]
    parts += ["## Run", ""] + [f"- {key}: {value}" for key, value in run.items()] + [""]
    parts += ["## Machine", ""] + [f"- {key}: {value}" for key, value in machine.items()]
    parts += ["", "## Results", "", table(rows), "", "## Notes", ""]
    parts += [f"- {note}" for note in notes]
    for heading, text in (sections or {}).items():
        parts += ["", f"## {heading}", "", text]
    path.write_text("\n".join(parts) + "\n")
