"""Connect to a Ray cluster or start local Ray; the one place that calls ``ray.init``."""

from __future__ import annotations

import os

import ray

from raypets.errors import UserError


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Join the cluster at ``address`` (or ``$RAY_ADDRESS``), else start local Ray; no-op when already connected.

    ``num_cpus`` only applies to a local start: it declares logical CPUs, which may exceed the cores present
    (Ray Data and Ray Train workers each hold a CPU slot; see the resource pitfall in the README).
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, TimeoutError, RuntimeError) as err:
            raise UserError(f"cannot connect to a Ray cluster at {address}: {err}") from None
        return
    ray.init(num_cpus=num_cpus)


def set_progress_bars(enabled: bool) -> None:
    """Show or hide Ray Data's progress bars for the stages this process runs."""
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = enabled
