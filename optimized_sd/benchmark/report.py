"""Turn a benchmark run record (what results.json holds) into results.md and chart.png.

Pure Python plus matplotlib when it is installed; reading a saved results.json again gives the same
files (`optimized-sd bench --render DIR`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from optimized_sd.benchmark.scenarios import BASELINE_PEER, CLOSEST_PEERS, OUR_MODES, PEERS, Scenario
from optimized_sd.memory.modes import MODE_ROWS, denoiser_stage_weights

MIB = 2**20

# Planner constants the calibration section compares with (memory/planner.py); read there at render
# time so the table always shows the values in force.
STAGE_CONSTANTS = {
    "unet": "UNET_ACTIVATION_ELEMENTS_PER_LATENT_PIXEL",
    "vae_decode": "VAE_DECODE_ELEMENTS_PER_PIXEL",
    "vae_encode": "VAE_ENCODE_ELEMENTS_PER_PIXEL",
}


def slug(text: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'; CPU names lose (R), (TM), 'CPU @ 2.9GHz'."""
    text = re.sub(r"\((r|tm|c)\)", "", text, flags=re.IGNORECASE)
    text = re.sub(r"\bcpu\b.*$", "", text, flags=re.IGNORECASE) or text
    text = re.sub(r"@.*$", "", text)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def device_label(machine: dict) -> str:
    if machine.get("gpu"):
        return slug(machine["gpu"])
    return "cpu-" + slug(machine.get("cpu") or "unknown")


def is_cuda(record: dict) -> bool:
    return record.get("machine", {}).get("device_type") == "cuda"


def memory_key(record: dict) -> tuple[str, str]:
    """The figure a user compares: allocated VRAM on a GPU, the process' peak RSS on the CPU."""
    return ("peak_allocated_mib", "peak VRAM allocated") if is_cuda(record) else ("peak_rss_mib", "peak RSS")


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


def scenario_of(result: dict) -> Scenario:
    return Scenario.from_dict(result["scenario"])


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    if not rows:
        return []
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def mode_label(result: dict) -> str:
    scenario = scenario_of(result)
    if scenario.engine == "diffusers":
        return scenario.mode
    used = result.get("mode_used")
    if scenario.mode == "auto":
        auto = f"auto@{scenario.budget}" if scenario.budget else "auto"
        return f"{auto} -> {used}" if used else auto
    if used and used != scenario.mode:
        return f"{scenario.mode} (fell back to {used})"
    return scenario.mode


def runs_table(record: dict) -> list[str]:
    rows = []
    for result in record["results"]:
        scenario = scenario_of(result)
        if not result.get("ok"):
            reason = result.get("error") or result.get("user_error") or result.get("skipped") or "failed"
            rows.append([scenario.name, scenario.engine, mode_label(result), f"failed: {reason}"] + [""] * 8)
            continue
        rows.append(
            [
                scenario.name,
                "optimized-sd" if scenario.engine == "ours" else "diffusers",
                mode_label(result),
                num(result["load_seconds"]),
                num(result["seconds_per_step"], 3),
                num(result["vae_seconds"]),
                num(result["seconds_per_image"]),
                mib(result["peak_allocated_mib"]) if is_cuda(record) else "-",
                mib(result["peak_reserved_mib"]) if is_cuda(record) else "-",
                mib(result["peak_rss_mib"]),
                "yes" if result.get("finite", True) else "**NaN/inf**",
                "-" if not result.get("host_load") else f"{max(result['host_load']):.1f}",
            ]
        )
    header = ["scenario", "engine", "mode", "load s", "s/step", "VAE s", "s/image"]
    header += ["peak alloc MiB", "peak reserved MiB", "peak RSS MiB", "finite", "host load"]
    return table(header, rows)


def ok_by_group(record: dict) -> dict[str, dict[str, dict]]:
    groups: dict[str, dict[str, dict]] = {}
    for result in record["results"]:
        if result.get("ok"):
            scenario = scenario_of(result)
            groups.setdefault(scenario.group, {})[scenario.mode + (f"@{scenario.budget}" if scenario.budget else "")] = result
    return groups


def comparison_rows(record: dict) -> list[dict]:
    """Each of our runs against the diffusers baseline and against the peers doing the same job."""
    key, _ = memory_key(record)
    rows = []
    for group, runs in ok_by_group(record).items():
        for label, ours in runs.items():
            scenario = scenario_of(ours)
            if scenario.engine != "ours":
                continue
            mode = ours.get("mode_used") or scenario.mode
            for peer in (BASELINE_PEER,) + CLOSEST_PEERS.get(mode, ()):
                theirs = runs.get(peer)
                if theirs is None:
                    continue
                rows.append(
                    {
                        "group": group,
                        "ours": label,
                        "peer": peer,
                        "memory": (ours[key], theirs[key]),
                        "seconds_per_image": (ours["seconds_per_image"], theirs["seconds_per_image"]),
                        "seconds_per_step": (ours["seconds_per_step"], theirs["seconds_per_step"]),
                    }
                )
    return rows


def comparison_table(record: dict) -> list[str]:
    _, memory_name = memory_key(record)
    rows = []
    for row in comparison_rows(record):
        (m_ours, m_theirs), (t_ours, t_theirs), (s_ours, s_theirs) = row["memory"], row["seconds_per_image"], row["seconds_per_step"]
        rows.append(
            [
                row["group"],
                row["ours"],
                row["peer"],
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
    header = ["work", "ours", "against", f"{memory_name} MiB ours", "theirs", "ratio"]
    header += ["s/step ours", "theirs", "ratio", "s/image ours", "theirs", "ratio"]
    return table(header, rows)


def budget_table(record: dict) -> list[str]:
    key, memory_name = memory_key(record)
    rows = []
    for result in record["results"]:
        scenario = scenario_of(result)
        if not scenario.budget:
            continue
        if not result.get("ok"):
            rows.append([scenario.group, scenario.budget, "-", "-", "-", result.get("user_error") or result.get("error", "failed")])
            continue
        plan = result.get("plan") or {}
        estimate = (plan.get("estimates_mib") or {}).get(result.get("mode_used"))
        budget_mib = plan.get("budget_mib")
        fits = "yes" if budget_mib and result[key] <= budget_mib else "**no**"
        rows.append([scenario.group, scenario.budget, result.get("mode_used") or "-", mib(estimate), mib(result[key]), fits])
    header = ["work", "budget", "planner picks", "planner estimate MiB", f"measured {memory_name} MiB", "within budget"]
    return table(header, rows)


def streamed_bytes_per_step(result: dict) -> int:
    """Weight bytes copied to the device per UNet call: every block once in a mode that streams the
    denoiser (`MemoryMode.streams_denoiser`)."""
    footprint = result.get("footprint") or {}
    mode = result.get("mode_used")
    return footprint.get("unet", 0) if mode in MODE_ROWS and MODE_ROWS[mode].streams_denoiser else 0


STREAM_BOUND_FACTOR = 1.2  # issue 3: stream step time <= 1.2 x max(compute, streamed bytes / bandwidth)


def stream_bound(compute: float | None, result: dict, gbps: float) -> tuple[float, float | None]:
    """(seconds to copy the run's streamed bytes, issue 3's bound max(compute, that) or None when
    neither is known); compute is `full` mode's step time, where nothing moves."""
    transfer = streamed_bytes_per_step(result) / (gbps * 1e9)
    return transfer, max(compute or 0.0, transfer) or None


def transfer_table(record: dict) -> list[str]:
    """Issue 3's target: stream step time <= 1.2 x max(compute time, streamed bytes / bandwidth),
    where compute time is `full` mode's step time (nothing moves)."""
    bandwidth = (record.get("machine") or {}).get("bandwidth")
    if not is_cuda(record) or not bandwidth:
        return []
    gbps = bandwidth["best_gbps"]
    rows = []
    for group, runs in ok_by_group(record).items():
        full = runs.get("full")
        compute = full["seconds_per_step"] if full else None
        for label, result in runs.items():
            if scenario_of(result).engine != "ours" or result.get("seconds_per_step") is None:
                continue
            moved = streamed_bytes_per_step(result)
            transfer, bound = stream_bound(compute, result, gbps)
            target = "-"
            if result.get("mode_used") == "stream" and bound:
                target = "met" if result["seconds_per_step"] <= STREAM_BOUND_FACTOR * bound else "**missed**"
            rows.append(
                [
                    group,
                    label,
                    num(result["seconds_per_step"], 4),
                    num(compute, 4),
                    f"{moved / 2**30:.2f}",
                    num(transfer, 4),
                    num(bound, 4),
                    ratio(result["seconds_per_step"], bound),
                    target,
                ]
            )
    header = ["work", "mode", "s/step", "compute s/step (full)", "GiB moved/step", "transfer s", "bound s", "step/bound"]
    header += ["stream <= 1.2x bound"]
    return [f"Host-to-device bandwidth (pinned, {bandwidth['bytes'] / 2**30:.0f} GiB copy): best {gbps:.1f} GB/s, "
            f"median {bandwidth['median_gbps']:.1f} GB/s.", ""] + table(header, rows)


ISSUE3_TARGETS = (
    # (mode, what, limit): peaks in GiB (2^30 bytes: "GB" as the planner parses it), times as ratios
    ("stream", "peak allocated <= 0.8 GB", 0.8),
    ("turbo", "peak allocated <= 2.2 GB", 2.2),
    ("split", "peak allocated <= 1.6 GB", 1.6),
)


def targets_table(record: dict) -> list[str]:
    """Issue 3's GPU targets, checked on each measured work item (CUDA only)."""
    if not is_cuda(record):
        return []
    bandwidth = (record.get("machine") or {}).get("bandwidth") or {}
    rows = []
    for group, runs in ok_by_group(record).items():
        full = runs.get("full")
        for mode, what, limit in ISSUE3_TARGETS:
            run = runs.get(mode)
            if run is None:
                continue
            peak = run["peak_allocated_mib"] / 1024
            rows.append([group, mode, what, f"{peak:.2f} GB", "met" if peak <= limit else "**missed**"])
        turbo = runs.get("turbo")
        if turbo and full and full.get("seconds_per_step"):
            value = turbo["seconds_per_step"] / full["seconds_per_step"]
            rows.append([group, "turbo", "s/step <= 1.05x full", f"{value:.2f}x", "met" if value <= 1.05 else "**missed**"])
        stream = runs.get("stream")
        if stream and full and bandwidth.get("best_gbps") and full.get("seconds_per_step"):
            _, bound = stream_bound(full["seconds_per_step"], stream, bandwidth["best_gbps"])
            value = stream["seconds_per_step"] / bound
            rows.append([group, "stream", "s/step <= 1.2x max(compute, bytes/bandwidth)", f"{value:.2f}x", "met" if value <= STREAM_BOUND_FACTOR else "**missed**"])
    return table(["work", "mode", "target (issue 3)", "measured", ""], rows)


def calibration_rows(record: dict) -> list[dict]:
    """Measured activation memory of each stage = peak allocated - resident weights, per latent pixel
    per image in the UNet micro-batch (UNet) or per image pixel (VAE), in elements of the dtype."""
    if not is_cuda(record):
        return []
    rows = []
    for result in record["results"]:
        scenario = scenario_of(result)
        if not result.get("ok") or scenario.engine != "ours" or not result.get("footprint"):
            continue
        fp = result["footprint"]
        mode = result.get("mode_used")
        dtype_bytes = fp["dtype_bytes"]
        cfg_batch = scenario.batch * 2
        latent_pixels = (scenario.height // 8) * (scenario.width // 8)
        # Weights on the device during each stage, as the mode table says (mode_used None: the stage's own part).
        resident_weights = {"unet": fp["unet"], "vae_decode": fp["vae_decoder"], "vae_encode": fp["vae_encoder"]}
        row = MODE_ROWS.get(mode)
        if row is not None:
            resident_weights["unet"] = denoiser_stage_weights(
                row, total=fp["total"], whole=fp["unet"], largest_half=max(fp["unet_halves"]), largest_block_pair=fp["largest_block_pair"]
            )
            if row.resident == "everything":
                resident_weights.update(vae_decode=fp["total"], vae_encode=fp["total"])
        for stage, divisor in (("unet", latent_pixels * cfg_batch), ("vae_decode", scenario.height * scenario.width), ("vae_encode", scenario.height * scenario.width)):
            figures = result["stages"].get(stage)
            if not figures:
                continue
            resident = resident_weights[stage]
            activation = figures["peak_allocated_mib"] * MIB - resident
            rows.append(
                {
                    "scenario": scenario.name,
                    "mode": mode,
                    "stage": stage,
                    "peak_allocated_mib": figures["peak_allocated_mib"],
                    "resident_weights_mib": resident / MIB,
                    "activation_mib": activation / MIB,
                    "elements_per_pixel": activation / dtype_bytes / divisor,
                }
            )
    return rows


def calibration_table(record: dict) -> list[str]:
    rows = calibration_rows(record)
    if not rows:
        return []
    try:
        from optimized_sd.memory import planner

        constants = {stage: getattr(planner, name, None) for stage, name in STAGE_CONSTANTS.items()}
        chunked = getattr(planner, "UNET_ACTIVATION_CHUNKED_FF", 1.0)
    except ImportError:
        constants, chunked = {}, 1.0
    out = []
    for row in rows:
        constant = constants.get(row["stage"])
        if constant is not None and row["stage"] == "unet" and row["mode"] == "stream":
            constant = constant * chunked
        out.append(
            [
                row["scenario"],
                row["mode"] or "-",
                row["stage"],
                mib(row["peak_allocated_mib"]),
                mib(row["resident_weights_mib"]),
                mib(row["activation_mib"]),
                f"{row['elements_per_pixel']:,.0f}",
                f"{constant:,.0f}" if constant is not None else "-",
            ]
        )
    header = ["scenario", "mode", "stage", "peak alloc MiB", "resident weights MiB", "activations MiB"]
    header += ["measured elements/pixel", "planner constant"]
    note = [
        "UNet: elements per latent pixel per image in the UNet micro-batch (CFG doubles the batch); VAE: per image "
        "pixel, one image at a time. The planner's stream figure is the constant times UNET_ACTIVATION_CHUNKED_FF.",
        "",
    ]
    return note + table(header, out)


def stages_table(record: dict) -> list[str]:
    rows = []
    for result in record["results"]:
        if not result.get("ok"):
            continue
        for stage, figures in result["stages"].items():
            per_step = figures["seconds"] / figures["steps"] if figures.get("steps") else None
            rows.append(
                [
                    scenario_of(result).name,
                    stage,
                    num(figures["seconds"]),
                    num(per_step, 3),
                    mib(figures["peak_allocated_mib"]) if is_cuda(record) else "-",
                    mib(figures["peak_reserved_mib"]) if is_cuda(record) else "-",
                    mib(figures["peak_rss_mib"]),
                ]
            )
    return table(["scenario", "stage", "seconds", "s/step", "peak alloc MiB", "peak reserved MiB", "peak RSS MiB"], rows)


def machine_line(machine: dict) -> str:
    parts = [f"CPU {machine.get('cpu', '?')} ({machine.get('cpu_count', '?')} cores, torch threads {machine.get('torch_threads', '?')})"]
    parts.append(f"{machine.get('ram_gib', 0):.1f} GiB RAM")
    if machine.get("gpu"):
        parts.append(f"GPU {machine['gpu']} ({machine.get('vram_gib', 0):.1f} GiB, CUDA {machine.get('cuda')})")
    else:
        parts.append("no GPU")
    return "; ".join(parts)


def render_markdown(record: dict) -> str:
    machine = record.get("machine", {})
    settings = record.get("settings", {})
    model = record.get("model", {})
    device = machine.get("gpu") or f"CPU ({machine.get('cpu', '?')})"
    lines = [f"# optimized-sd bench: {device}, {record.get('date', '?')}", ""]
    lines += [
        f"- Command: `{record.get('command', '?')}`",
        f"- Machine: {machine_line(machine)}",
        f"- Software: torch {machine.get('torch')}, transformers {machine.get('transformers')}, "
        f"diffusers {machine.get('diffusers') or 'not installed'}, accelerate {machine.get('accelerate') or 'not installed'}, "
        f"Python {machine.get('python')}",
        f"- Date: {record.get('started', record.get('date', '?'))}; whole run {num(record.get('wall_seconds'), 0)} s "
        f"(model {'built' if model.get('built') else 'reused from the cache'} in {num(model.get('seconds'), 0)} s)",
        f"- Model: {model.get('description', '?')}, {model.get('file_bytes', 0) / 2**30:.2f} GiB file; "
        f"compute {settings.get('dtype', '?')}",
        f"- Settings: DDIM, {settings.get('steps')} steps (img2img: strength {settings.get('strength')}), CFG {settings.get('scale')}, "
        f"seed {settings.get('seed')}, attention {settings.get('attention')}, {settings.get('warmup')} warm-up run(s), "
        f"then {settings.get('repeat', 1)} measured (times of the fastest, highest peaks); every scenario in its own process. Peaks are per process: VRAM from "
        "torch.cuda.max_memory_allocated/reserved, RSS from getrusage (whole process, loading included). "
        "Host load: the 1-minute load average around the run (the run itself adds about its thread count); "
        "a higher figure means other work shared the CPU and the timings are pessimistic.",
        "",
    ]
    if record.get("partial"):
        lines += ["> partial: the run stopped before every scenario had finished; these are the ones that did.", ""]
    for note in record.get("notes", []):
        lines.append(f"> {note}")
    if record.get("notes"):
        lines.append("")
    lines += ["## Runs", ""] + runs_table(record)
    comparison = comparison_table(record)
    if comparison:
        lines += ["## optimized-sd against diffusers", "", "Ratios are ours / theirs: below 1 is better for us.", ""]
        lines += comparison
    optional_sections = (
        ("Which mode fits the budget", budget_table),
        ("Issue 3 targets", targets_table),
        ("Streaming against its bound", transfer_table),
        ("Planner calibration (memory/planner.py constants)", calibration_table),
    )
    for title, table in optional_sections:
        rows = table(record)
        if rows:
            lines += [f"## {title}", ""] + rows
    lines += ["## Per stage", ""] + stages_table(record)
    if record.get("chart"):
        lines += ["## Chart", "", f"![peak memory against seconds per image]({record['chart']})", ""]
    elif record.get("chart_note"):
        lines += [f"Chart: {record['chart_note']}", ""]
    return "\n".join(lines).rstrip() + "\n"


def render_chart(record: dict, path: Path) -> str | None:
    """Peak memory against seconds per image, one labelled point per mode and peer, one panel per
    work item. Returns None when written, else why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed, so no chart was drawn (pip install matplotlib, then `optimized-sd bench --render DIR`)"
    key, memory_name = memory_key(record)
    groups = ok_by_group(record)
    if not groups:
        return "no successful run to plot"
    count = len(groups)
    columns = min(count, 2)
    rows = -(-count // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(6.5 * columns, 4.8 * rows), squeeze=False)
    colours = {mode: plt.cm.tab10(i) for i, mode in enumerate(OUR_MODES + ("auto",) + tuple(PEERS))}
    for axis, (group, runs) in zip(axes.flat, groups.items()):
        for label, result in runs.items():
            scenario = scenario_of(result)
            ours = scenario.engine == "ours"
            axis.scatter(
                result["seconds_per_image"],
                result[key],
                marker="o" if ours else "^",
                s=70,
                color=colours.get(scenario.mode, "grey"),
                edgecolors="black",
                zorder=3,
            )
            axis.annotate(mode_label(result), (result["seconds_per_image"], result[key]), textcoords="offset points", xytext=(6, 5), fontsize=8)
        axis.set_title(f"{group} ({record.get('settings', {}).get('steps')} steps)")
        axis.set_xlabel("seconds per image")
        axis.set_ylabel(f"{memory_name} (MiB)")
        axis.grid(True, alpha=0.3)
        axis.set_xlim(0, max(r["seconds_per_image"] for r in runs.values()) * 1.35 or 1)
        axis.set_ylim(0, max(r[key] for r in runs.values()) * 1.2 or 1)
    for axis in list(axes.flat)[count:]:
        axis.axis("off")
    device = record.get("machine", {}).get("gpu") or "CPU"
    figure.suptitle(f"optimized-sd (circles) and diffusers (triangles) on {device}", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return None


def write_outputs(record: dict, folder: Path) -> list[Path]:
    """results.json, chart.png (when matplotlib is there) and results.md in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    chart = folder / "chart.png"
    note = render_chart(record, chart)
    record["chart"] = chart.name if note is None else None
    record["chart_note"] = note
    (folder / "results.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    (folder / "results.md").write_text(render_markdown(record))
    written = [folder / "results.md", folder / "results.json"]
    return written + ([chart] if note is None else [])


def write_partial(record: dict, folder: Path) -> None:
    """results.json so far (no chart): a run killed part-way still leaves its finished scenarios."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps({**record, "partial": True}, indent=2, default=str) + "\n")
