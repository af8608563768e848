"""Step-time profiles: the roofline's shape for every profile, and the MoE expert-traffic model."""

from __future__ import annotations

from itertools import pairwise

import pytest

from agents.engine.profiles import PROFILES, QWEN3_30B_A3B, Profile, get_profile

ALL = sorted(PROFILES)


def decode_time(p: Profile, batch: int, context: int = 2000) -> float:
    return p.step_time([(1, context)] * batch)


def test_known_profiles_are_registered() -> None:
    assert {"h100-llama3.1-8b", "h20-qwen2.5-7b", "h20-qwen3-30b-a3b"} <= set(PROFILES)
    for name in ALL:
        assert get_profile(name).name == name


@pytest.mark.parametrize("name", ALL)
def test_ttft_grows_with_uncached_prompt_tokens(name: str) -> None:
    p = get_profile(name)
    times = [p.step_time([(n, 0)]) for n in (16, 512, 2048, 8192)]
    assert times == sorted(times) and times[-1] > 4 * times[1]
    # A prefix hit: the same prompt with 6k of its 8k tokens cached computes only 2k (attending to 8k).
    assert p.step_time([(2048, 6144)]) < p.step_time([(8192, 0)])
    # Attention over a long cached context costs extra.
    assert p.step_time([(2048, 60_000)]) > p.step_time([(2048, 0)])


@pytest.mark.parametrize("name", ALL)
def test_tpot_grows_with_batch_size(name: str) -> None:
    p = get_profile(name)
    times = [decode_time(p, b) for b in (1, 2, 8, 32, 128, 256)]
    assert all(a < b for a, b in pairwise(times))
    assert decode_time(p, 8, context=50_000) > decode_time(p, 8, context=1000)


@pytest.mark.parametrize("name", ALL)
def test_decode_throughput_saturates_with_batch_size(name: str) -> None:
    p = get_profile(name)
    batches = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    tput = [b / decode_time(p, b) for b in batches]  # output tokens/s
    assert all(a <= b for a, b in pairwise(tput))  # never falls...
    gains = [b / a for a, b in pairwise(tput)]
    assert gains[0] > 1.5  # ...nearly doubles at first (weights read once for the whole batch)...
    assert gains[-1] < 1.2  # ...and flattens once compute or KV reads dominate
    m = p.model
    ceiling = p.gpu.peak_flops * p.mfu / (2 * m.compute_params)  # compute bound, ignoring attention
    assert tput[-1] < ceiling


@pytest.mark.parametrize("name", ALL)
def test_kv_capacity_is_memory_minus_weights(name: str) -> None:
    p = get_profile(name)
    cap = p.kv_capacity_tokens()
    room = p.gpu.memory_bytes * p.mem_fraction_static - p.model.weight_bytes
    assert cap == int(room // p.model.kv_bytes_per_token)
    assert 100_000 < cap < 2_000_000  # tens of long prompts at least, and below the 96/80 GB pool


def test_h20_profiles_match_their_specs() -> None:
    q7 = get_profile("h20-qwen2.5-7b")
    assert q7.model.kv_bytes_per_token == 2 * 28 * 4 * 128 * 2
    assert 1_200_000 < q7.kv_capacity_tokens() < 1_400_000
    assert 0.005 < decode_time(q7, 1, 100) < 0.007
    moe = get_profile("h20-qwen3-30b-a3b")
    assert moe.model.kv_bytes_per_token == 2 * 48 * 4 * 128 * 2
    assert 250_000 < moe.kv_capacity_tokens() < 350_000  # every expert resident: a small pool
    # Same GPU, dense 7B vs MoE with 3.3B active: the MoE decodes faster at batch 1 and prefills faster.
    assert decode_time(moe, 1) < decode_time(q7, 1)
    assert moe.step_time([(8192, 0)]) < q7.step_time([(8192, 0)])


def test_moe_expert_traffic_grows_with_tokens_routed() -> None:
    m = QWEN3_30B_A3B
    dense = m.weight_bytes - m.expert_weight_bytes
    one = m.weight_bytes_read(1)
    assert one == pytest.approx(dense + m.expert_weight_bytes * 8 / 128)
    reads = [m.weight_bytes_read(n) for n in (1, 2, 8, 32, 128, 8192)]
    assert all(a < b for a, b in pairwise(reads))
    assert reads[-1] == pytest.approx(m.weight_bytes)  # a prefill chunk touches every expert
    assert m.compute_params == 3.3e9
    # Dense models always read all their weights.
    q7 = get_profile("h20-qwen2.5-7b").model
    assert q7.weight_bytes_read(1) == q7.weight_bytes_read(1000) == q7.weight_bytes
