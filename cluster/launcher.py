"""`pdserve up`: etcd (local unless configured), Ray (local unless an address is given), the
cluster manager with its pools, and the OpenAI endpoint; then wait until /ready answers 200.
`--detach` runs the same in a background process; `pdserve down` stops it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from cluster.config import PdserveConfig
from workers.model_files import cache_dir, resolve_model_path, served_model_name

log = logging.getLogger(__name__)


def run_dir(cluster_name: str) -> Path:
    d = Path(os.environ.get("PDSERVE_RUN_DIR", cache_dir() / "run")) / cluster_name
    d.mkdir(parents=True, exist_ok=True)
    return d


def ensure_admin_token(config: PdserveConfig, rdir: Path) -> tuple[PdserveConfig, Path | None]:
    """Config token, else env (load_config applied it), else generate one into the run dir."""
    if config.server.admin_token is not None:
        return config, None
    path = rdir / "admin-token"
    path.write_text(secrets.token_urlsafe(32))
    path.chmod(0o600)
    server = config.server.model_copy(update={"admin_token": path.read_text()})
    return config.model_copy(update={"server": server}), path


class Cluster:
    """A running pdserve cluster started by this process."""

    def __init__(self, config: PdserveConfig, ray_address: str | None = None, say=print,
                 app_name: str = "pdserve", route_prefix: str = "/", wait_for_app_removal: bool = True):
        """wait_for_app_removal: stop() returns only once Serve has removed this cluster's apps
        (their replicas each wait out a graceful shutdown, ~3 s); False hands that wait to the Serve
        controller (apps and route prefixes that are never reused, as in the test suite)."""
        self.config, self.ray_address, self.say = config, ray_address, say
        self.app_name, self.route_prefix = app_name, route_prefix
        self.wait_for_app_removal = wait_for_app_removal
        self.rdir = run_dir(config.cluster_name)
        self.etcd = None
        self.manager = None
        self.token_file: Path | None = None
        self.owns_ray = False
        self.extra_apps: list[str] = []  # more endpoints over the same workers (Serve app names)

    @property
    def url(self) -> str:
        return f"http://{self.config.server.host}:{self.config.server.port}{self.route_prefix.rstrip('/')}"

    @property
    def admin_url(self) -> str:
        return f"http://{self.config.server.host}:{self.config.server.admin_port}"

    def start(self, ready_timeout_s: float = 600) -> None:
        import ray
        from ray import serve

        from router.app import build_app
        from router.cluster_view import ray_namespace

        c = self.config
        self.say(f"model: resolving {c.model.path or 'the default model (SmolLM2-135M-Instruct)'} ...")
        # resolved here to fail early and to name the model; model.path itself stays as given (the
        # default model, a hub id): every worker resolves it on its own node, where the head's
        # conversion or download does not exist on a multi-node cluster
        model_path = resolve_model_path(c.model.path, weights=False)
        if c.model.served_model_name is None:
            model = c.model.model_copy(update={"served_model_name": served_model_name(
                model_path, None, requested=c.model.path)})
            c = c.model_copy(update={"model": model})
        self.config, self.token_file = ensure_admin_token(c, self.rdir)
        c = self.config
        if not c.etcd.endpoints:
            from cluster.etcd_server import LocalEtcd

            self.etcd = LocalEtcd(self.rdir / "etcd")
            self.etcd.start()
            self.config = c = c.model_copy(update={"etcd": c.etcd.model_copy(update={"endpoints": [self.etcd.endpoint]})})
            self.say(f"etcd: started a local etcd at {self.etcd.endpoint} (data in {self.etcd.data_dir})")
        if not ray.is_initialized():  # (tests and embedding programs bring their own Ray and Serve)
            self.say("ray: " + (f"joining {self.ray_address}" if self.ray_address else "starting a local Ray instance"))
            ray.init(address=self.ray_address or "local", namespace=ray_namespace(c.cluster_name),
                     include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
            serve.start(http_options={"host": c.server.host, "port": c.server.port})
            self.owns_ray = True
        serve.run(build_app({"config": config_as_dict(c)}), name=self.app_name, route_prefix=self.route_prefix)
        self.manager = ray.get_actor("pdserve-manager", namespace=ray_namespace(c.cluster_name))
        ray.get(self.manager.set_endpoint_url.remote(self.url))  # where the autoscaler reads latencies
        self._wait_ready(ready_timeout_s)

    def _wait_ready(self, timeout_s: float) -> None:
        import ray

        deadline, last = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            try:
                r = httpx.get(f"{self.url}/ready", timeout=5)
                if r.status_code == 200:
                    return
                reason = r.json().get("error", {}).get("message", r.text)
            except (httpx.HTTPError, ValueError) as e:
                reason = f"endpoint not answering yet ({type(e).__name__})"
            workers = ray.get(self.manager.list_workers.remote())
            failed = [w for w in workers if w["state"] == "failed"]
            if failed:
                raise RuntimeError("workers failed to start: " + "; ".join(f"{w['worker_id']}: {w['error']}" for w in failed))
            states = ", ".join(f"{w['worker_id']} {w['state']}" for w in workers)
            line = f"waiting: {reason} [{states}]"
            if line != last:
                self.say(line)
                last = line
            time.sleep(0.2)  # readiness is a cheap GET; a coarser poll only adds to every start
        raise TimeoutError(f"the cluster did not become ready within {timeout_s:.0f} s")

    def stop(self) -> None:
        """Stop what this object started. Idempotent."""
        import ray

        if getattr(self, "_stopped", False):
            return
        self._stopped = True
        if ray.is_initialized():
            if self.manager is not None:
                try:
                    ray.get(self.manager.shutdown.remote(), timeout=30)
                    ray.kill(self.manager)
                except Exception as e:
                    log.warning("manager shutdown: %r", e)
            if self.owns_ray:
                ray.shutdown()  # our own Ray: its processes, Serve's included, all go with it
            else:
                try:
                    self._delete_apps()
                except Exception as e:
                    log.warning("serve app removal: %r", e)
        if self.etcd is not None:
            self.etcd.stop()

    def _delete_apps(self, timeout_s: float = 60) -> None:
        """Every app of this cluster at once: Serve stops their replicas in parallel, not one
        graceful shutdown after another."""
        from ray import serve

        apps = [*self.extra_apps, self.app_name]
        for app in apps:
            serve.delete(app, _blocking=False)
        if not self.wait_for_app_removal:
            return
        deadline = time.monotonic() + timeout_s
        while set(apps) & set(serve.status().applications):
            if time.monotonic() > deadline:
                raise TimeoutError(f"Serve did not remove {apps} within {timeout_s:.0f} s")
            time.sleep(0.1)


def config_as_dict(c: PdserveConfig) -> dict:
    """Plain data (secrets included) that parse_config reads back to an equal config."""
    import yaml

    from cluster.config import config_to_yaml

    return yaml.safe_load(config_to_yaml(c, reveal_secrets=True))


def running_pid(rdir: Path) -> int | None:
    """The pid of the `pdserve up` that runs this cluster (its pid file, that process alive and a
    pdserve: a pid file left by a killed run may name a pid reused since), or None."""
    try:
        pid = int((rdir / "pid").read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):  # no file, not a number, no such process
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # no /proc here: alive is all we can tell
        return pid
    return pid if b"pdserve" in cmdline or b"cluster.cli" in cmdline else None


def up(config: PdserveConfig, ray_address: str | None, detach: bool, config_args: list[str]) -> int:
    rdir = run_dir(config.cluster_name)
    if (pid := running_pid(rdir)) is not None and pid != os.getpid():
        print(f"cluster {config.cluster_name!r} is already running (pid {pid}); stop it with "
              f"`pdserve down --cluster-name {config.cluster_name}` or pick another --cluster-name", file=sys.stderr)
        return 1
    if detach:
        return _spawn_detached(config, rdir, config_args)
    cluster = Cluster(config, ray_address)
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        if not stopping:
            stopping = True
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    (rdir / "pid").write_text(str(os.getpid()))
    try:
        cluster.start()
        c = cluster.config
        print(f"ready: {cluster.url}/v1", flush=True)
        print(f"model: {c.model.served_model_name}")
        print(f"management API: http://{c.server.host}:{c.server.admin_port} "
              f"(token {'in ' + str(cluster.token_file) if cluster.token_file else 'from your config / PDSERVE_ADMIN_TOKEN'})")
        auth = ""
        if c.server.api_keys:
            print(f"/v1 needs one of the {len(c.server.api_keys)} API key(s) of server.api_keys / PDSERVE_API_KEY")
            auth = " -H \"Authorization: Bearer $PDSERVE_API_KEY\""
        print("try:\n  curl " + cluster.url + "/v1/chat/completions" + auth + " -H 'Content-Type: application/json' -d '"
              + json.dumps({"model": c.model.served_model_name,
                            "messages": [{"role": "user", "content": "What is the capital of France?"}]}) + "'",
              flush=True)
        print("Ctrl-C stops the cluster.", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping ...", flush=True)
        return 0
    finally:
        cluster.stop()
        (rdir / "pid").unlink(missing_ok=True)
        print("stopped.", flush=True)


def _spawn_detached(config: PdserveConfig, rdir: Path, config_args: list[str]) -> int:
    log_path = rdir / "pdserve.log"
    cmd = [sys.executable, "-m", "cluster.cli", "up", *config_args]
    with open(log_path, "ab") as logf:  # the log keeps earlier runs: only what this one writes counts below
        logf.write(f"--- pdserve up, {time.strftime('%Y-%m-%d %H:%M:%S')} ---\n".encode())
        logf.flush()
        start = logf.tell()
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    print(f"started in the background (pid {proc.pid}); log: {log_path}", flush=True)
    code = wait_ready(proc, log_path, start, timeout_s=900)
    if code == 0:
        print(f"ready: http://{config.server.host}:{config.server.port}/v1", flush=True)
    return code


def wait_ready(proc: subprocess.Popen, log_path: Path, start: int, timeout_s: float, poll_s: float = 1.0) -> int:
    """0 once the process wrote its "ready: " line into the log past ``start``; 1 (with the reason
    on stderr) when it exits first or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            print(f"pdserve exited with code {proc.returncode}; see {log_path}", file=sys.stderr)
            return 1
        if "ready: " in read_from(log_path, start):
            return 0
        time.sleep(poll_s)
    print(f"not ready after {timeout_s:.0f} s; see {log_path}", file=sys.stderr)
    return 1


def read_from(path: Path, offset: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def down(cluster_name: str, timeout_s: float = 120) -> int:
    pid_file = run_dir(cluster_name) / "pid"
    if not pid_file.exists():
        print(f"no running cluster {cluster_name!r} started by `pdserve up --detach` here", file=sys.stderr)
        return 1
    pid = int(pid_file.read_text())
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pid_file.unlink(missing_ok=True)
        print(f"cluster {cluster_name!r} was not running (stale pid {pid})")
        return 0
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            print(f"stopped cluster {cluster_name!r}")
            return 0
        time.sleep(0.5)
    print(f"cluster {cluster_name!r} (pid {pid}) did not stop within {timeout_s:.0f} s", file=sys.stderr)
    return 1
