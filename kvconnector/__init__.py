"""Everything that crosses the network: block hashing, wire schemas, KV events, the connector and transports.

This package's __init__ imports nothing heavy: the proxy imports the torch-free modules (hashing, wire,
events) and must never pull torch in. Transports and the worker side import torch themselves.
"""
