"""Sparse MoE block: fp32-softmax router → top-k (→ renormalise) → experts through kernels.fused_moe,
plus the talker's shared expert gated by a sigmoid."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import fused_moe as _moe
from ..kernels import fused_moe_fp8 as _moe_fp8
from .layers import DenseMLP


class Router(nn.Module):
    def __init__(self, hidden: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (tokens, hidden) → router logits (tokens, experts)."""
        return F.linear(x, self.weight)


class Experts(nn.Module):
    """Stacked expert weights: gate_up_proj (E, 2I, H) with the gate half first, down_proj (E, H, I).

    ``fp8``: float8_e4m3fn codes plus fp32 block scales ``gate_up_proj_scale_inv`` (E, 2·ceil(I/128),
    ceil(H/128)) — the gate part's grid then the up part's, each on its own 128-row grid — and
    ``down_proj_scale_inv`` (E, ceil(H/128), ceil(I/128)).
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int, fp8: bool = False):
        super().__init__()
        wd = torch.float8_e4m3fn if fp8 else None
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden, dtype=wd),
                                         requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate, dtype=wd), requires_grad=False)
        self.gate_up_proj_scale_inv = self.down_proj_scale_inv = None
        if fp8:
            gi, gh = -(-intermediate // 128), -(-hidden // 128)
            self.gate_up_proj_scale_inv = nn.Parameter(torch.empty(num_experts, 2 * gi, gh), requires_grad=False)
            self.down_proj_scale_inv = nn.Parameter(torch.empty(num_experts, gh, gi), requires_grad=False)


class SparseMoE(nn.Module):
    def __init__(self, hidden: int, num_experts: int, top_k: int, intermediate: int, norm_topk_prob: bool,
                 shared_intermediate: int = 0, fp8: bool = False):
        super().__init__()
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob
        self.gate = Router(hidden, num_experts)
        self.experts = Experts(num_experts, hidden, intermediate, fp8)
        if shared_intermediate > 0:
            self.shared_expert = DenseMLP(hidden, shared_intermediate, fp8)
            self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)
        else:
            self.shared_expert = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (tokens, hidden) → (tokens, hidden)."""
        weights, ids = _moe.route(self.gate(x), self.top_k, self.norm_topk_prob)
        ex = self.experts
        if ex.gate_up_proj_scale_inv is not None:
            out = _moe_fp8.fused_moe_fp8(x, ex.gate_up_proj, ex.down_proj, ex.gate_up_proj_scale_inv,
                                         ex.down_proj_scale_inv, weights, ids)
        else:
            out = _moe.fused_moe(x, ex.gate_up_proj, ex.down_proj, weights, ids)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out
