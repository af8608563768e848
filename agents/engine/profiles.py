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

One step may mix a prefill chunk with decodes (``--enable-mixed-chunk``): every sequence contributes its
``(new, context)`` to the same sums, so the cost is that of one fused forward pass.

Mixture-of-experts models (``ModelSpec.num_experts > 0``) differ in two terms. Compute uses the
*active* parameters per token (``2 * active_params * new_tokens``: attention, embeddings and the
``experts_per_token`` routed experts). Every expert stays resident (``weight_bytes`` counts them all, so
they shrink the KV pool), but a step reads only the experts its tokens are routed to: with ``n`` tokens
in the step, each choosing ``k`` of ``E`` experts per layer, the expected distinct experts read per layer
is ``E * (1 - (1 - k/E)**n)`` (routing taken as uniform and independent: real routers are skewed, which
touches somewhat fewer experts, so this is an upper bound at mid-size batches). So

    weight_bytes_read(n) = (weight_bytes - expert_weight_bytes) + expert_weight_bytes * (1 - (1 - k/E)**n)

is ``k/E`` of the experts at batch 1 and tends to all of them for large batches and every prefill chunk.

Add a profile by adding a :class:`Profile` to :data:`PROFILES`; ``--profile NAME`` picks it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A decoder-only transformer's sizes. ``weight_bytes`` in bytes; ``dtype_bytes`` per KV element.

    Dense models leave the MoE fields at their defaults. For a mixture of experts, ``params`` and
    ``weight_bytes`` cover every expert (all resident), ``active_params`` is the parameters one token
    uses (compute), ``expert_weight_bytes`` the bytes of all routed experts over all layers (the sparsely
    read part of ``weight_bytes``), ``num_experts``/``experts_per_token`` the router's ``E`` and ``k``.
    """

    name: str
    params: float
    weight_bytes: float
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int = 2
    active_params: float | None = None
    expert_weight_bytes: float = 0.0
    num_experts: int = 0
    experts_per_token: int = 0

    @property
    def compute_params(self) -> float:
        """Parameters each token is multiplied through (``active_params`` for MoE, else ``params``)."""
        return self.params if self.active_params is None else self.active_params

    def weight_bytes_read(self, routed_tokens: int) -> float:
        """Weight bytes a step over ``routed_tokens`` tokens reads from HBM (module docstring). Pure.

        Dense: all of ``weight_bytes``. MoE: the non-expert weights plus the expected distinct experts.
        """
        if self.num_experts <= 0 or self.expert_weight_bytes <= 0:
            return self.weight_bytes
        miss = (1.0 - self.experts_per_token / self.num_experts) ** max(routed_tokens, 1)
        return self.weight_bytes - self.expert_weight_bytes * miss

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
        new_total = 0
        attn_pairs = 0.0  # sum of new * average causal context
        kv_tokens = 0
        for new, ctx in seqs:
            new_total += new
            attn_pairs += new * (ctx + (new + 1) / 2)
            kv_tokens += ctx + new
        return self.step_time_from_sums(new_total, attn_pairs, kv_tokens)

    def step_time_from_sums(self, new_total: int, attn_pairs: float, kv_tokens: int) -> float:
        """:meth:`step_time` from its three sums over the batch: ``new_total`` = sum of new tokens,
        ``attn_pairs`` = sum of ``new * (context + (new + 1) / 2)``, ``kv_tokens`` = sum of ``context +
        new``. Every term is a multiple of 0.5 far below 2**53, so the float sum is exact in any order.
        """
        m = self.model
        flops = 2.0 * m.compute_params * new_total + 4.0 * m.num_layers * m.q_dim * attn_pairs
        compute = flops / (self.gpu.peak_flops * self.mfu)
        weights = m.weight_bytes if not m.num_experts else m.weight_bytes_read(new_total)
        memory = (weights + m.kv_bytes_per_token * kv_tokens) / (self.gpu.hbm_bandwidth * self.bw_efficiency)
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

# Qwen2.5-7B (Qwen/Qwen2.5-7B-Instruct config.json): 28 layers, hidden 3584, 28 attention heads, 4 KV
# heads, head_dim 3584 / 28 = 128, intermediate 18944, vocab 152064, embeddings not tied; 7.61e9
# parameters (model card: "Number of Parameters: 7.61B"); bf16 weights = 2 bytes x 7.61e9.
QWEN2_5_7B = ModelSpec(
    name="qwen2.5-7b",
    params=7.61e9,
    weight_bytes=15.22e9,
    num_layers=28,
    num_attention_heads=28,
    num_kv_heads=4,
    head_dim=128,
)  # KV bytes/token = 2 * 28 * 4 * 128 * 2 = 57344

# Qwen3-30B-A3B (Qwen/Qwen3-30B-A3B config.json): 48 layers, hidden 2048, 32 attention heads, 4 KV heads,
# head_dim 128 (so q_dim 4096 > hidden), 128 routed experts, 8 per token, moe_intermediate_size 768,
# vocab 151936, embeddings not tied. Model card: 30.5e9 parameters in total, 3.3e9 activated.
# Routed experts: 48 layers x 128 experts x 3 matrices (gate, up, down) x 2048 x 768 = 28.99e9
# parameters = 57.98e9 bf16 bytes; the rest (attention 0.91e9, embedding + LM head 0.62e9, router
# gates 0.01e9) is read by every step. Active per token: 1.54e9 + 8/128 x 28.99e9 = 3.35e9 (card: 3.3e9).
QWEN3_30B_A3B = ModelSpec(
    name="qwen3-30b-a3b",
    params=30.5e9,
    weight_bytes=61.0e9,
    num_layers=48,
    num_attention_heads=32,
    num_kv_heads=4,
    head_dim=128,
    active_params=3.3e9,
    expert_weight_bytes=57.98e9,
    num_experts=128,
    experts_per_token=8,
)  # KV bytes/token = 2 * 48 * 4 * 128 * 2 = 98304

# H20 (NVIDIA H20 product brief): 148 TFLOP/s dense BF16, 4.0 TB/s HBM3, 96 GB HBM3 (taken as 96 GiB
# nominal, like the H100 entry above; CUDA reports slightly less).
H20 = GpuSpec(name="h20", peak_flops=148e12, hbm_bandwidth=4.0e12, memory_bytes=96 * 1024**3)

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
    # H20 + Qwen2.5-7B. Efficiencies are assumed (no H20 calibration run of our own): bw_efficiency 0.8
    # (decode GEMVs typically reach 75-85 % of HBM peak), mfu 0.6 (the H20 has ~6.7x less compute than
    # an H100 per byte of bandwidth, so large prefill GEMMs sit closer to its peak; 0.55 on H100 above),
    # overhead 1 ms as on H100 (CPU scheduling + graph launch do not depend on the GPU's FLOPs).
    # Decode at batch 1 = 1 ms + 15.22 GB / (4.0 TB/s * 0.8) = 1 + 4.76 = ~5.8 ms/token (~175 tok/s);
    # prefill of an 8192-token chunk = 1.38e14 FLOP / (148e12 * 0.6) = ~1.55 s (~5.3k tok/s, about
    # 1/6 of the H100 Llama-8B figure, in line with the FLOP ratio). KV capacity = (96 GiB * 0.88 -
    # 15.22 GB) / 57344 B = ~1.32M tokens.
    "h20-qwen2.5-7b": Profile(
        name="h20-qwen2.5-7b",
        model=QWEN2_5_7B,
        gpu=H20,
        mfu=0.6,
        bw_efficiency=0.8,
        step_overhead_s=1.0e-3,
    ),
    # H20 + Qwen3-30B-A3B (MoE). Assumed: mfu 0.4 (fused-MoE grouped GEMMs run well below dense GEMM
    # efficiency), bw_efficiency 0.8 as above, overhead 2 ms (48 layers, each adding top-k routing, token
    # permutation and expert-alignment kernels to the step). Decode at batch 1 = 2 ms + (3.02 GB dense +
    # 8/128 x 57.98 GB experts) / 3.2 TB/s = 2 + 2.08 = ~4.1 ms/token; at batch 64, 98 % of the experts
    # are touched: ~2 + 60 GB / 3.2 TB/s = ~21 ms plus KV reads. Prefill of an 8192-token chunk =
    # 8.0e13 FLOP / (148e12 * 0.4) = ~1.36 s (~6k tok/s). KV capacity = (96 GiB * 0.88 - 61.0 GB) /
    # 98304 B = ~0.30M tokens (all 128 experts are resident).
    "h20-qwen3-30b-a3b": Profile(
        name="h20-qwen3-30b-a3b",
        model=QWEN3_30B_A3B,
        gpu=H20,
        mfu=0.4,
        bw_efficiency=0.8,
        step_overhead_s=2.0e-3,
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
