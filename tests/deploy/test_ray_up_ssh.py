"""`ray up deploy/ray/local.yaml` for real, over SSH, onto a head "machine" of the two-host harness.

Collected only with PDSERVE_TEST_SSH=1 (conftest.py); needs root, openssh-server and rsync:
    sudo PDSERVE_TEST_SSH=1 tests/run-isolated.sh .venv/bin/python -m pytest tests/deploy -m ssh

    host A 10.200.0.1: sshd (the head machine); its /root and /tmp/ray are private bind mounts
    host B 10.200.0.2: the laptop: `ray up`, `ray exec`, `ray down`, and an etcd client

What is local.yaml's own: its provider and start commands (the head IP replaced by A's), the
file_mounts (the checkout rsynced to the head), etcd started and the config rendered by the head
commands. What the test changes: no workers (worker_ips: []), ssh user root with a test key, and
no setup commands: the head "machine" already has this checkout's venv (on PATH through ~/.bashrc)
and the etcd binary (~/etcd/etcd -> /usr/bin/etcd), as nothing may be downloaded here.
`ray stop` in those commands only reaches host A's own PID namespace.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.config import load_config
from manifests import RAY_UP_CONFIGS, REPO
from netns import ADDRESS_A, NetnsUnavailableError, TwoHosts

pytestmark = [pytest.mark.ssh, pytest.mark.netns, pytest.mark.timeout(900)]

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
SHIPPED_HEAD_IP = "192.168.0.10"
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0"}


def require_tools() -> None:
    missing = [name for name, path in (("openssh-server", "/usr/sbin/sshd"), ("rsync", shutil.which("rsync"))) if not path or not os.path.exists(path)]
    if missing:
        pytest.fail(f"the ray up SSH test needs {', '.join(missing)}: `apt-get install {' '.join(missing)}`")


def head_config(tmp: Path, client_key: Path) -> Path:
    shipped = yaml.safe_load(RAY_UP_CONFIGS[1].read_text().replace(SHIPPED_HEAD_IP, ADDRESS_A))
    shipped["cluster_name"] = f"pdserve-ssh-{os.getpid()}"
    shipped["provider"]["worker_ips"] = []
    shipped["max_workers"] = 0
    shipped["auth"] = {"ssh_user": "root", "ssh_private_key": str(client_key)}
    shipped["setup_commands"] = []
    shipped["head_setup_commands"] = []
    path = tmp / "cluster.yaml"
    path.write_text(yaml.safe_dump(shipped, sort_keys=False))
    return path


def start_sshd(pair, tmp: Path) -> tuple[Path, Path]:
    """sshd on A's address; A's /root is a private directory with our key and ~/.bashrc."""
    home, ray_tmp_a = tmp / "home-a", tmp / "ray-a"
    for d in (home / ".ssh", home / "etcd", ray_tmp_a, tmp / "ray-b"):
        d.mkdir(parents=True)
    client_key, host_key = tmp / "client_key", tmp / "host_key"
    for key in (client_key, host_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    shutil.copy(f"{client_key}.pub", home / ".ssh" / "authorized_keys")
    (home / "etcd" / "etcd").symlink_to("/usr/bin/etcd")
    (home / ".bashrc").write_text(f"export PATH={BIN}:$PATH\nexport RAY_USAGE_STATS_ENABLED=0\n")
    # Private to each host's mount namespace: the head's home, and Ray's default temp dir on both
    # sides (session dirs, the local provider's cluster state), so nothing outside is touched.
    # The venv's interpreter may live under the real /root (pyenv): keep it visible there.
    base = Path(sys.base_prefix).resolve()
    if base.is_relative_to("/root"):
        (home / base.relative_to("/root")).mkdir(parents=True)
        pair.a.run(["mount", "--bind", str(base), str(home / base.relative_to("/root"))])
    pair.a.run(["mount", "--rbind", str(home), "/root"])
    pair.a.run(["mount", "--bind", str(ray_tmp_a), "/tmp/ray"])
    pair.b.run(["mount", "--bind", str(tmp / "ray-b"), "/tmp/ray"])
    config = tmp / "sshd_config"
    config.write_text(
        f"ListenAddress {ADDRESS_A}\nPort 22\nHostKey {host_key}\nPidFile {tmp / 'sshd.pid'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "UsePAM no\nStrictModes no\nAuthorizedKeysFile /root/.ssh/authorized_keys\n"
    )
    pair.a.run(["mkdir", "-p", "/run/sshd"])
    pair.a.popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=open(tmp / "sshd.log", "w"))
    return client_key, home


def remove_ssh_control_dir(cluster_name: str) -> None:
    """Ray's ssh multiplexing sockets live in /tmp/ray_ssh_<user hash>/<cluster hash> (as in
    ray/autoscaler/_private/command_runner.py); they outlive `ray down`."""
    user_dir = Path("/tmp") / f"ray_ssh_{hashlib.sha256(getpass.getuser().encode()).hexdigest()[:10]}"
    shutil.rmtree(user_dir / hashlib.sha256(cluster_name.encode()).hexdigest()[:10], ignore_errors=True)
    try:
        user_dir.rmdir()  # only when no other cluster's sockets are left in it
    except OSError:
        pass


@pytest.fixture
def pair():
    require_tools()
    pair = TwoHosts()
    try:
        pair.up()
    except NetnsUnavailableError as e:
        pytest.fail(str(e))
    yield pair
    pair.down()


def test_ray_up_local_yaml_brings_up_a_head_with_etcd(pair, tmp_path):
    client_key, home = start_sshd(pair, tmp_path)
    cluster = head_config(tmp_path, client_key)
    ray = str(BIN / "ray")
    # `ray up/exec/down` cache the resolved config in tempfile.gettempdir(): keep it in the test's.
    (tmp_path / "tmp").mkdir()
    env = {**RAY_ENV, "TMPDIR": str(tmp_path / "tmp")}
    # From the repository root, as the README says: file_mounts `~/pdserve: .` is the checkout.
    up = pair.b.run([ray, "up", "-y", "--no-config-cache", str(cluster)], env=env, timeout_s=600, check=False)
    assert up.returncode == 0, f"ray up failed:\n{up.stdout[-4000:]}\n{up.stderr[-4000:]}"
    try:
        assert (home / "pdserve" / "pyproject.toml").read_bytes() == (REPO / "pyproject.toml").read_bytes()
        # The head's Ray answers, with no GPUs claimed (--num-gpus=0 on the head).
        check = "python -c 'import json, ray; ray.init(address=\"auto\"); print(json.dumps(ray.cluster_resources()))'"
        done = pair.b.run([ray, "exec", str(cluster), check], env=env, timeout_s=300)
        resources = json.loads(done.stdout.strip().splitlines()[-1])
        assert resources["CPU"] > 0 and "GPU" not in resources
        # The head commands started etcd and rendered the config with A's address; B reaches it.
        rendered = home / "pdserve-config.yaml"
        assert load_config(rendered).etcd.endpoints == [f"{ADDRESS_A}:2379"]
        probe = pair.b.run([sys.executable, str(HERE / "etcd_probe.py"), str(rendered), "put", "/pdserve/ssh-test", "ok", "30"], timeout_s=120)
        assert json.loads(probe.stdout.strip().splitlines()[-1])["ok"]
    finally:
        down = pair.b.run([ray, "down", "-y", str(cluster)], env=env, timeout_s=300, check=False)
        remove_ssh_control_dir(yaml.safe_load(cluster.read_text())["cluster_name"])
    assert down.returncode == 0, down.stderr[-3000:]
    raylets = pair.a.run(["pgrep", "-a", "-f", "raylet"], check=False)
    assert raylets.stdout.strip() == "", f"ray down left Ray running on the head: {raylets.stdout}"
