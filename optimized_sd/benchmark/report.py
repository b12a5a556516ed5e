"""Turn a benchmark run record (`results.BenchRecord`, what results.json holds) into results.md and chart.png.

Pure Python plus matplotlib when it is installed; reading a saved results.json again gives the same
files (`optimized-sd bench --render DIR`)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

from optimized_sd.benchmark import frontier
from optimized_sd.benchmark.results import BenchRecord, Footprint, Machine, ScenarioResult
from optimized_sd.benchmark.scenarios import BASELINE_PEER, CLOSEST_PEERS, OUR_MODES, PEERS
from optimized_sd.memory import planner
from optimized_sd.memory.modes import MODE_ROWS, denoiser_stage_weights

MIB = 2**20


def slug(text: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'; CPU names lose (R), (TM), 'CPU @ 2.9GHz'."""
    text = re.sub(r"\((r|tm|c)\)", "", text, flags=re.IGNORECASE)
    text = re.sub(r"\bcpu\b.*$", "", text, flags=re.IGNORECASE) or text
    text = re.sub(r"@.*$", "", text)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def device_label(machine: Machine) -> str:
    if machine.gpu:
        return slug(machine.gpu)
    return "cpu-" + slug(machine.cpu or "unknown")


def memory_name(record: BenchRecord) -> str:
    """The figure a user compares: allocated VRAM on a GPU, the process' peak RSS on the CPU."""
    return "peak VRAM allocated" if record.cuda else "peak RSS"


def compared_memory(record: BenchRecord, result: ScenarioResult) -> float:
    return result.peak_allocated_mib if record.cuda else result.peak_rss_mib


def num(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def mib(value) -> str:
    return "-" if value is None else f"{value:,.0f}"


def ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    if not rows:
        return []
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def mode_label(result: ScenarioResult) -> str:
    scenario = result.scenario
    if scenario.engine != "ours":
        return scenario.mode
    used = result.mode_used
    if scenario.mode == "auto":
        auto = f"auto@{scenario.budget}" if scenario.budget else "auto"
        return f"{auto} -> {used}" if used else auto
    if used and used != scenario.mode:
        return f"{scenario.mode} (fell back to {used})"
    return scenario.mode


def runs_table(record: BenchRecord) -> list[str]:
    rows = []
    for result in record.results:
        scenario = result.scenario
        if not result.ok:
            reason = result.error or result.user_error or "failed"
            outcome = "does not complete" if result.oom else "failed"
            rows.append([scenario.name, scenario.engine, mode_label(result), f"{outcome}: {reason}"] + [""] * 8)
            continue
        rows.append(
            [
                scenario.name,
                "optimized-sd" if scenario.engine == "ours" else scenario.engine,
                mode_label(result),
                num(result.load_seconds),
                num(result.seconds_per_step, 3),
                num(result.vae_seconds),
                num(result.seconds_per_image),
                mib(result.peak_allocated_mib) if record.cuda else "-",
                mib(result.peak_reserved_mib) if record.cuda else "-",
                mib(result.peak_rss_mib),
                "yes" if result.finite else "**NaN/inf**",
                "-" if not result.host_load else f"{max(result.host_load):.1f}",
            ]
        )
    header = ["scenario", "engine", "mode", "load s", "s/step", "VAE s", "s/image"]
    header += ["peak alloc MiB", "peak reserved MiB", "peak RSS MiB", "finite", "host load"]
    return table(header, rows)


def ok_by_group(record: BenchRecord) -> dict[str, dict[str, ScenarioResult]]:
    """Successful runs by work item (same kind, size and batch), keyed by mode or peer (`auto@budget`)."""
    groups: dict[str, dict[str, ScenarioResult]] = {}
    for result in record.results:
        if result.ok:
            scenario = result.scenario
            groups.setdefault(scenario.group, {})[scenario.mode + (f"@{scenario.budget}" if scenario.budget else "")] = result
    return groups


@dataclass
class Comparison:
    """One of our runs against a diffusers run of the same work: (ours, theirs) pairs."""

    group: str
    ours: str
    peer: str
    memory_mib: tuple[float, float]
    seconds_per_image: tuple[float, float]
    seconds_per_step: tuple[float | None, float | None]


def comparison_rows(record: BenchRecord) -> list[Comparison]:
    """Each of our runs against the diffusers baseline and against the peers doing the same job."""
    rows = []
    for group, runs in ok_by_group(record).items():
        for label, ours in runs.items():
            if ours.scenario.engine != "ours":
                continue
            mode = ours.mode_used or ours.scenario.mode
            for peer in (BASELINE_PEER,) + CLOSEST_PEERS.get(mode, ()):
                theirs = runs.get(peer)
                if theirs is None:
                    continue
                rows.append(
                    Comparison(
                        group=group,
                        ours=label,
                        peer=peer,
                        memory_mib=(compared_memory(record, ours), compared_memory(record, theirs)),
                        seconds_per_image=(ours.seconds_per_image, theirs.seconds_per_image),
                        seconds_per_step=(ours.seconds_per_step, theirs.seconds_per_step),
                    )
                )
    return rows


def comparison_table(record: BenchRecord) -> list[str]:
    rows = []
    for row in comparison_rows(record):
        (m_ours, m_theirs), (t_ours, t_theirs), (s_ours, s_theirs) = row.memory_mib, row.seconds_per_image, row.seconds_per_step
        rows.append(
            [
                row.group,
                row.ours,
                row.peer,
                mib(m_ours),
                mib(m_theirs),
                ratio(m_ours, m_theirs),
                num(s_ours, 3),
                num(s_theirs, 3),
                ratio(s_ours, s_theirs),
                num(t_ours),
                num(t_theirs),
                ratio(t_ours, t_theirs),
            ]
        )
    header = ["work", "ours", "against", f"{memory_name(record)} MiB ours", "theirs", "ratio"]
    header += ["s/step ours", "theirs", "ratio", "s/image ours", "theirs", "ratio"]
    return table(header, rows)


def budget_table(record: BenchRecord) -> list[str]:
    rows = []
    for result in record.results:
        scenario = result.scenario
        if not scenario.budget or scenario.engine != "ours":
            continue
        if not result.ok:
            rows.append([scenario.group, scenario.budget, "-", "-", "-", result.user_error or result.error or "failed"])
            continue
        estimate = result.plan.estimates_mib.get(result.mode_used) if result.plan else None
        budget_mib = result.plan.budget_mib if result.plan else None
        measured = compared_memory(record, result)
        fits = "yes" if budget_mib and measured <= budget_mib else "**no**"
        rows.append([scenario.group, scenario.budget, result.mode_used or "-", mib(estimate), mib(measured), fits])
    header = ["work", "budget", "planner picks", "planner estimate MiB", f"measured {memory_name(record)} MiB", "within budget"]
    return table(header, rows)


def streamed_bytes_per_step(result: ScenarioResult) -> int:
    """Weight bytes copied to the device per UNet call: every block once in a mode that streams the
    denoiser (`MemoryMode.streams_denoiser` in the mode table)."""
    row = MODE_ROWS.get(result.mode_used or "")
    if result.footprint is None or row is None or not row.streams_denoiser:
        return 0
    return result.footprint.unet


# The streaming target: a stream step takes at most 1.2 x the compute/bandwidth bound, max(compute, streamed bytes / bandwidth).
STREAM_BOUND_FACTOR = 1.2


def stream_bound(compute: float | None, result: ScenarioResult, gbps: float) -> tuple[float, float | None]:
    """(seconds to copy the run's streamed bytes, the compute/bandwidth bound max(compute, that) or
    None when neither is known); compute is `full` mode's step time, where nothing moves."""
    transfer = streamed_bytes_per_step(result) / (gbps * 1e9)
    return transfer, max(compute or 0.0, transfer) or None


def transfer_table(record: BenchRecord) -> list[str]:
    """The streaming target: stream step time <= 1.2 x max(compute time, streamed bytes / bandwidth),
    where compute time is `full` mode's step time (nothing moves)."""
    bandwidth = record.machine.bandwidth
    if not record.cuda or not bandwidth:
        return []
    gbps = bandwidth.best_gbps
    rows = []
    for group, runs in ok_by_group(record).items():
        full = runs.get("full")
        compute = full.seconds_per_step if full else None
        for label, result in runs.items():
            if result.scenario.engine != "ours" or result.seconds_per_step is None:
                continue
            moved = streamed_bytes_per_step(result)
            transfer, bound = stream_bound(compute, result, gbps)
            target = "-"
            if result.mode_used == "stream" and bound:
                target = "met" if result.seconds_per_step <= STREAM_BOUND_FACTOR * bound else "**missed**"
            rows.append(
                [
                    group,
                    label,
                    num(result.seconds_per_step, 4),
                    num(compute, 4),
                    f"{moved / 2**30:.2f}",
                    num(transfer, 4),
                    num(bound, 4),
                    ratio(result.seconds_per_step, bound),
                    target,
                ]
            )
    header = ["work", "mode", "s/step", "compute s/step (full)", "GiB moved/step", "transfer s", "bound s", "step/bound"]
    header += ["stream <= 1.2x bound"]
    return [f"Host-to-device bandwidth (pinned, {bandwidth.bytes / 2**30:.0f} GiB copy): best {gbps:.1f} GB/s, "
            f"median {bandwidth.median_gbps:.1f} GB/s.", ""] + table(header, rows)


GPU_MEMORY_TARGETS = (
    # (mode, what, limit): peaks in GiB (2^30 bytes: "GB" as the planner parses it)
    ("stream", "peak allocated <= 0.8 GB", 0.8),
    ("turbo", "peak allocated <= 2.2 GB", 2.2),
    ("split", "peak allocated <= 1.6 GB", 1.6),
)
TURBO_STEP_FACTOR = 1.05  # turbo keeps the whole UNet resident: its step time is within 5% of `full`


def targets_table(record: BenchRecord) -> list[str]:
    """The GPU memory and speed targets of our modes, checked on each measured work item (CUDA only)."""
    if not record.cuda:
        return []
    gbps = record.machine.bandwidth.best_gbps if record.machine.bandwidth else None
    rows = []
    for group, runs in ok_by_group(record).items():
        full = runs.get("full")
        for mode, what, limit in GPU_MEMORY_TARGETS:
            run = runs.get(mode)
            if run is None:
                continue
            peak = run.peak_allocated_mib / 1024
            rows.append([group, mode, what, f"{peak:.2f} GB", "met" if peak <= limit else "**missed**"])
        turbo, stream = runs.get("turbo"), runs.get("stream")
        full_step = full.seconds_per_step if full else None
        if turbo and full_step and turbo.seconds_per_step is not None:
            value = turbo.seconds_per_step / full_step
            met = "met" if value <= TURBO_STEP_FACTOR else "**missed**"
            rows.append([group, "turbo", f"s/step <= {TURBO_STEP_FACTOR}x full", f"{value:.2f}x", met])
        if stream and full_step and gbps and stream.seconds_per_step is not None:
            _, bound = stream_bound(full_step, stream, gbps)
            value = stream.seconds_per_step / bound
            met = "met" if value <= STREAM_BOUND_FACTOR else "**missed**"
            rows.append([group, "stream", f"s/step <= {STREAM_BOUND_FACTOR}x max(compute, bytes/bandwidth)", f"{value:.2f}x", met])
    return table(["work", "mode", "target", "measured", ""], rows)


def resident_weights(footprint: Footprint, stage: str, mode: str | None) -> int:
    """Weight bytes on the device while `stage` runs in `mode`, as the mode table says (the planner's
    view; an unknown mode counts the stage's own part)."""
    row = MODE_ROWS.get(mode or "")
    if row is not None and row.resident == "everything":
        return footprint.total
    if stage == "unet":
        if row is None:
            return footprint.unet
        return denoiser_stage_weights(
            row,
            total=footprint.total,
            whole=footprint.unet,
            largest_half=max(footprint.unet_halves),
            largest_block_pair=footprint.largest_block_pair,
        )
    return footprint.vae_decoder if stage == "vae_decode" else footprint.vae_encoder


@dataclass
class CalibrationRow:
    """Measured activation memory of one stage of one of our runs."""

    scenario: str
    mode: str | None
    stage: str
    family: str
    image_pixels: int
    peak_allocated_mib: float
    resident_weights_mib: float
    activation_mib: float
    elements_per_pixel: float


def calibration_rows(record: BenchRecord) -> list[CalibrationRow]:
    """Measured activation memory of each stage = peak allocated - resident weights, per latent pixel
    per image in the UNet micro-batch (UNet) or per image pixel (VAE), in elements of the dtype."""
    if not record.cuda:
        return []
    rows = []
    for result in record.results:
        scenario, fp = result.scenario, result.footprint
        if not result.ok or scenario.engine != "ours" or fp is None:
            continue
        image_pixels = scenario.height * scenario.width
        latent_pixels_in_cfg_batch = (scenario.height // 8) * (scenario.width // 8) * scenario.batch * 2
        for stage, divisor in (("unet", latent_pixels_in_cfg_batch), ("vae_decode", image_pixels), ("vae_encode", image_pixels)):
            figures = result.stages.get(stage)
            if figures is None:
                continue
            resident = resident_weights(fp, stage, result.mode_used)
            activation = figures.peak_allocated_mib * MIB - resident
            rows.append(
                CalibrationRow(
                    scenario=scenario.name,
                    mode=result.mode_used,
                    stage=stage,
                    family=fp.family,
                    image_pixels=image_pixels,
                    peak_allocated_mib=figures.peak_allocated_mib,
                    resident_weights_mib=resident / MIB,
                    activation_mib=activation / MIB,
                    elements_per_pixel=activation / fp.dtype_bytes / divisor,
                )
            )
    return rows


def planner_constant(row: CalibrationRow) -> float | None:
    """The planner's constant for a calibration row's stage, family, mode and size."""
    if row.stage == "unet":
        chunked = row.mode is not None and planner.chunks_feed_forward(row.mode)
        return planner.unet_elements_per_latent_pixel(row.family, chunked)
    if row.stage == "vae_decode":
        return planner.decode_elements_per_pixel(row.image_pixels)
    return planner.VAE_ENCODE_ELEMENTS_PER_PIXEL if row.stage == "vae_encode" else None


def calibration_table(record: BenchRecord) -> list[str]:
    out = []
    for row in calibration_rows(record):
        constant = planner_constant(row)
        out.append(
            [
                row.scenario,
                row.mode or "-",
                row.stage,
                mib(row.peak_allocated_mib),
                mib(row.resident_weights_mib),
                mib(row.activation_mib),
                f"{row.elements_per_pixel:,.0f}",
                f"{constant:,.0f}" if constant is not None else "-",
            ]
        )
    if not out:
        return []
    header = ["scenario", "mode", "stage", "peak alloc MiB", "resident weights MiB", "activations MiB"]
    header += ["measured elements/pixel", "planner constant"]
    note = [
        "UNet: elements per latent pixel per image in the UNet micro-batch (CFG doubles the batch); VAE: per image "
        "pixel, one image at a time. The planner constant is the family's (`planner.UNET_ACTIVATIONS`), times its "
        "chunked feed-forward share in stream; the decode's grows past 768x768.",
        "",
    ]
    return note + table(header, out)


def stages_table(record: BenchRecord) -> list[str]:
    rows = []
    for result in record.results:
        if not result.ok:
            continue
        for stage, figures in result.stages.items():
            rows.append(
                [
                    result.scenario.name,
                    stage,
                    num(figures.seconds),
                    num(figures.seconds_per_step, 3),
                    mib(figures.peak_allocated_mib) if record.cuda else "-",
                    mib(figures.peak_reserved_mib) if record.cuda else "-",
                    mib(figures.peak_rss_mib),
                ]
            )
    return table(["scenario", "stage", "seconds", "s/step", "peak alloc MiB", "peak reserved MiB", "peak RSS MiB"], rows)


def machine_line(machine: Machine) -> str:
    parts = [f"CPU {machine.cpu} ({machine.cpu_count or '?'} cores, torch threads {machine.torch_threads or '?'})"]
    parts.append(f"{machine.ram_gib:.1f} GiB RAM")
    if machine.gpu:
        parts.append(f"GPU {machine.gpu} ({machine.vram_gib or 0:.1f} GiB, CUDA {machine.cuda})")
    else:
        parts.append("no GPU")
    return "; ".join(parts)


def render_markdown(record: BenchRecord) -> str:
    machine, settings, model = record.machine, record.settings, record.model
    device = machine.gpu or f"CPU ({machine.cpu})"
    lines = [f"# optimized-sd bench: {device}, {record.date}", ""]
    lines += [
        f"- Command: `{record.command}`",
        f"- Machine: {machine_line(machine)}",
        f"- Software: torch {machine.torch}, transformers {machine.transformers}, "
        f"diffusers {machine.diffusers or 'not installed'}, accelerate {machine.accelerate or 'not installed'}, "
        f"Python {machine.python}",
        f"- Date: {record.started}; whole run {num(record.wall_seconds, 0)} s "
        f"(model {'built' if model.built else 'reused from the cache'} in {num(model.seconds, 0)} s)",
        f"- Model: {model.description or '?'}, {model.file_bytes / 2**30:.2f} GiB file; compute {settings.dtype}"
        + (f"; ours stores its weights as {settings.weights} (`--weights`)" if settings.weights else ""),
        f"- Settings: DDIM, {settings.steps} steps (img2img: strength {settings.strength}), CFG {settings.scale}, "
        f"seed {settings.seed}, attention {settings.attention}, {settings.warmup} warm-up run(s), "
        f"then {settings.repeat} measured (times of the fastest, highest peaks); every scenario in its own process. "
        "Peaks are per process: VRAM from "
        "torch.cuda.max_memory_allocated/reserved, RSS from getrusage (whole process, loading included). "
        "Host load: the 1-minute load average around the run (the run itself adds about its thread count); "
        "a higher figure means other work shared the CPU and the timings are pessimistic.",
        "",
    ]
    if record.partial:
        lines += ["> partial: the run stopped before every scenario had finished; these are the ones that did.", ""]
    for note in record.notes:
        lines.append(f"> {note}")
    if record.notes:
        lines.append("")
    lines += ["## Runs", ""] + runs_table(record)
    lines += frontier.frontier_sections(record) + frontier.capped_section(record)
    comparison = comparison_table(record)
    if comparison:
        lines += ["## optimized-sd against diffusers", "", "Ratios are ours / theirs: below 1 is better for us.", ""]
        lines += comparison
    optional_sections = (
        ("Which mode fits the budget", budget_table),
        ("GPU memory and speed targets", targets_table),
        ("Streaming against its bound", transfer_table),
        ("Planner calibration (memory/planner.py constants)", calibration_table),
    )
    for title, section in optional_sections:
        rows = section(record)
        if rows:
            lines += [f"## {title}", ""] + rows
    lines += ["## Per stage", ""] + stages_table(record)
    if record.chart:
        lines += ["## Chart", "", f"![peak memory against seconds per image]({record.chart})", ""]
    elif record.chart_note:
        lines += [f"Chart: {record.chart_note}", ""]
    return "\n".join(lines).rstrip() + "\n"


def render_chart(record: BenchRecord, path: Path) -> str | None:
    """Peak memory against seconds per image, one labelled point per mode and peer, one panel per
    work item. Returns None when written, else why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed, so no chart was drawn (pip install matplotlib, then `optimized-sd bench --render DIR`)"
    groups = ok_by_group(record)
    if not groups:
        return "no successful run to plot"
    count = len(groups)
    columns = min(count, 2)
    rows = -(-count // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(6.5 * columns, 4.8 * rows), squeeze=False)
    colours = {mode: plt.cm.tab10(i) for i, mode in enumerate(OUR_MODES + ("auto",) + tuple(PEERS))}
    for axis, (group, runs) in zip(axes.flat, groups.items()):
        for result in runs.values():
            scenario = result.scenario
            ours = scenario.engine == "ours"
            memory = compared_memory(record, result)
            axis.scatter(
                result.seconds_per_image,
                memory,
                marker="o" if ours else "^",
                s=70,
                color=colours.get(scenario.mode, "grey"),
                edgecolors="black",
                zorder=3,
            )
            label = mode_label(result)
            axis.annotate(label, (result.seconds_per_image, memory), textcoords="offset points", xytext=(6, 5), fontsize=8)
        axis.set_title(f"{group} ({record.settings.steps} steps)")
        axis.set_xlabel("seconds per image")
        axis.set_ylabel(f"{memory_name(record)} (MiB)")
        axis.grid(True, alpha=0.3)
        axis.set_xlim(0, max(r.seconds_per_image for r in runs.values()) * 1.35 or 1)
        axis.set_ylim(0, max(compared_memory(record, r) for r in runs.values()) * 1.2 or 1)
    for axis in list(axes.flat)[count:]:
        axis.axis("off")
    device = record.machine.gpu or "CPU"
    figure.suptitle(f"optimized-sd (circles) and diffusers (triangles) on {device}", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return None


def write_json(record: BenchRecord, path: Path) -> None:
    path.write_text(json.dumps(record.to_json(), indent=2, default=str) + "\n")


def write_outputs(record: BenchRecord, folder: Path) -> list[Path]:
    """results.json, chart.png (when matplotlib is there) and results.md in `folder`; the record
    learns whether a chart was drawn (or why not)."""
    folder.mkdir(parents=True, exist_ok=True)
    chart = folder / "chart.png"
    note = render_chart(record, chart)
    record.chart = chart.name if note is None else None
    record.chart_note = note
    record.frontier_chart = frontier.write_frontier_chart(record, folder)
    record.partial = False
    write_json(record, folder / "results.json")
    (folder / "results.md").write_text(render_markdown(record))
    written = [folder / "results.md", folder / "results.json"]
    return written + ([chart] if note is None else []) + ([folder / record.frontier_chart] if record.frontier_chart else [])


def write_partial(record: BenchRecord, folder: Path) -> None:
    """results.json so far (no chart): a run killed part-way still leaves its finished scenarios."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json(replace(record, partial=True), folder / "results.json")
