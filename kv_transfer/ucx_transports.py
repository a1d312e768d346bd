"""UcxTransportLog: find out which transports UCX picked for KV READs/WRITEs, and say so.

UCX chooses transports per endpoint on its own (shared memory/CMA, cuda_ipc, RDMA, or TCP) and
never complains when it lands on slow TCP. It prints its choice only at log level "info" with
UCX_PROTO_INFO=y. So, before the first NIXL agent of the process loads UCX, we point UCX's log at a
per-process file (unless the user already configured UCX logging), and after the first transfer
with each peer we parse the protocol tables for "remote memory read/write" and log them; a TCP
lane for a READ/WRITE is a warning. UCX warnings and errors from the file are re-logged too.

UCX reads these variables when its libraries load (at the first nixl_agent creation): if it is
already loaded, we only report the effective environment.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import re
import tempfile
import threading

log = logging.getLogger(__name__)

_ENV_KEYS = ("UCX_TLS", "UCX_NET_DEVICES", "UCX_RNDV_THRESH", "UCX_MAX_RNDV_RAILS", "UCX_PROTO_INFO", "UCX_LOG_LEVEL",
             "UCX_LOG_FILE", "UCX_MEMTYPE_CACHE", "UCX_CUDA_IPC_ENABLE_GET_ZCOPY")
_TABLE_RE = re.compile(r"\|\s+\S.*\bcfg#\d+\s+\|")  # "| <agent> intra-node cfg#1 |" opens a table
# "remote memory read by ucp_get*(multi) into host memory from host", "... into cuda/GPU0 from cuda/dev[1]"
_OP_RE = re.compile(r"\|\s*remote memory (read|write) by \S+ ((?:into|from) \S+)(?: memory)? ((?:from|to) \S+)")
_ROW_RE = re.compile(r"\|\s*(\d+\.\.\S+|\d+)\s*\|\s*([^|]+?)\s*\|\s*([^|]+?)\s*\|")
_LANES_RE = re.compile(r"UCX\s+INFO\s+(.*cfg#\d+.*)$")
_VERSION_RE = re.compile(r"UCX\s+INFO\s+Version (\S+)")
_PROBLEM_RE = re.compile(r"UCX\s+(WARN|ERROR)\s+(.*)$")

_setup_lock = threading.Lock()
_log_path: str | None = None
_set_up = False


def _ucx_loaded() -> bool:
    try:
        with open("/proc/self/maps") as f:
            return any("libucp" in line for line in f)
    except OSError:
        return False


class UcxTransportLog:
    """One per transceiver; the UCX log file is per process (set up by the first one)."""

    def __init__(self) -> None:
        global _log_path, _set_up
        with _setup_lock:
            if not _set_up:
                _set_up = True
                user_logs = "UCX_LOG_LEVEL" in os.environ or "UCX_LOG_FILE" in os.environ
                if not user_logs and not _ucx_loaded():
                    _log_path = os.path.join(tempfile.gettempdir(), f"pdserve-ucx-{os.getpid()}.log")
                    os.environ["UCX_LOG_FILE"] = _log_path
                    os.environ["UCX_LOG_LEVEL"] = "info"
                    os.environ.setdefault("UCX_PROTO_INFO", "y")
                    atexit.register(_remove_log, _log_path)
        self.log_path = _log_path
        self._lock = threading.Lock()
        self._offset = 0
        self._current: str | None = None  # the read/write protocol table being parsed
        self._seen: set[str] = set()
        self.version: str | None = None
        self.lanes: list[str] = []
        self.protocols: dict[str, list[str]] = {}  # "read into host from host" -> ["0..inf zero-copy cma/memory"]

    @staticmethod
    def effective_env() -> dict[str, str]:
        return {k: os.environ.get(k, "<unset>") for k in _ENV_KEYS}

    def refresh(self) -> list[str]:
        """Parse what UCX wrote since the last call; return the lines worth reporting (new ones)."""
        with self._lock:
            return self._refresh()

    def _refresh(self) -> list[str]:
        if self.log_path is None or not os.path.exists(self.log_path):
            return []
        _flush_c_streams()  # UCX writes its log through a buffered FILE*
        with open(self.log_path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]  # a line UCX is still writing waits for the next call
        self._offset += len(complete)
        news: list[str] = []
        for line in complete.decode(errors="replace").splitlines():
            if self.version is None and (m := _VERSION_RE.search(line)):
                self.version = m.group(1)
            if m := _LANES_RE.search(line):
                lanes = re.sub(r"^\S+\s+", "", m.group(1).strip())  # drop the agent-name prefix
                if lanes not in self._seen:
                    self._seen.add(lanes)
                    self.lanes.append(lanes)
                    news.append(f"endpoint lanes: {lanes}")
                continue
            if m := _PROBLEM_RE.search(line):
                log.warning("UCX %s: %s", m.group(1), m.group(2).strip())
                continue
            if _TABLE_RE.search(line):
                self._current = None  # a new protocol table: only read/write tables are of interest
                continue
            if m := _OP_RE.search(line):
                self._current = f"{m.group(1)} {m.group(2)} {m.group(3)}"  # e.g. "read into host from host"
                continue
            if self._current is not None and (m := _ROW_RE.search(line)):
                row = f"{m.group(1)} {m.group(2)} {m.group(3)}"
                key = f"{self._current}: {row}"
                if key not in self._seen:
                    self._seen.add(key)
                    self.protocols.setdefault(self._current, []).append(row)
                    news.append(key)
        return news

    def report(self, peer: str) -> None:
        """Log what UCX selected since the last report (call after a first transfer with a peer)."""
        for item in self.refresh():
            slow = ("read" in item or "write" in item) and ("tcp" in item or "emulation" in item)
            level = logging.WARNING if slow else logging.INFO
            suffix = " (KV moves over TCP / emulated RMA: expect ~0.1-1 GB/s; check UCX_TLS, UCX_NET_DEVICES, " \
                "UCX_CUDA_IPC_ENABLE_GET_ZCOPY)" if slow else ""
            log.log(level, "UCX transport selected with %s: %s%s", peer, item, suffix)

    def summary(self) -> dict[str, object]:
        self.refresh()
        return {"ucx_version": self.version, "env": self.effective_env(), "log_file": self.log_path,
                "lanes": list(self.lanes), "protocols": {k: list(v) for k, v in self.protocols.items()}}


def _flush_c_streams() -> None:
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass


def _remove_log(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
