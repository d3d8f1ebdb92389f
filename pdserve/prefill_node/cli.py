"""`pdserve prefill`: a prefill node (kv_producer by default; kv_both also decodes by itself)."""

from __future__ import annotations

from pdserve.node_runtime import roles


def _prefill_part(node):
    from pdserve.prefill_node.prefill_service import PrefillService

    return PrefillService(node)


roles.register(roles.PREFILL, _prefill_part)


def register_cli(subparsers) -> None:
    from pdserve.node_runtime.node_cli import register_role

    register_role(
        subparsers,
        "prefill",
        "run a prefill node (chunked prefill, pushes KV layer by layer)",
        default_role="kv_producer",
    )
