"""What every node process runs whatever its role: the RPC and HTTP servers, the engine loop, metrics, the
node CLI and its ready line, and the colocated request path. Roles (prefill_node/, decode_node/) plug in
through `node_runtime.roles`; this package never imports them."""
