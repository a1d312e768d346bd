"""Loading NIXL and starting its agent, with what to install when that fails (BackendUnavailableError).
Used by NixlTransceiver (nixl_transceiver.py) and by probes that need a bare agent."""

from __future__ import annotations

import threading

from kv_transfer.errors import BackendUnavailableError

INSTALL_HINT = "pip install nixl==1.5.1 (or set transfer.backend: tcp)"


def load_nixl():
    """The nixl._api module, or BackendUnavailableError saying what to install."""
    try:
        from nixl import _api
    except Exception as e:  # ImportError, or a native library that fails to load
        raise BackendUnavailableError(f"transfer.backend is 'nixl' but NIXL cannot be loaded "
                                      f"({type(e).__name__}: {e}): {INSTALL_HINT}") from e
    return _api


_AGENT_CONFIG_LOCK = threading.Lock()


def start_agent(api, name: str, config, progress_delay_us: int):
    """``api.nixl_agent(name, config)`` with its progress thread sleeping ``progress_delay_us``
    between rounds. nixl's Python agent fills the native config itself and sets the delay to 0
    (a busy loop: one core at 100 % in an idle worker), with no parameter for it; so, while the
    agent is made, the native config type it builds ignores that 0 and takes ours."""
    native = api.nixlBind.nixlAgentConfig

    class _DelayedProgress(native):
        def __setattr__(self, key, value):
            super().__setattr__(key, progress_delay_us if key == "pthrDelay" else value)

    with _AGENT_CONFIG_LOCK:
        api.nixlBind.nixlAgentConfig = _DelayedProgress
        try:
            return api.nixl_agent(name, config)
        finally:
            api.nixlBind.nixlAgentConfig = native
