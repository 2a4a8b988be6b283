"""Moving KV blocks between workers: one connector interface, two transports (NIXL, ZMQ)."""

from kvcache.transfer.base import (
    CONNECTOR_VERSION,
    Arrival,
    IncompatiblePeerError,
    KVConnector,
    KVEndpoint,
    KVLayout,
    SendResult,
    endpoint_problems,
)
from kvcache.transfer.collate import Region, collate

__all__ = [
    "CONNECTOR_VERSION",
    "Arrival",
    "IncompatiblePeerError",
    "KVConnector",
    "KVEndpoint",
    "KVLayout",
    "Region",
    "SendResult",
    "collate",
    "create_connector",
    "endpoint_problems",
]


def create_connector(
    transport: str, worker_id: str, kv_cache, layout: KVLayout, host: str = "127.0.0.1"
) -> KVConnector:
    """ "nixl", "zmq" or "auto" (NIXL when importable, else the ZMQ fallback)."""
    if transport in ("auto", "nixl"):
        try:
            from kvcache.transfer.nixl_connector import NixlConnector
        except ImportError:
            if transport == "nixl":
                raise
        else:
            return NixlConnector(worker_id, kv_cache, layout)
    if transport in ("auto", "zmq"):
        from kvcache.transfer.zmq_connector import ZmqConnector

        return ZmqConnector(worker_id, kv_cache, layout, host=host)
    raise ValueError(f"unknown KV transport {transport!r} (nixl, zmq or auto)")
