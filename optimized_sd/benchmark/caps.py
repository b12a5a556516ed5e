"""Hard memory caps for the frontier benchmark: pure arithmetic (no torch), so it is tested with a fake
device total; the worker measures the real figures and applies the cap.

A budget is what a card of that size offers a user. On CUDA a card's memory also holds the CUDA context
(driver state, loaded kernels, library handles), which PyTorch's caching allocator never sees; so the
allocator is limited to the budget minus the context, as the fraction of the device's total that
`torch.cuda.set_per_process_memory_fraction` takes. On the CPU a budget caps the process' resident set
(RSS), the interpreter and its libraries included: the allocator cannot be limited there, so a
watchdog stops the run when its RSS passes the budget. In both cases our `auto` plans for what is
left after the context (or the RSS before loading), as a user on that card would."""

from __future__ import annotations

from dataclasses import dataclass, replace

import psutil

from optimized_sd.errors import UserError

MIB = 2**20
NO_BUDGET = "none"  # the uncapped column of the frontier

CUDA_FRACTION = "cuda-fraction"
CPU_RSS = "cpu-rss"
UNCAPPED = "none"


class BudgetTooSmall(Exception):
    """The budget leaves nothing to run in (the context alone fills it): the run does not complete.
    `facts`: what was seen, for the record."""

    def __init__(self, message: str, facts: CapFacts) -> None:
        super().__init__(message)
        self.facts = facts


class BudgetAboveDevice(Exception):
    """The budget is more than this device has: it cannot stand in for that card."""


@dataclass(frozen=True)
class CapFacts:
    """How one run was held to its budget, and what it saw (MiB). `context_mib`: on CUDA the memory
    outside PyTorch's allocator after start-up (the CUDA context and libraries), on the CPU the RSS
    before loading; `allocatable_mib`: what the run may allocate besides that (and our planner's
    budget); `fraction`: the argument of set_per_process_memory_fraction; `context_after_mib`: the
    context again after the run (it grows as kernels load)."""

    kind: str
    budget_mib: float | None
    device_total_mib: float | None = None
    total_source: str | None = None  # "nvml" or "mem_get_info" (CUDA), "meminfo" (CPU)
    context_mib: float = 0.0
    allocatable_mib: float | None = None
    fraction: float | None = None
    context_after_mib: float | None = None

    @property
    def allocatable_bytes(self) -> int | None:
        return None if self.allocatable_mib is None else int(self.allocatable_mib * MIB)


def parse_budget(text: str) -> int | None:
    """'2GB' -> bytes; 'none' -> None (no cap)."""
    from optimized_sd.memory.planner import parse_bytes

    return None if text.strip().lower() == NO_BUDGET else parse_bytes(text)


def parse_budgets(text: str) -> list[str]:
    """--budget's comma list, each checked, in the order given (duplicates dropped)."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise UserError("--budget is empty; give sizes like 2GB or 0.6GB,1GB,none")
    for name in names:
        parse_budget(name)
    return list(dict.fromkeys(NO_BUDGET if n.lower() == NO_BUDGET else n for n in names))


def largest_first(budgets: list[str]) -> list[str]:
    """Budgets from the roomiest (none) down: a configuration that runs out of memory at one budget
    need not be run at the smaller ones."""
    return sorted(budgets, key=lambda name: -(parse_budget(name) or float("inf")))


def cuda_cap(budget: int, device_total: int, context: int) -> CapFacts:
    """The cap of a `budget`-byte card on a device of `device_total` bytes whose CUDA context takes
    `context` bytes: the allocator may hold budget - context, i.e. that fraction of the total."""
    if device_total <= 0:
        raise ValueError("device_total must be above zero")
    if budget > device_total:
        raise BudgetAboveDevice(f"the budget of {budget / MIB:,.0f} MiB is more than this device's {device_total / MIB:,.0f} MiB")
    allocatable = budget - context
    seen = CapFacts(kind=CUDA_FRACTION, budget_mib=budget / MIB, device_total_mib=device_total / MIB, context_mib=context / MIB)
    if allocatable <= 0:
        raise BudgetTooSmall(f"the budget of {budget / MIB:,.0f} MiB is filled by the CUDA context alone ({context / MIB:,.0f} MiB)", seen)
    return replace(seen, allocatable_mib=allocatable / MIB, fraction=allocatable / device_total)


def cpu_cap(budget: int, ram_total: int, baseline_rss: int) -> CapFacts:
    """The cap of a `budget`-byte machine for a process that already holds `baseline_rss` bytes
    (interpreter and libraries): the run may add budget - baseline_rss."""
    if budget > ram_total:
        raise BudgetAboveDevice(f"the budget of {budget / MIB:,.0f} MiB is more than this machine's {ram_total / MIB:,.0f} MiB of RAM")
    allocatable = budget - baseline_rss
    seen = CapFacts(
        kind=CPU_RSS, budget_mib=budget / MIB, device_total_mib=ram_total / MIB, total_source="meminfo", context_mib=baseline_rss / MIB
    )
    if allocatable <= 0:
        raise BudgetTooSmall(
            f"the budget of {budget / MIB:,.0f} MiB is filled by the interpreter and its libraries alone "
            f"({baseline_rss / MIB:,.0f} MiB RSS)",
            seen,
        )
    return replace(seen, allocatable_mib=allocatable / MIB)


def over_budget_mib(cap: CapFacts, peak_reserved_mib: float) -> float:
    """How far a CUDA run's device use (its allocator's peak plus the context as it stood after the
    run) went past the budget; 0 when within it. The allocator cap holds the first term to the
    budget minus the starting context, so any excess is context grown during the run."""
    if cap.kind != CUDA_FRACTION or cap.budget_mib is None:
        return 0.0
    context = cap.context_after_mib if cap.context_after_mib is not None else cap.context_mib
    return max(0.0, peak_reserved_mib + context - cap.budget_mib)


def tree_rss(process: psutil.Process) -> int:
    """Resident bytes of a process and all its children (0 for any that is gone): what a run under a RAM cap holds."""
    total = 0
    try:
        children = process.children(recursive=True)
    except psutil.Error:  # the process ended between two samples
        return 0
    for member in [process, *children]:
        try:
            total += member.memory_info().rss
        except psutil.Error:
            pass
    return total
