"""Every way a KV transfer can fail, as one family of typed errors.

All of them derive from TransferError, carry a plain message plus a few named fields, and pickle
(they cross Ray actor boundaries: a prefill worker's LeaseExpiredError is raised again in the decode
worker). ``kind`` is the stable label used in metrics (``failures_total{error=kind}``).

Who frees what after a failure: the transceiver never frees engine blocks. The decode worker frees
the blocks it allocated for the request; the prefill worker frees its pinned blocks on release or
on lease expiry (LeaseTable reports expiries to it).
"""

from __future__ import annotations


class TransferError(Exception):
    kind = "transfer"

    def __init__(self, message: str, *, request_id: str = "", peer: str = ""):
        super().__init__(message)
        self.message = message
        self.request_id = request_id
        self.peer = peer

    def __reduce__(self):
        # cls(message) then restore every field: survives pickling with keyword-only fields.
        return (self.__class__, (self.message,), self.__dict__.copy())

    def __str__(self) -> str:
        return self.message


class DeadlineExceededError(TransferError):
    """The transfer did not complete before its deadline. The local destination blocks hold
    undefined bytes; the caller frees them."""

    kind = "deadline"


class PeerGoneError(TransferError):
    """The remote worker disconnected or died (before or during the transfer)."""

    kind = "peer_gone"


class TransportError(TransferError):
    """The backend (NIXL/UCX or the TCP stream) reported a failure that is not a disconnect."""

    kind = "transport"


class LeaseExpiredError(TransferError):
    """The prefill side's pin on the blocks ran out before the release: the blocks may have been
    reused while being read, so data READ for this request must be discarded."""

    kind = "lease_expired"


class UnknownLeaseError(TransferError):
    """No lease with this request id was ever pinned here (or it was already released)."""

    kind = "unknown_lease"


class CompatMismatchError(TransferError):
    """Two engines whose KV blocks mean different things (layout.compat_diff is non-empty), or
    whose transceivers use different backends. ``diff`` is {field: (ours, theirs)}."""

    kind = "compat_mismatch"

    def __init__(self, message: str, *, diff: dict[str, tuple[object, object]] | None = None, **kw):
        super().__init__(message, **kw)
        self.diff = dict(diff or {})

    @classmethod
    def from_diff(cls, diff: dict[str, tuple[object, object]], peer: str) -> "CompatMismatchError":
        fields = ", ".join(f"{k}: ours={a!r} theirs={b!r}" for k, (a, b) in sorted(diff.items()))
        return cls(f"KV layout of peer {peer!r} is incompatible ({fields})", diff=diff, peer=peer)


class UnknownPeerError(TransferError):
    """No handshake with this peer yet: call add_peer(peer_info) first."""

    kind = "unknown_peer"


class StalePeerError(TransferError):
    """The handshake we hold is older than the peer's segment set (its kv_epoch moved, or a block
    lies in a segment we have not heard of): fetch a fresh PeerInfo, add_peer it, retry."""

    kind = "stale_peer"


class TransferAbortedError(TransferError):
    """The other side gave up on a layer-wise transfer (it sent an abort notification)."""

    kind = "aborted"


class BackendUnavailableError(TransferError):
    """The configured backend cannot be loaded; the message says what to install or set."""

    kind = "backend_unavailable"
