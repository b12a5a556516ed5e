"""Placeholder until the harness lands; replaced by the benchmark work."""

import click


@click.command()
def bench() -> None:
    """Measure memory and speed of every mode (not built yet)."""
    raise click.ClickException("bench is not built yet")
