"""What crosses a process boundary or serves the proxy; torch-free (stdlib, msgspec/msgpack, pyzmq,
tokenizers, jinja2). The proxy imports only this package; every other package may import it.

frames.py         signed, versioned msgpack frames (FrameCodec / SignedCodec) and the KV link's messages
node_messages.py  node RPC messages (Generate, Prefill, FirstToken, Tokens, ...), heartbeats, node roles
kv_events.py      KV cache events in vLLM's format, and how a batch travels on ZMQ PUB
hashing.py        chained block hashes, one function for the proxy and the engine
replay.py         replay guard for ZMQ frames;  curve.py  ZMQ CURVE;  bind.py  where sockets bind
sampling_params.py, tokenizer.py, detokenizer.py   what a request asks for, and text <-> token ids
errors.py         errors a user can act on
model_source.py   --model as a folder or a Hugging Face hub id in the local cache (offline)
"""
