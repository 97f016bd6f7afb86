"""``kgpu bench``: benchmarks that print what they measure and write JSON."""

import click


@click.group()
def bench():
    """Measure the compute services and the ring."""
