"""Shared fixtures (one local Ray per test session, the quick demo) and the ``ray`` marker.

Every test that uses a fixture of ``RAY_FIXTURES`` (directly or through another fixture) is marked ``ray``, so
``pytest -m "not ray"`` runs the Ray-free tests alone; a test that starts Ray without such a fixture fails.
Shared helpers live in ``helpers.py``.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import free_ports, wait_for_every_cpu

# Fixtures that start Ray or a Ray cluster: in-process (ray_local), or a head or a launcher cluster beside it.
RAY_FIXTURES = {"ray_local", "head", "cluster"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(autouse=True)
def _starts_ray_only_when_marked(request):
    """Fail a test that is not marked ``ray`` but leaves Ray started in this process (it would slow the fast loop),
    and a test after which the local Ray does not get every CPU back (a run, trial or placement group left behind
    would make every later test wait for CPUs)."""
    before = _ray_started()
    yield
    if not before and _ray_started() and not request.node.get_closest_marker("ray"):
        pytest.fail("this test starts Ray: use the ray_local fixture, which marks it `ray`")
    if _ray_started():
        wait_for_every_cpu()


def _ray_started() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


@pytest.fixture(scope="session")
def ray_local():
    """Real local Ray with 4 logical CPUs (Ray Data and Train each need slots; 2 would hang), quiet output.

    With its dashboard, as ``ray.init()`` starts it for a user: Ray Train's PlacementGroupCleaner asks it whether a
    run's controller died, and without it the workers' CPUs of a killed run stay reserved (ray-project/ray#54305).
    Its port is a free one, never another Ray's 8265."""
    import ray
    from ray.data import DataContext

    os.environ.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="rp-", dir="/tmp")  # short: Ray's socket paths have a length limit
    # Ray's processes unpickle callbacks defined in test modules, and import raypets from where this process does.
    pythonpath = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=4, include_dashboard=True, dashboard_port=free_ports(1)[0], _temp_dir=temp_dir,
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory, ray_local) -> dict:
    """``raypets demo --quick`` run once, shared by the tests of its report and of the stages after training:
    ``argv`` (its command line), ``out`` (its folder: ``shards``, ``train``, ...), ``printed`` (its stdout)."""
    from raypets.cli import main

    out = tmp_path_factory.mktemp("quick") / "demo"
    argv = ["demo", "--out", str(out), "--quick", "--no-progress"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(argv) == 0
    return {"argv": argv, "out": out, "printed": printed.getvalue()}
