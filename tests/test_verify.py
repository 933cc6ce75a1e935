"""`verify`: a farm's logits and greedy text against llama.cpp on the same machine."""

from __future__ import annotations

import subprocess
import sys

from llmrpc.farm import Farm
from llmrpc.head.verify import verify


def test_a_farm_on_this_machine_is_identical(smollm2: str, servers: list[str]) -> None:
    with Farm(smollm2, servers[:2], ctx_size=512) as farm:
        verdict = verify(farm, prompts=["The capital of France is"], n_greedy=16)
    (check,) = verdict.checks
    assert check.max_rel_diff == 0 and check.greedy == 16 and check.agree == 16
    assert verdict.identical and verdict.line().startswith("IDENTICAL to llama.cpp: 1 prompts")


def test_a_farm_that_rounds_its_hidden_states_is_not(smollm2: str, servers: list[str]) -> None:
    """Hidden states sent as f16 between the servers: close to llama.cpp, not identical."""
    with Farm(smollm2, servers[:2], ctx_size=512, f16_activations=True) as farm:
        verdict = verify(farm, prompts=["The capital of France is"], n_greedy=4)
    assert not verdict.identical
    assert 0 < verdict.checks[0].max_rel_diff < 1e-1
    assert "IDENTICAL" not in verdict.line()


def test_verify_command_prints_the_verdict(tiny_models: dict[str, str], servers: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "llmrpc.cli", "verify", "-m", tiny_models["Q4_0"], "--rpc-servers", ",".join(servers),
         "--prompt", "abc", "-n", "8"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith("IDENTICAL to llama.cpp: 1 prompts")
