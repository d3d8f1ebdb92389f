"""The fleet planner: a node's measured profile (`pdserve profile`) in, a prefill:decode split out (`pdserve
plan`). Torch-free, so the proxy can use it too."""
