"""Running the CLI in-process the way a user meets it: exit status, stdout and stderr."""

from __future__ import annotations

from optimized_sd.cli import main


def run_cli(capsys, *args: object) -> tuple[int, str, str]:
    """Run `optimized-sd ARGS`; returns (exit status, stdout, stderr)."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as done:
        code = done.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err
