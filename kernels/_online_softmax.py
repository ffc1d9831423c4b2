"""Shared Triton device function for the flash-style attention kernels (paged decode, prefill)."""
import triton
import triton.language as tl


@triton.jit
def online_softmax_step(s, m_i, l_i):
    """Fold one tile of scores into the running softmax state (base-2 exponentials; scores pre-scaled by
    log2 e). s: (M, N) fp32 masked scores (-inf where not visible); m_i, l_i: (M,) running max and denominator.
    Callers guarantee every row has seen a visible key by the first tile, so the max is finite and exp2 never
    sees inf - inf. Returns (p (M, N) tile probabilities, alpha (M,) rescale of the old accumulator, new m_i,
    new l_i); the caller then does ``acc = acc * alpha[:, None] + dot(p, v)`` (loading v only after this, which
    keeps register pressure low).
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)
