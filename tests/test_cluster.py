"""Running on a real Ray cluster: cluster.yaml passes the launcher's own checks, and the pipelines run as Ray jobs
submitted with ``ray job submit --working-dir .`` to a head node started on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import h5py
import pytest
import yaml
from helpers import free_ports

from raypets.cli import main

REPO = Path(__file__).resolve().parents[1]
FOUR_GPU_TYPES = {"g5.12xlarge", "g6.12xlarge", "g6e.12xlarge", "p3.8xlarge"}
JOB_TIMEOUT_S = 300


def _launcher_config(config: dict) -> dict:
    """What ``ray up`` checks before it talks to the cloud: defaults filled in, then the JSON schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(config)
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_the_launchers_schema_and_has_4_gpu_workers():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    prepared = _launcher_config(config)
    head = prepared["head_node_type"]
    workers = {name: spec for name, spec in prepared["available_node_types"].items() if name != head}
    assert workers and all(spec["node_config"]["InstanceType"] in FOUR_GPU_TYPES for spec in workers.values())
    assert prepared["available_node_types"][head]["resources"] == {"CPU": 0}  # drivers only on the head
    assert prepared["file_mounts"]["/home/ubuntu/raypets"] == "."
    assert any("-e /home/ubuntu/raypets" in command for command in prepared["setup_commands"])
    assert "ray stop" in prepared["head_start_ray_commands"][0]


def test_cluster_yaml_needs_the_token_everywhere_and_gives_each_node_type_its_own_least_privilege():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    starts = [config["head_start_ray_commands"][-1], config["worker_start_ray_commands"][-1]]
    assert all("RAY_AUTH_MODE=token ray start" in command for command in starts)
    assert "--dashboard-host=127.0.0.1" in starts[0] and "0.0.0.0" not in (REPO / "cluster.yaml").read_text()
    assert any("RAY_AUTH_MODE=token" in command and "/etc/environment" in command
               for command in config["setup_commands"])  # the drivers on the nodes too
    assert config["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"  # the launcher's own
    assert "auth_token" in (REPO / ".gitignore").read_text().splitlines()

    profiles = {name: spec["node_config"]["IamInstanceProfile"]["Arn"].rpartition("/")[2]
                for name, spec in config["available_node_types"].items()}
    assert len(set(profiles.values())) == len(profiles)  # each node type its own
    policies = {name: json.loads((REPO / "deploy" / "iam" / f"{profile}-policy.json").read_text())["Statement"]
                for name, profile in profiles.items()}
    for statements in policies.values():
        s3 = [s for s in statements if any(a.startswith("s3:") for a in s["Action"])]
        assert all(s["Resource"].startswith("arn:aws:s3:::YOUR-DATA-BUCKET") for s in s3)  # that bucket only
        assert not [a for s in statements for a in s["Action"] if a.endswith("*")]  # no wildcard actions
    worker = policies["gpu_4x"]
    assert {a.split(":")[0] for s in worker for a in s["Action"]} == {"s3"}  # a worker touches the bucket alone


def test_the_schema_check_catches_a_broken_cluster_yaml():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config["available_node_types"]["gpu_4x"]["max_worker"] = 4  # a typo of max_workers
    with pytest.raises(Exception, match="max_worker"):
        _launcher_config(config)


@contextlib.contextmanager
def _loopback_head(num_cpus: int) -> Iterator[dict]:
    """A real Ray head on loopback with its own temp dir, HOME and ports; afterwards only its own processes (and
    its nodes') are stopped. Yields ``env`` (for the ray CLI), ``address`` (the dashboard's, for jobs), ``gcs``,
    ``temp`` and ``node_args`` (what another node started beside it needs)."""
    temp = Path(tempfile.mkdtemp(prefix="rph-", dir="/tmp"))
    (temp / "home").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(temp / "home"), PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    gcs, dashboard, client, *agent = free_ports(6)
    node_args = ["--node-ip-address=127.0.0.1", f"--temp-dir={temp / 'ray'}", "--disable-usage-stats"]
    subprocess.run(["ray", "start", "--head", f"--port={gcs}", f"--num-cpus={num_cpus}", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}", *_agent_args(*agent),
                    *node_args], env=env, check=True, capture_output=True, timeout=120)
    try:
        yield {"env": env, "address": f"http://127.0.0.1:{dashboard}", "gcs": gcs, "temp": temp,
               "node_args": node_args}
    finally:
        _stop_processes_under(temp)
        shutil.rmtree(temp, ignore_errors=True)


def _agent_args(agent: int, agent_grpc: int, metrics: int) -> list[str]:
    """The ports of a node's dashboard agent and metrics (each node on this machine needs its own)."""
    return [f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}"]


@pytest.fixture(scope="module")
def head():
    """A real Ray head on loopback with 4 CPUs."""
    with _loopback_head(num_cpus=4) as started:
        yield started


def _stop_processes_under(temp: Path) -> None:
    """``ray stop`` would stop every Ray on the machine (the test session's too): kill only this head's."""
    for pid in os.listdir("/proc"):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if pid.isdigit() and str(temp).encode() in cmdline and int(pid) != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def _submit(head: dict, *args: str) -> tuple[str, str]:
    """``ray job submit --working-dir .`` from the repository; waits for the end; (final status, job logs)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    job_id = f"raypets-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ray", "job", "submit", "--address", head["address"], "--working-dir", ".", "--submission-id",
                    job_id, "--no-wait", "--", "python", *args], cwd=REPO, env=head["env"], check=True,
                   capture_output=True, timeout=120)
    client = JobSubmissionClient(head["address"])
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while (status := client.get_job_status(job_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                                JobStatus.STOPPED):
        assert time.monotonic() < deadline, f"job {job_id} still {status} after {JOB_TIMEOUT_S} s"
        time.sleep(1)  # polling the job's state, not waiting for a guessed duration
    logs = subprocess.run(["ray", "job", "logs", "--address", head["address"], job_id], env=head["env"],
                          capture_output=True, text=True, timeout=60).stdout
    return str(status), logs


def test_prepare_train_and_predict_run_as_ray_jobs(head, tmp_path):
    raw, shards, run, output = tmp_path / "raw", tmp_path / "shards", tmp_path / "run", tmp_path / "predicted"
    assert main(["synth", str(raw), "--n", "16", "--size", "64x48"]) == 0
    status, logs = _submit(head, "pipelines/prepare.py", str(raw), str(shards), "--size", "32", "--no-progress")
    assert status == "SUCCEEDED", logs
    assert (shards / "manifest.json").is_file() and "train" in logs
    status, logs = _submit(head, "pipelines/train.py", "--data", str(shards), "--run-dir", str(run), "--epochs", "1",
                           "--workers", "1", "--batch-size", "4", "--test-batch-size", "4", "--warmup-steps", "2",
                           "--no-progress")
    assert status == "SUCCEEDED", logs
    assert logs.count("epoch 1/1  train loss") == 1 and (run / "checkpoints" / "model_checkpoint_1.pt").is_file()
    assert not re.search(r"\d E \d+ \d+\]", logs), logs  # no ERROR line of Ray's (the PreemptionWatcher's was one)
    assert "Reporting training result" not in logs  # Ray Train's INFO line per report: the epoch line says it
    status, logs = _submit(head, "pipelines/predict.py", "--checkpoint", str(run), str(raw / "images"), str(output),
                           "--size", "32", "--cpu", "--workers", "1")
    assert status == "SUCCEEDED", logs
    with h5py.File(output / "predictions.h5") as h5:
        assert len(h5) == 16 and h5["Abyssinian_1.jpg"].shape == (3, 32, 32)


@pytest.fixture
def split_disks(tmp_path):
    """A head that runs no tasks and a worker node whose ``tmp_path/disk`` is a tmpfs of its own (a private mount
    namespace): what the worker writes there, the head does not see, as with node-local disks on a cluster."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "--mount", "true"]).returncode != 0:
        pytest.skip("needs `unshare --mount` (util-linux, and the right to make a mount namespace) for a local disk")
    (tmp_path / "disk").mkdir()
    with _loopback_head(num_cpus=0) as started:
        worker = shlex.join(["ray", "start", f"--address=127.0.0.1:{started['gcs']}", "--num-cpus=4", "--block",
                             *_agent_args(*free_ports(3)), *started["node_args"]])
        own_disk = f"mount -t tmpfs tmpfs {tmp_path / 'disk'} && exec {worker}"
        subprocess.Popen(["unshare", "--mount", "sh", "-c", own_disk], env=started["env"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
        yield started


def test_prepare_into_a_folder_only_its_tasks_node_sees_fails_and_says_why(split_disks, tmp_path):
    raw, shards = tmp_path / "raw", tmp_path / "disk" / "shards"
    assert main(["synth", str(raw), "--n", "8", "--size", "64x48"]) == 0
    status, logs = _submit(split_disks, "pipelines/prepare.py", str(raw), str(shards), "--size", "32", "--no-progress")
    assert status == "FAILED" and "shard files the Ray tasks wrote are not there from the driver" in logs, logs
    assert "OUT must be on storage every node sees at the same path (a shared file system) or a URI" in logs
    assert not shards.exists()  # no manifest naming shards that no reader finds


def test_a_two_node_training_job_prints_each_epoch_once(tmp_path):
    """Two nodes joined with ``ray start``, each with its own temp dir as on two machines (two nodes of one machine
    that share one would both forward every worker's log lines, so each printed twice), a 2-worker job: one line
    per epoch, no ERROR line of Ray's."""
    raw, shards, run = tmp_path / "raw", tmp_path / "shards", tmp_path / "run"
    assert main(["synth", str(raw), "--n", "16", "--size", "64x48"]) == 0
    with _loopback_head(num_cpus=1) as started:
        own_temp = ["--node-ip-address=127.0.0.1", f"--temp-dir={started['temp'] / 'node2'}", "--disable-usage-stats"]
        subprocess.Popen(["ray", "start", f"--address=127.0.0.1:{started['gcs']}", "--num-cpus=4", "--block",
                          *_agent_args(*free_ports(3)), *own_temp], env=started["env"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
        status, logs = _submit(started, "pipelines/prepare.py", str(raw), str(shards), "--size", "32", "--no-progress")
        assert status == "SUCCEEDED", logs
        status, logs = _submit(started, "pipelines/train.py", "--data", str(shards), "--run-dir", str(run),
                               "--epochs", "2", "--workers", "2", "--batch-size", "4", "--test-batch-size", "4",
                               "--warmup-steps", "2", "--no-progress")
    assert status == "SUCCEEDED", logs
    assert [logs.count(f"epoch {epoch}/2  train loss") for epoch in (1, 2)] == [1, 1], logs
    assert not re.search(r"\d E \d+ \d+\]", logs), logs


def test_a_job_with_a_missing_data_folder_fails_with_that_message(head, tmp_path):
    missing = tmp_path / "no-such-shards"
    status, logs = _submit(head, "pipelines/train.py", "--data", str(missing), "--run-dir", str(tmp_path / "run"))
    assert status == "FAILED"
    assert f"raypets: error: {missing}: prepared data folder does not exist" in logs


def test_an_address_where_no_cluster_runs_is_one_clear_message(tmp_path, capsys):
    (port,) = free_ports(1)
    assert main(["synth", str(tmp_path / "raw"), "--n", "2", "--size", "32x32"]) == 0
    assert main(["prepare", str(tmp_path / "raw"), str(tmp_path / "out"), "--address", f"127.0.0.1:{port}"]) == 2
    assert f"no Ray cluster answers at 127.0.0.1:{port}" in capsys.readouterr().err
