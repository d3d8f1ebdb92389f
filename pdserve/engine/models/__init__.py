"""The model family (Llama, Qwen2, Mistral) written on our kernels, its registry and its checkpoint loader."""
