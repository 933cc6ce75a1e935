"""Chats of the new families as the API renders them (the GGUF's own template, as
llama-cpp-python renders it) answer what llama-cpp-python's create_chat_completion answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmrpc.farm import Farm
from llmrpc.model.synthetic import family_spec, write_gguf
from llmrpc.openai_api import parse_request
from llmrpc.reference import reference_llama
from llmrpc.sampling import SamplingParams

# The templates these families' GGUFs carry (as published with the models), shortened to what
# a plain chat uses.
TEMPLATES = {
    "qwen3": (  # ChatML, as Qwen 2.5 and 3
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "gemma3": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
        "{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\\n' + "
        "message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}"
        "{{'<start_of_turn>model\\n'}}{% endif %}"
    ),
    "phi3": (
        "{% for message in messages %}{{'<|' + message['role'] + '|>' + '\\n' + message['content'] + '<|end|>\\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    ),
}
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name three colours."},
    {"role": "assistant", "content": "Red, green, blue."},
    {"role": "user", "content": "And two more?"},
]


@pytest.mark.parametrize("family", TEMPLATES)
def test_chat_completion_is_llama_cpps(tmp_path: Path, servers: list[str], family: str) -> None:
    spec = family_spec(family, weight_type="Q8_0", seed=2, chat_template=TEMPLATES[family])
    path = write_gguf(tmp_path / "m.gguf", spec)
    llm = reference_llama(path, n_ctx=512, n_threads=2)
    want = llm.create_chat_completion(MESSAGES, max_tokens=24, temperature=0.0, top_k=1, repeat_penalty=1.0)
    with Farm(path, servers[:2], ctx_size=512) as farm:
        request = parse_request({"messages": MESSAGES, "max_tokens": 24}, farm.tokenizer, 512, chat=True)
        tokens = list(farm.generate_tokens(request.prompt_tokens, 24, SamplingParams(temperature=0)))
        text = farm.tokenizer.decode(tokens)
    assert want["usage"]["prompt_tokens"] == len(request.prompt_tokens)
    assert text == want["choices"][0]["message"]["content"]
