"""The benchmark (``llmrpc-bench``, ``make bench``): llmrpc next to llama.cpp in one run."""
