"""The etcd registry, one import away: worker registration, membership, control-plane flags.

    WorkerRegistration  a worker keeps its key alive         (cluster/registration.py)
    MembershipWatcher   router/manager see who is registered (cluster/membership.py)
    ControlState        drain flags and KV quota overrides   (cluster/control_state.py)
    ClusterKeys         the key layout                       (cluster/keys.py)
    EtcdConnector       clients from an EtcdConfig (TLS/auth) (cluster/etcd_client.py)
"""

from cluster.config import EtcdConfig
from cluster.control_state import ControlState, DrainFlag
from cluster.etcd_client import EtcdConfigError, EtcdConnector, EtcdUnavailableError
from cluster.keys import ClusterKeys, decode_worker_info, encode_worker_info
from cluster.membership import MembershipChange, MembershipWatcher
from cluster.prefix_mirror import KeyChange, PrefixMirror
from cluster.registration import RegistrationConflict, WorkerRegistration

__all__ = [
    "ClusterKeys",
    "ControlState",
    "DrainFlag",
    "EtcdConfig",
    "EtcdConfigError",
    "EtcdConnector",
    "EtcdUnavailableError",
    "KeyChange",
    "MembershipChange",
    "MembershipWatcher",
    "PrefixMirror",
    "RegistrationConflict",
    "WorkerRegistration",
    "decode_worker_info",
    "encode_worker_info",
]
