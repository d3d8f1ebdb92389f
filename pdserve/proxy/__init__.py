"""The OpenAI-compatible front door. Never imports torch (tests/proxy/test_api.py checks).

app.py          FastAPI app and lifespan; check order 401 -> 413 -> 400 JSON -> 404 -> 429 -> 400 params ->
                503
protocol.py     OpenAI bodies -> validated, tokenized GenerationRequest (SamplingParams)
body_fields.py  typed reads of a body's fields (a 400 naming the field);  chat_messages.py  chat checks and
                rendering through the chat template;  request_fields.py  vLLM's extra fields, audited
tokenize.py     /tokenize and /detokenize
kv_peers.py     tells prefill nodes of decode nodes' KV listeners, so links open before traffic
serving.py      one request: start its choices, relay JSON or SSE, usage and timings, abort on disconnect
choice.py       one choice's text: incremental detokenization, stop strings, logprob shapes
dispatch.py     one choice on the nodes: route, send Generate, relay Tokens, re-route before the first token
router.py       score_pair (the policy, one pure function) and conditional disaggregation; round robin
nodes.py        node registry from heartbeats: liveness, load, this proxy's own in-flight counts
indexer.py      SUB sockets on the nodes' events ports: heartbeats -> registry, KV events -> prefix index
prefix_index.py the in-process global prefix index (block hash -> nodes)
redis_index.py  the same in Redis, shared by proxies; falls back to the in-process view when Redis is down
node_rpc.py     DEALER sockets to the nodes' rpc ports, signed frames (wire.node_messages)
metrics.py      Prometheus series;  config.py  settings;  errors.py  OpenAI error JSON;  cli.py  `pdserve
                proxy`
"""
