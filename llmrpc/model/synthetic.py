"""Random llama-architecture GGUF files: tiny ones for tests, large ones for benchmarks.

Written with gguf-py's ``GGUFWriter`` and a small SentencePiece-style vocabulary
(control tokens and the 256 byte tokens), so llama.cpp loads them as it loads any model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class SyntheticSpec:
    n_layer: int = 4
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    n_vocab: int = 320
    n_ctx_train: int = 2048
    weight_type: str = "F32"  # F32, F16, Q8_0, Q4_0, Q4_1: the type of the 2-D matrices
    tied_output: bool = False
    seed: int = 0
    std: float = 0.08
    rope_freq_base: float = 10000.0
    fast_random: bool = False  # random quantized blocks instead of quantizing floats (for big files)


def _vocab(n_vocab: int) -> tuple[list[bytes], list[float], list[int]]:
    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{i:02X}>".encode() for i in range(256)]
    types = [2, 3, 3] + [6] * 256  # UNKNOWN, CONTROL, CONTROL, BYTE...
    i = 0
    while len(tokens) < n_vocab:
        tokens.append(f"\u2581w{i}".encode())
        types.append(1)
        i += 1
    tokens, types = tokens[:n_vocab], types[:n_vocab]
    scores = [0.0] * 3 + [-1000.0] * 256 + [-float(j) for j in range(len(tokens) - 259)]
    return tokens, scores[:n_vocab], types


def _matrix(rng: np.random.Generator, rows: int, cols: int, spec: SyntheticSpec) -> tuple[np.ndarray, Any]:
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    qtype = Q[spec.weight_type]
    if qtype == Q.F32:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * spec.std), qtype
    if qtype == Q.F16:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * spec.std).astype(np.float16), qtype
    if spec.fast_random:
        return _random_blocks(rng, rows, cols, qtype, spec.std), qtype
    data = rng.standard_normal((rows, cols), dtype=np.float32) * spec.std
    return quantize(data, qtype), qtype


def _random_blocks(rng: np.random.Generator, rows: int, cols: int, qtype: Any, std: float) -> np.ndarray:
    """Valid quantized blocks with random quants and a fixed scale: no float pass needed."""
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    n_blocks = rows * cols // block
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(std / 4).tobytes(), dtype=np.uint8)
    raw[:, 0:2] = scale  # Q4_0/Q8_0/Q4_1 blocks start with an f16 scale
    if size > 2 + block // 2 and qtype != 8:  # Q4_1: f16 min follows the scale
        raw[:, 2:4] = np.frombuffer(np.float16(-std / 2).tobytes(), dtype=np.uint8)
    return raw.reshape(rows, cols // block * size)


def write_llama_gguf(path: str | os.PathLike[str], spec: SyntheticSpec) -> str:
    from gguf import GGUFWriter

    path = os.fspath(path)
    rng = np.random.default_rng(spec.seed)
    hd = spec.n_embd // spec.n_head
    w = GGUFWriter(path, "llama")
    w.add_name("llmrpc-synthetic")
    w.add_block_count(spec.n_layer)
    w.add_context_length(spec.n_ctx_train)
    w.add_embedding_length(spec.n_embd)
    w.add_feed_forward_length(spec.n_ff)
    w.add_head_count(spec.n_head)
    w.add_head_count_kv(spec.n_head_kv)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(spec.rope_freq_base)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(spec.n_vocab)
    w.add_file_type(0)
    tokens, scores, types = _vocab(spec.n_vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def matrix(name: str, rows: int, cols: int) -> None:
        data, qtype = _matrix(rng, rows, cols, spec)
        w.add_tensor(name, data, raw_dtype=qtype)

    def norm(name: str) -> None:
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(spec.n_embd)).astype(np.float32))

    matrix("token_embd.weight", spec.n_vocab, spec.n_embd)
    norm("output_norm.weight")
    if not spec.tied_output:
        matrix("output.weight", spec.n_vocab, spec.n_embd)
    kv = hd * spec.n_head_kv
    for i in range(spec.n_layer):
        norm(f"blk.{i}.attn_norm.weight")
        matrix(f"blk.{i}.attn_q.weight", spec.n_embd, spec.n_embd)
        matrix(f"blk.{i}.attn_k.weight", kv, spec.n_embd)
        matrix(f"blk.{i}.attn_v.weight", kv, spec.n_embd)
        matrix(f"blk.{i}.attn_output.weight", spec.n_embd, spec.n_embd)
        norm(f"blk.{i}.ffn_norm.weight")
        matrix(f"blk.{i}.ffn_gate.weight", spec.n_ff, spec.n_embd)
        matrix(f"blk.{i}.ffn_up.weight", spec.n_ff, spec.n_embd)
        matrix(f"blk.{i}.ffn_down.weight", spec.n_embd, spec.n_ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
