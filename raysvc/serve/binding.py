"""Where a Serve replica listens.

Ray 2.60's replica starts its inter-deployment gRPC server (the proxy reaches the replica through it when
RAY_SERVE_USE_GRPC_BY_DEFAULT is on, and deployments call each other through it) on `[::]:0`, hard-coded: every
interface, IPv4 and IPv6, whatever address the node was given. Every other Ray server binds the node's own IP, which
for raysvc's private Ray is 127.0.0.1. Ray has no setting for it (`--node-ip-address`, RAY_NODE_IP_ADDRESS and
`http_options.host` leave it alone), so the replica names the node's IP itself before Serve starts that server:
the routers connect to exactly that address (the replica's node IP and this port), so nothing else changes.
"""

from __future__ import annotations

WILDCARD = "[::]:"


def bind_replica_grpc_to_node_ip() -> str | None:
    """Make this replica's inter-deployment gRPC server bind the node IP instead of all interfaces; the host it will
    bind, or None where this Ray's replica module has no such call (a Ray that changed it: nothing to patch)."""
    import ray
    import ray.serve._private.replica as replica

    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None:
        return None
    host = ray.util.get_node_ip_address()
    bracketed = f"[{host}]" if ":" in host else host
    if getattr(original, "raysvc_host", None) == bracketed:
        return host

    def add_port(server, address: str):
        if address.startswith(WILDCARD):
            address = bracketed + address[len(WILDCARD) - 1 :]
        return original(server, address)

    add_port.raysvc_host = bracketed
    replica.add_port_to_grpc_server = add_port
    return host
