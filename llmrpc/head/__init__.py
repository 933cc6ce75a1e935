"""The head: plans a farm, ships weights, streams activations through the servers, samples.

llama.cpp's libraries are loaded here, before anything imports grpcio: the other way round,
llama.cpp's model load (the tokenizer's too) segfaulted on a CUDA build (seen on an H200 machine
with grpcio 1.85.1 and CUDA 13.0; importing llama_cpp first avoided it).
"""

import llama_cpp  # noqa: F401
