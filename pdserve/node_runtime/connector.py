"""The KV connector's config for a node: the layout from the loaded model, the policy from the node's
flags (--kv-transfer-config; connector-specific keys come from its kv_connector_extra_config); and the
node's KV caches, every tensor-parallel rank's, as the connector addresses them."""

from __future__ import annotations

import dataclasses
import os


def connector_config(node):
    from pdserve.kvconnector.connector import ConnectorConfig

    runner, config = node.core.runner, node.config
    arch = runner.arch
    cfg = ConnectorConfig.from_kv_transfer(
        config.kv_transfer,
        model=os.path.basename(os.path.normpath(config.model.model)),
        dtype=runner.dtype,
        block_size=config.cache.block_size,
        num_layers=arch.num_hidden_layers,
        num_kv_heads=arch.num_key_value_heads,
        head_dim=arch.head_dim,
        layer_windows=arch.layer_windows,
        secret=node.options.kv_secret,
        timeout=node.options.kv_timeout,
    )
    # --kv-transfer-config's engine_id names this connector in handshakes and logs (default: random).
    return (
        dataclasses.replace(cfg, engine_id=config.kv_transfer.engine_id)
        if config.kv_transfer.engine_id
        else cfg
    )


def kv_layout(node):
    """The HeadLayout of the node's ranks' caches (one rank without tensor parallelism)."""
    from pdserve.engine.tensor_parallel import kv_head_range
    from pdserve.kvconnector.head_layout import HeadLayout

    runner = node.core.runner
    heads, size = runner.arch.num_key_value_heads, len(runner.rank_caches)
    ranges = [kv_head_range(heads, rank, size) for rank in range(size)]
    return HeadLayout.of_ranks(runner.rank_caches, ranges, heads, runner.rank_exports)
