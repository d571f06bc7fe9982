"""P2P control plane: identities, the DHT of signed provider entries, announcing, lookups, routing.

The public API (documented in docs/p2p.md) is re-exported here. Nothing in this package touches the
data plane (``inferencemesh._core``).
"""

from inferencemesh.p2p.address import PeerAddress, parse_peer_address, to_multiaddr
from inferencemesh.p2p.announcer import Announcer, AnnounceReport
from inferencemesh.p2p.errors import AddressError, IdentityError, NoRouteError, P2PError, RecordError
from inferencemesh.p2p.identity import Identity, peer_id_of, short_id
from inferencemesh.p2p.lookup import ModelStatus, SwarmStatus, find_block_providers, swarm_status
from inferencemesh.p2p.node import DHTConfig, DHTNode, StoreResult
from inferencemesh.p2p.records import ProviderEntry
from inferencemesh.p2p.routing import CostModel, Hop, Route, plan_route

__all__ = [
    "AddressError",
    "AnnounceReport",
    "Announcer",
    "CostModel",
    "DHTConfig",
    "DHTNode",
    "Hop",
    "Identity",
    "IdentityError",
    "ModelStatus",
    "NoRouteError",
    "P2PError",
    "PeerAddress",
    "ProviderEntry",
    "RecordError",
    "Route",
    "StoreResult",
    "SwarmStatus",
    "find_block_providers",
    "parse_peer_address",
    "peer_id_of",
    "plan_route",
    "short_id",
    "swarm_status",
    "to_multiaddr",
]
