"""Moving KV between nodes: the connector's scheduler side (which blocks move) and worker side (per-layer
writes), the producer and consumer, the signed KV control links, the data planes (`transport/`) and transfer
metrics. What travels on the links (frames, messages, hashing) lives in `wire/`.
"""
