"""The Ray cluster launcher itself: ``ray up``, ``ray submit`` and ``ray down`` with a local-provider config for
127.0.0.1, over ssh, running a real pipeline.

No system ssh service is used or needed: ``auth.ssh_proxy_command`` starts an sshd of the test's own per connection
in inetd mode (``sshd -i`` with its own config, host key and authorized key), from Debian's packages that
``.ci/ssh-tools`` unpacks into ``.ci/cache/ssh-tools`` (``.ci/run`` calls it). That sshd reads the users from a
passwd file of the test's (nss_wrapper): the login user with the temp HOME, and ``sshd``, the privilege separation
user Debian's package would add; run as root it also needs the empty folder ``/run/sshd``, made if missing.

Everything the cluster writes lies in one temp folder: the remote session's HOME (``~/raypets``,
``~/ray_bootstrap_config.yaml``, ``~/.ray/auth_token``), the head's ``--temp-dir`` (also where ``ray.init()`` in a
submitted script finds the head, via ``RAY_TMPDIR``) and the launcher's state files; the head has its own ports.
Only ssh's ControlMaster sockets go to ``/tmp/ray_ssh_*`` (a path Ray fixes), removed afterwards.

Token authentication is on as ``cluster.yaml`` sets it: the launcher's side makes the token
(``ray get-auth-token --generate`` in its HOME), ``file_mounts`` copies it to the node's ``~/.ray/auth_token``, the
head starts with ``RAY_AUTH_MODE=token`` and the node's shells export it (``/etc/environment`` on a real node).

``ray down`` runs ``ray stop`` on the head over ssh, which would stop every Ray on this machine (other tests', other
people's). The remote session's PATH starts with a ``ray`` wrapper that passes every command to the venv's ``ray``
except ``ray stop``, which it turns into stopping the processes of this head only (those naming its temp dir): the
rest of ``ray down`` (the ssh command, the provider's node bookkeeping) runs as it is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml
from helpers import free_ports

from raypets.cli import main

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
TOOLS = Path(os.environ.get("RAYPETS_SSH_TOOLS") or REPO / ".ci" / "cache" / "ssh-tools")
STEP_TIMEOUT_S = 120
AUTH = "RAY_AUTH_MODE=token"  # as cluster.yaml starts every node and every driver there

# Stops the processes whose command line names the head's temp dir: SIGTERM, then SIGKILL after 5 s.
STOP_HEAD = """\
import os, signal, time
MARK, SKIP = {mark!r}.encode(), {{os.getpid(), os.getppid()}}
def pids():
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if MARK in open(f"/proc/{{pid}}/cmdline", "rb").read() and int(pid) not in SKIP:
                found.append(int(pid))
        except OSError:
            pass
    return found
for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
    for pid in pids():
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait
    while pids() and time.monotonic() < deadline:
        time.sleep(0.2)
print(f"stopped the Ray head of {{MARK.decode()}}; still running: {{pids()}}")
"""


def _ssh_tools() -> Path:
    """The folder ``.ci/ssh-tools`` fills; fail under ``.ci/run`` (which sets RAYPETS_SSH_TOOLS_REQUIRED) when it
    could not, else skip with the way to get it."""
    needed = [TOOLS / "bin" / "sshd", TOOLS / "bin" / "rsync"]
    missing = [str(path) for path in needed if not os.access(path, os.X_OK)]
    missing += [name for name in ("ssh", "ssh-keygen") if shutil.which(name) is None]
    if missing:
        message = (f"the launcher test needs an sshd and rsync of its own: missing {', '.join(missing)}; "
                   f"`.ci/ssh-tools` downloads them (apt-get download) into {TOOLS}, and `.ci/run` calls it")
        if os.environ.get("RAYPETS_SSH_TOOLS_REQUIRED"):
            pytest.fail(message)
        pytest.skip(message)
    return TOOLS


def _processes_naming(mark: str) -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if mark.encode() in Path(f"/proc/{pid}/cmdline").read_bytes() and int(pid) != os.getpid():
                pids.append(int(pid))
    return pids


@pytest.fixture(scope="module")
def cluster():
    """A local-provider cluster config for 127.0.0.1 with everything it needs, in one temp folder; afterwards
    every process naming that folder (the head's, ssh's, the per-connection sshd's) is stopped and it is removed."""
    tools = _ssh_tools()
    temp = Path(tempfile.mkdtemp(prefix="rpl-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    ssh, home, local_home, shim = temp / "ssh", temp / "home", temp / "local", temp / "bin"
    for folder in (ssh, home, local_home / "tmp", shim):
        folder.mkdir(parents=True)
    user = pwd.getpwuid(os.getuid())
    for key in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh / key)], check=True)
    shutil.copy(ssh / "user_key.pub", ssh / "authorized_keys")
    # sshd sees these instead of /etc/passwd (nss_wrapper): the user's home is the temp one, and the privilege
    # separation user `sshd`, which Debian's package would create, exists.
    (ssh / "passwd").write_text(f"{user.pw_name}:x:{user.pw_uid}:{user.pw_gid}::{home}:{user.pw_shell}\n"
                                "sshd:x:65534:65534::/run/sshd:/usr/sbin/nologin\n")
    (ssh / "group").write_text(f"{user.pw_name}:x:{user.pw_gid}:\nnogroup:x:65534:\n")
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation chroot, when run as root
    remote_path = f"{shim}:{VENV_BIN}:{tools / 'bin'}:/usr/local/bin:/usr/bin:/bin"
    (ssh / "sshd_config").write_text(
        f"HostKey {ssh / 'host_key'}\nAuthorizedKeysFile {ssh / 'authorized_keys'}\nAllowUsers {user.pw_name}\n"
        "PidFile none\nStrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        f"PermitRootLogin prohibit-password\nSetEnv PATH={remote_path} RAY_TMPDIR={temp}\nLogLevel ERROR\n")
    # Ray's commands run in `bash --login -i`, whose /etc/profile resets PATH; then ~/.bashrc sets it again.
    # PYTHONPATH: the submitted pipelines import the copy of the repository that `ray up` synced.
    (home / ".bashrc").write_text(f"export PATH={remote_path} RAY_TMPDIR={temp} PYTHONPATH={home / 'raypets'} "
                                  f"{AUTH}\nunset RAY_ADDRESS\n")
    (shim / "stop_head.py").write_text(STOP_HEAD.format(mark=str(temp / "ray")))
    (shim / "ray").write_text(f'#!/bin/sh\necho "$*" >> {temp / "ray-calls.log"}\n'
                              f'[ "$1" = stop ] && exec {sys.executable} {shim / "stop_head.py"}\n'
                              f'exec {VENV_BIN / "ray"} "$@"\n')
    (shim / "ray").chmod(0o755)

    gcs, client, agent, agent_grpc, metrics = free_ports(5)
    config = {
        "cluster_name": f"rpl-{uuid.uuid4().hex[:8]}",
        "provider": {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []},
        "auth": {
            "ssh_user": user.pw_name,
            "ssh_private_key": str(ssh / "user_key"),
            "ssh_proxy_command": f"env NSS_WRAPPER_PASSWD={ssh / 'passwd'} NSS_WRAPPER_GROUP={ssh / 'group'} "
                                 f"{tools / 'bin' / 'sshd'} -i -f {ssh / 'sshd_config'} -E {ssh / 'sshd.log'}",
        },
        # What the pipelines import, synced as cluster.yaml syncs the working tree, without what git ignores. Not
        # the whole tree: `ray up` reads every file under a mount to hash it, and .venv is gigabytes.
        "file_mounts": {**{str(home / "raypets" / name): str(REPO / name) for name in ("raypets", "pipelines")},
                        str(home / ".ray" / "auth_token"): "~/.ray/auth_token"},  # the launcher's, as cluster.yaml
        "rsync_exclude": ["**/__pycache__"],
        "rsync_filter": [".gitignore"],
        "setup_commands": [],
        # No `ray stop` first (it would stop every Ray on the machine); own temp dir, ports and 2 CPUs; no dashboard
        # (`ray submit` does not use it, and its dozen processes slow the start on a small machine).
        "head_start_ray_commands": [
            f"{AUTH} ray start --head --port={gcs} --num-cpus=2 --node-ip-address=127.0.0.1 --temp-dir={temp / 'ray'} "
            "--autoscaling-config=~/ray_bootstrap_config.yaml --include-dashboard=false "
            f"--ray-client-server-port={client} --dashboard-agent-listen-port={agent} "
            f"--dashboard-agent-grpc-port={agent_grpc} --metrics-export-port={metrics} --disable-usage-stats"],
    }
    (temp / "cluster.yaml").write_text(yaml.safe_dump(config))

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # The launcher's side: its state files in the temp folder too, no ~/.ray of the user's, rsync on the PATH.
    env.update(HOME=str(local_home), TMPDIR=str(local_home / "tmp"), RAY_TMPDIR=str(temp),
               PATH=f"{VENV_BIN}:{tools / 'bin'}:{env['PATH']}")
    subprocess.run(["ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True)

    def ray(*args: str) -> subprocess.CompletedProcess:
        """The ``ray`` CLI against this config; fails with its output unless it exits 0."""
        done = subprocess.run(["ray", *args], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=STEP_TIMEOUT_S)
        sshd_log = (ssh / "sshd.log").read_text() if (ssh / "sshd.log").exists() else ""
        assert done.returncode == 0, f"ray {' '.join(args)}:\n{done.stdout}\n{done.stderr}\nsshd: {sshd_log}"
        return done

    yield {"ray": ray, "config": str(temp / "cluster.yaml"), "temp": temp, "home": home, "address": f"127.0.0.1:{gcs}",
           "env": env}
    for pid in _processes_naming(str(temp)):  # after a failure: this head's processes, ssh masters, sshds
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(temp, ignore_errors=True)
    # ssh's ControlMaster sockets: /tmp/ray_ssh_<user hash>/<cluster name hash> (Ray's SSHCommandRunner).
    control = Path("/tmp") / f"ray_ssh_{hashlib.sha256(user.pw_name.encode()).hexdigest()[:10]}"
    shutil.rmtree(control / hashlib.sha256(config["cluster_name"].encode()).hexdigest()[:10], ignore_errors=True)
    with contextlib.suppress(OSError):
        control.rmdir()  # only when no other cluster's sockets are in it


def test_ray_up_submit_and_down_run_prepare_on_a_local_provider_cluster_over_ssh(cluster, tmp_path):
    raw, shards = tmp_path / "raw", tmp_path / "shards"
    assert main(["synth", str(raw), "--n", "8", "--size", "64x48"]) == 0
    ray, config, temp = cluster["ray"], cluster["config"], cluster["temp"]

    ray("up", "-y", "--no-config-cache", config)
    synced = cluster["home"] / "raypets"
    assert (synced / "pipelines" / "prepare.py").is_file() and (synced / "raypets" / "cli.py").is_file()
    assert not list(synced.rglob("__pycache__")) and not list(synced.rglob("*.egg-info"))
    sessions = list((temp / "ray").glob("session_2*"))
    assert len(sessions) == 1, sessions  # the head, in its own temp dir
    status = ["ray", "status", "--address", cluster["address"]]
    run = {"cwd": REPO, "capture_output": True, "text": True, "timeout": STEP_TIMEOUT_S}
    assert subprocess.run(status, env={**cluster["env"], "RAY_AUTH_MODE": "token"}, **run).returncode == 0
    refused = subprocess.run(status, env={**cluster["env"], "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "guess"},
                             **run)  # the launcher's token opens the head; another does not
    assert refused.returncode != 0 and "auth" in (refused.stdout + refused.stderr).lower(), refused

    done = ray("exec", config, "python -c 'import raypets; print(raypets.__file__)'")
    assert str(synced / "raypets" / "__init__.py") in done.stdout  # the head runs the synced copy

    done = ray("submit", config, "pipelines/prepare.py", "--", str(raw), str(shards), "--size", "32",
               "--no-progress")
    manifest = json.loads((shards / "manifest.json").read_text())
    assert sum(manifest["counts"].values()) == 8 and manifest["files"]["used"] == 16, done.stdout
    assert manifest["image_size"] == {"height": 32, "width": 32}
    # The script joined the head (ray.init() found it through RAY_TMPDIR) rather than starting a Ray of its own.
    gcs_port = cluster["address"].rpartition(":")[2]
    printed = done.stdout + done.stderr
    assert "Connecting to existing Ray cluster at address" in printed and f":{gcs_port}..." in printed, printed
    assert list((temp / "ray").glob("session_2*")) == sessions

    assert _processes_naming(str(temp / "ray"))  # the head runs until `ray down`
    ray("down", "-y", config)
    assert (temp / "ray-calls.log").read_text().splitlines()[-1] == "stop"  # `ray down` ran `ray stop` last ...
    assert [c for c in (temp / "ray-calls.log").read_text().splitlines() if c.startswith("stop")] == ["stop"]
    deadline = time.monotonic() + 10
    while (left := _processes_naming(str(temp / "ray"))) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes of the head still running after `ray down`: {left}"  # ... stopping only this head
