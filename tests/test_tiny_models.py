"""The tiny checkpoints (examples/tiny/tiny_models.py) look trained: no norm weight is all ones, no bias all zeros, and
no two tensors are equal, so a parity test can tell a dropped, swapped or mis-mapped norm or bias from a correct one."""
import itertools

import pytest
import torch
from safetensors.torch import load_file

CHECKPOINTS = pytest.mark.parametrize("name", ["qwen3", "qwen3_untied", "qwen25vl", "qwen3_moe"])


def is_norm(key: str) -> bool:
    return key.endswith("norm.weight") or ".norm1." in key or ".norm2." in key or ".ln_q." in key


@CHECKPOINTS
def test_no_norm_weight_is_all_ones_and_no_bias_all_zeros(fixture_paths, name):
    tensors = load_file(str(fixture_paths[name] / "model.safetensors"))
    norms = [k for k in tensors if is_norm(k)]
    biases = [k for k in tensors if k.endswith(".bias")]
    assert len(norms) >= 5 and (biases or name.startswith("qwen3"))  # Qwen3 has no biases, Qwen2.5-VL many
    if name.startswith("qwen3"):
        assert {"model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.k_norm.weight"} <= set(norms)
    ones = [k for k in norms if torch.all(tensors[k] == 1)]
    assert not ones, ones
    zeros = [k for k in biases if torch.count_nonzero(tensors[k]) < tensors[k].numel()]
    assert not zeros, zeros
    spread = torch.cat([tensors[k].float() for k in norms])
    assert 0.05 < spread.std().item() < 0.2 and abs(spread.mean().item() - 1) < 0.05


@CHECKPOINTS
def test_no_two_tensors_of_a_checkpoint_are_equal(fixture_paths, name):
    tensors = load_file(str(fixture_paths[name] / "model.safetensors"))
    same = [(a, b) for a, b in itertools.combinations(sorted(tensors), 2)
            if tensors[a].shape == tensors[b].shape and torch.equal(tensors[a], tensors[b])]
    assert not same, same[:5]
