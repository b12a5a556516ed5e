"""The frontier report: at each memory budget, which configurations complete and how fast (tables, the
goals of issue 16, and the chart of seconds per image against budget); and the capped seed workload
against uncapped `full`.

Pure Python plus matplotlib when it is installed; without it the chart is an SVG written here."""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape
from pathlib import Path

from optimized_sd.benchmark.caps import NO_BUDGET, over_budget_mib, parse_budget
from optimized_sd.benchmark.results import BenchRecord, ScenarioResult

OURS = "auto"  # our configuration on the frontier: the planner picks, given the budget
OURS_VS_FASTEST_PEER = 0.8  # goal: at every budget, ours <= 0.8x the fastest peer that also completes
SEED_WORKLOAD_SPEED = 0.9  # goal: the capped seed workload at >= 0.9x the images per second of uncapped `full`


def budget_label(result: ScenarioResult) -> str:
    return result.scenario.budget or NO_BUDGET


def budget_order(label: str) -> float:
    """Smallest budget first, `none` last."""
    value = parse_budget(label)
    return math.inf if value is None else float(value)


@dataclass
class Frontier:
    """One work item's frontier: `runs[configuration][budget label]`, budgets smallest first."""

    group: str
    budgets: list[str]
    configurations: list[str]
    runs: dict[str, dict[str, ScenarioResult]]

    def completed(self, configuration: str, budget: str) -> ScenarioResult | None:
        run = self.runs.get(configuration, {}).get(budget)
        return run if run is not None and run.ok else None

    def peers_run(self, budget: str) -> bool:
        """Whether any peer was run at this budget (a run stopped part-way may have none)."""
        return any(budget in self.runs[c] for c in self.configurations if c != OURS)

    def fastest_peer(self, budget: str) -> ScenarioResult | None:
        done = [r for c in self.configurations if c != OURS and (r := self.completed(c, budget))]
        return min(done, key=lambda r: r.seconds_per_image, default=None)


def frontiers(record: BenchRecord) -> list[Frontier]:
    """The frontier of each work item that has capped runs: our `auto` and every peer, by budget (an
    uncapped run of those configurations is the `none` column)."""
    by_group: dict[str, dict[str, dict[str, ScenarioResult]]] = {}
    capped_groups = {r.scenario.group for r in record.results if r.scenario.budget and r.cap is not None}
    for result in record.results:
        scenario = result.scenario
        on_frontier = scenario.mode == OURS or scenario.engine != "ours"
        if scenario.group in capped_groups and on_frontier:
            by_group.setdefault(scenario.group, {}).setdefault(scenario.mode, {})[budget_label(result)] = result
    out = []
    for group, runs in by_group.items():
        budgets = sorted({label for per in runs.values() for label in per}, key=budget_order)
        configurations = sorted(runs, key=lambda c: (c != OURS, list(runs).index(c)))
        out.append(Frontier(group, budgets, configurations, runs))
    return out


def cell(result: ScenarioResult | None) -> str:
    if result is None:
        return "-"
    if result.ok:
        return f"{result.seconds_per_image:.2f}"
    return "OOM" if result.oom else "failed"


def config_label(configuration: str) -> str:
    return "optimized-sd auto" if configuration == OURS else configuration


def mib(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


def summary_table(frontier: Frontier) -> list[str]:
    """Seconds per image at each budget (rows) for each configuration (columns); OOM where it does not complete."""
    header = ["budget"] + [config_label(c) for c in frontier.configurations]
    rows = [[b] + [cell(frontier.runs[c].get(b)) for c in frontier.configurations] for b in frontier.budgets]
    return markdown_table(header, rows)


def ours_label(result: ScenarioResult) -> str:
    plan = result.plan
    if result.scenario.engine != "ours" or plan is None:
        return "-"
    micro = f", UNet micro-batch {plan.unet_batch}" if plan.unet_batch else ""
    return f"{result.mode_used}{micro}"


def detail_table(frontier: Frontier, cuda: bool) -> list[str]:
    rows = []
    for budget in frontier.budgets:
        for configuration in frontier.configurations:
            result = frontier.runs[configuration].get(budget)
            if result is None:
                continue
            cap = result.cap
            completes = "yes" if result.ok else ("no (OOM)" if result.oom else "failed")
            over = over_budget_mib(cap, result.peak_reserved_mib) if cap is not None and result.ok else 0.0
            rows.append(
                [
                    budget,
                    config_label(configuration),
                    completes,
                    ours_label(result) if result.ok else (result.failure[:90]),
                    f"{result.seconds_per_step:.3f}" if result.ok and result.seconds_per_step is not None else "-",
                    f"{result.seconds_per_image:.2f}" if result.ok else "-",
                    mib(result.peak_allocated_mib) if cuda and result.ok else "-",
                    mib(result.peak_reserved_mib) if cuda and result.ok else "-",
                    mib(result.peak_rss_mib) if result.peak_rss_mib else "-",
                    mib(cap.device_total_mib) if cap else "-",
                    mib(cap.context_mib) if cap else "-",
                    f"**{over:,.0f}**" if over > 0 else "0",
                ]
            )
    context = "CUDA context MiB (start)" if cuda else "RSS before loading MiB"
    header = ["budget", "configuration", "completes", "plan / why not", "s/step", "s/image", "peak alloc MiB", "peak reserved MiB"]
    header += ["peak RSS MiB", "device total seen MiB", context, "over budget MiB"]
    return markdown_table(header, rows)


def goals_table(frontier: Frontier) -> list[str]:
    """Issue 16's goals at each budget: ours completes; ours <= 0.8x the fastest peer that completes;
    at the smallest budget only ours completes."""
    rows = []
    smallest = frontier.budgets[0]
    for budget in frontier.budgets:
        ours = frontier.completed(OURS, budget)
        peer = frontier.fastest_peer(budget)
        if ours and peer:
            ratio = ours.seconds_per_image / peer.seconds_per_image
            verdict = "met" if ratio <= OURS_VS_FASTEST_PEER else "**missed**"
            against = f"{peer.scenario.mode} {peer.seconds_per_image:.2f} s: {ratio:.2f}x ({verdict})"
        elif ours:
            against = "no peer completes" if frontier.peers_run(budget) else "no peer run"
        else:
            against = "-"
        only_ours = "-"
        if budget == smallest and frontier.peers_run(budget):
            only_ours = "met" if ours and peer is None else "**missed**"
        rows.append([budget, "yes" if ours else "**no**", against, only_ours])
    header = [
        "budget",
        "ours completes",
        f"ours / fastest peer that completes (goal <= {OURS_VS_FASTEST_PEER}x)",
        "only ours completes (smallest)",
    ]
    return markdown_table(header, rows)


def frontier_sections(record: BenchRecord) -> list[str]:
    """The frontier's markdown: what a budget means here, then per work item the summary, the goals and the details."""
    found = frontiers(record)
    if not found:
        return []
    if record.cuda:
        meaning = (
            "A budget is a card of that size: PyTorch's allocator is capped with set_per_process_memory_fraction at "
            "(budget - CUDA context) / device total, the context measured after start-up; our `auto` plans for the same "
            "budget - context. `over budget`: peak reserved plus the context after the run, past the budget (context grown "
            "during the run)."
        )
    else:
        meaning = (
            "On the CPU a budget caps the process' resident set (RSS, the interpreter and libraries included): a watchdog "
            "samples it every 5 ms and stops the run when it passes the budget (a run whose getrusage peak passed it between "
            "samples is counted out too); our `auto` plans for the budget minus the RSS before loading."
        )
    lines = ["## Frontier: seconds per image at each memory budget", "", meaning, ""]
    for frontier in found:
        lines += [f"### {frontier.group}", "", "Seconds per image (OOM: does not complete under the cap; -: not run).", ""]
        lines += summary_table(frontier)
        lines += ["Goals:", ""] + goals_table(frontier)
        lines += detail_table(frontier, record.cuda)
    if record.frontier_chart:
        lines += [f"![seconds per image against memory budget]({record.frontier_chart})", ""]
    return lines


# -------------------------------------------------------------------------- the capped seed workload
def capped_against_full(record: BenchRecord) -> list[tuple[ScenarioResult, ScenarioResult | None]]:
    """Each capped run of one of our fixed modes (the seed workload's `turbo` under 2.4 GB) with the
    uncapped `full` run of the same work, when there is one."""
    uncapped = {r.scenario.group: r for r in record.results if r.scenario.mode == "full" and not r.scenario.budget}
    return [
        (r, uncapped.get(r.scenario.group))
        for r in record.results
        if r.scenario.engine == "ours" and r.scenario.mode != OURS and r.scenario.budget
    ]


def images_per_second(result: ScenarioResult | None) -> float | None:
    if result is None or not result.ok or not result.total_seconds:
        return None
    return result.scenario.images / result.total_seconds


def capped_section(record: BenchRecord) -> list[str]:
    pairs = capped_against_full(record)
    if not pairs:
        return []
    rows = []
    for capped, full in pairs:
        ours, theirs = images_per_second(capped), images_per_second(full)
        ratio = ours / theirs if ours and theirs else None
        verdict = "-" if ratio is None else ("met" if ratio >= SEED_WORKLOAD_SPEED else "**missed**")
        rows.append(
            [
                capped.scenario.group,
                f"{capped.scenario.mode} under {capped.scenario.budget}",
                ("completes: " + ours_label(capped)) if capped.ok else ("does not complete: " + capped.failure[:80]),
                "-" if ours is None else f"{ours:.3f}",
                "-" if theirs is None else f"{theirs:.3f}",
                "-" if ratio is None else f"{ratio:.2f}x",
                verdict,
            ]
        )
    header = ["work", "run", "plan", "images/s", "uncapped full images/s", "ratio", f"goal >= {SEED_WORKLOAD_SPEED}x"]
    intro = [
        "## Capped runs against uncapped `full`",
        "",
        "The seed workload (`--seed-workload`: optimizedSD's `--n_samples 10 --n_iter 2 --turbo` at 512x512): the planner "
        "may keep the asked mode by running the UNet on a micro-batch of the CFG batch, or choose a leaner one.",
        "",
    ]
    return intro + markdown_table(header, rows)


# -------------------------------------------------------------------------- the chart
@dataclass
class Line:
    """One configuration's completed runs: (x position, seconds per image)."""

    label: str
    points: list[tuple[float, float]]


def chart_lines(frontier: Frontier) -> tuple[list[Line], list[tuple[float, str]]]:
    """The frontier as lines over an x axis in GB, `none` placed one step right of the largest
    budget; and the x ticks (position, label)."""
    sized = [b for b in frontier.budgets if parse_budget(b) is not None]
    gigabytes = {b: parse_budget(b) / 2**30 for b in sized}
    top = max(gigabytes.values(), default=1.0)
    if NO_BUDGET in frontier.budgets:
        gigabytes[NO_BUDGET] = top * 1.25 + 0.5
    ticks = sorted((x, b) for b, x in gigabytes.items())
    lines = []
    for configuration in frontier.configurations:
        points = [(gigabytes[b], r.seconds_per_image) for b in frontier.budgets if (r := frontier.completed(configuration, b))]
        if points:
            lines.append(Line(config_label(configuration), sorted(points)))
    return lines, ticks


PALETTE = ("#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def svg_chart(title: str, lines: list[Line], ticks: list[tuple[float, str]], y_label: str) -> str:
    """A line chart as SVG text, drawn without any plotting library: axes, ticks, one polyline with
    markers per line, a legend."""
    width, height, left, right, top, bottom = 760, 460, 70, 210, 40, 60
    plot_w, plot_h = width - left - right, height - top - bottom
    xs = [x for x, _ in ticks] or [0.0, 1.0]
    x_min, x_max = 0.0, max(xs) * 1.05
    y_max = max((y for line in lines for _, y in line.points), default=1.0) * 1.1 or 1.0

    def px(x: float) -> float:
        return left + (x - x_min) / (x_max - x_min) * plot_w

    def py(y: float) -> float:
        return top + plot_h - y / y_max * plot_h

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2:.0f}" y="22" text-anchor="middle" font-size="14">{escape(title)}</text>',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="black"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="black"/>',
    ]
    for x, label in ticks:
        out.append(f'<line x1="{px(x):.1f}" y1="{top + plot_h}" x2="{px(x):.1f}" y2="{top + plot_h + 5}" stroke="black"/>')
        out.append(f'<text x="{px(x):.1f}" y="{top + plot_h + 18}" text-anchor="middle">{escape(label)}</text>')
    for i in range(6):
        y = y_max * i / 5
        out.append(f'<line x1="{left - 5}" y1="{py(y):.1f}" x2="{left + plot_w}" y2="{py(y):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 8}" y="{py(y) + 4:.1f}" text-anchor="end">{y:.3g}</text>')
    out.append(f'<text x="{left + plot_w / 2:.0f}" y="{height - 15}" text-anchor="middle">memory budget</text>')
    middle = top + plot_h / 2
    out.append(f'<text x="18" y="{middle:.0f}" text-anchor="middle" transform="rotate(-90 18 {middle:.0f})">{escape(y_label)}</text>')
    for index, line in enumerate(lines):
        colour = PALETTE[index % len(PALETTE)]
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in line.points)
        out.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>')
        out += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5" fill="{colour}"/>' for x, y in line.points]
        legend_y = top + 10 + 18 * index
        legend_x = left + plot_w + 15
        out.append(f'<line x1="{legend_x}" y1="{legend_y}" x2="{legend_x + 20}" y2="{legend_y}" stroke="{colour}" stroke-width="2"/>')
        out.append(f'<text x="{left + plot_w + 40}" y="{legend_y + 4}">{escape(line.label)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write_frontier_chart(record: BenchRecord, folder: Path) -> str | None:
    """Draw frontier.png with matplotlib, else frontier.svg by hand; the file's name, or None when the
    record has no frontier. One panel per work item (the first only in the SVG)."""
    found = frontiers(record)
    if not found:
        return None
    device = record.machine.gpu or f"CPU ({record.machine.cpu})"
    y_label = "seconds per image"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        frontier = found[0]
        lines, ticks = chart_lines(frontier)
        (folder / "frontier.svg").write_text(svg_chart(f"{frontier.group} on {device}", lines, ticks, y_label))
        return "frontier.svg"
    figure, axes = plt.subplots(1, len(found), figsize=(7.5 * len(found), 4.8), squeeze=False)
    for axis, frontier in zip(axes.flat, found):
        lines, ticks = chart_lines(frontier)
        for index, line in enumerate(lines):
            xs, ys = zip(*line.points)
            axis.plot(xs, ys, marker="o", color=PALETTE[index % len(PALETTE)], label=line.label, linewidth=2.5 if index == 0 else 1.5)
        axis.set_xticks([x for x, _ in ticks], [label for _, label in ticks])
        axis.set_xlabel("memory budget (OOM runs are left out of their line)")
        axis.set_ylabel(y_label)
        axis.set_title(f"{frontier.group} ({record.settings.steps} steps) on {device}", fontsize=10)
        axis.set_ylim(bottom=0)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(folder / "frontier.png", dpi=110)
    plt.close(figure)
    return "frontier.png"
