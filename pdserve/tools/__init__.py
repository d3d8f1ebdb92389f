"""Writers of random-weight Hugging Face checkpoints (`pdserve make-model`): the model config and weights
(make_model.py, through the streaming safetensors writer), and a real BPE tokenizer trained on a built-in
corpus with a chat template (make_tokenizer.py, tokenizer_corpus.py). Used by tests, benchmarks and `pdserve
up`; the serving path never imports it.
"""
