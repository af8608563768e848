"""Step-time model of one GPU serving one model: a roofline with calibrated efficiencies. Pure.

A forward step over a batch costs

    time = overhead + max(compute, memory)
    compute = (2 * params * new_tokens + attention_flops) / (peak_flops * mfu)
    memory  = (weight_bytes + kv_bytes_per_token * sum over sequences of (context + new)) / (bw * bw_eff)
    attention_flops = sum over sequences of 4 * layers * q_dim * new * (context + (new + 1) / 2)

where ``context`` is a sequence's tokens already in the KV cache before the step (cached prefix, earlier
chunks, generated tokens) and ``new`` the tokens computed in the step (a prefill chunk, or 1 for decode).
The attention term counts QK^T and AV (2 FLOPs per multiply-add each) over the causal window. So prefill
time grows with the uncached tokens (and, for long prompts, with the context they attend to), decode is
memory bound at small batch and grows with batch size and the KV tokens read.

Add a profile by adding a :class:`Profile` to :data:`PROFILES`; ``--profile NAME`` picks it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A decoder-only transformer's sizes. ``weight_bytes`` in bytes; ``dtype_bytes`` per KV element."""

    name: str
    params: float
    weight_bytes: float
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int = 2

    @property
    def q_dim(self) -> int:
        """Query width per layer (heads x head_dim) in elements."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V for every layer: ``2 * layers * kv_heads * head_dim * dtype_bytes`` bytes."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """Peak dense throughput (FLOP/s), HBM bandwidth (bytes/s) and memory (bytes) of one GPU."""

    name: str
    peak_flops: float
    hbm_bandwidth: float
    memory_bytes: float


@dataclass(frozen=True, slots=True)
class Profile:
    """A GPU + model pair with the efficiencies that calibrate the roofline.

    Attributes:
        mfu: achieved fraction of ``peak_flops`` in compute-bound steps.
        bw_efficiency: achieved fraction of ``hbm_bandwidth`` in memory-bound steps.
        step_overhead_s: fixed seconds per step (CPU scheduling, kernel launches, sampling).
        mem_fraction_static: SGLang's ``--mem-fraction-static``: share of GPU memory for weights + KV.
    """

    name: str
    model: ModelSpec
    gpu: GpuSpec
    mfu: float
    bw_efficiency: float
    step_overhead_s: float
    mem_fraction_static: float = 0.88

    def kv_capacity_tokens(self) -> int:
        """Default KV pool size in tokens: ``(memory * mem_fraction_static - weights) / kv_bytes_per_token``."""
        room = self.gpu.memory_bytes * self.mem_fraction_static - self.model.weight_bytes
        return max(0, int(room // self.model.kv_bytes_per_token))

    def step_time(self, seqs: Iterable[tuple[int, int]]) -> float:
        """Seconds for one forward step over ``seqs`` = ``(new_tokens, context_tokens)`` per sequence.

        An empty batch costs only the overhead.
        """
        m = self.model
        new_total = 0
        attn_pairs = 0.0  # sum of new * average causal context
        kv_tokens = 0
        for new, ctx in seqs:
            new_total += new
            attn_pairs += new * (ctx + (new + 1) / 2)
            kv_tokens += ctx + new
        flops = 2.0 * m.params * new_total + 4.0 * m.num_layers * m.q_dim * attn_pairs
        compute = flops / (self.gpu.peak_flops * self.mfu)
        memory = (m.weight_bytes + m.kv_bytes_per_token * kv_tokens) / (
            self.gpu.hbm_bandwidth * self.bw_efficiency
        )
        return self.step_overhead_s + max(compute, memory)


# Llama-3.1-8B (meta-llama/Llama-3.1-8B-Instruct config.json): 32 layers, hidden 4096, 32 attention
# heads, 8 KV heads, head_dim 128, 8.03e9 parameters (model card); bf16 weights = 2 bytes x 8.03e9.
LLAMA_3_1_8B = ModelSpec(
    name="llama-3.1-8b",
    params=8.03e9,
    weight_bytes=16.06e9,
    num_layers=32,
    num_attention_heads=32,
    num_kv_heads=8,
    head_dim=128,
)  # KV bytes/token = 2 * 32 * 8 * 128 * 2 = 131072

# H100 SXM5 (NVIDIA H100 datasheet): 989 TFLOP/s dense BF16 (1979 with sparsity), 3.35 TB/s HBM3,
# 80 GB HBM3 (80 GiB devices; CUDA reports ~79.1 GiB usable, we take 80 GiB nominal).
H100_SXM = GpuSpec(name="h100-sxm", peak_flops=989e12, hbm_bandwidth=3.35e12, memory_bytes=80 * 1024**3)

PROFILES: dict[str, Profile] = {
    # Calibration: decode at batch 1 = 1 ms + 16.06 GB / (3.35 TB/s * 0.85) = 1 + 5.64 = ~6.7 ms/token
    # (~150 tok/s, SGLang's published single-stream Llama-3.1-8B H100 figure); prefill of an 8192-token
    # chunk = 1.49e14 FLOP / (989e12 * 0.55) = ~0.27 s, ~30k tok/s (MFU 0.5-0.6 is what large prefills
    # reach on H100). KV capacity = (80 GiB * 0.88 - 16.06 GB) / 131072 B = ~454k tokens.
    "h100-llama3.1-8b": Profile(
        name="h100-llama3.1-8b",
        model=LLAMA_3_1_8B,
        gpu=H100_SXM,
        mfu=0.55,
        bw_efficiency=0.85,
        step_overhead_s=1.0e-3,
    ),
}

DEFAULT_PROFILE = "h100-llama3.1-8b"


def get_profile(name: str) -> Profile:
    """The profile called ``name``.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; known: {', '.join(sorted(PROFILES))}") from None
