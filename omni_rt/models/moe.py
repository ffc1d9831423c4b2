"""Sparse MoE block: fp32-softmax router → top-k (→ renormalise) → experts through kernels.fused_moe,
plus the talker's shared expert gated by a sigmoid."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import fused_moe as _moe
from .layers import DenseMLP


class Router(nn.Module):
    def __init__(self, hidden: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (tokens, hidden) → router logits (tokens, experts)."""
        return F.linear(x, self.weight)


class Experts(nn.Module):
    """Stacked expert weights: gate_up_proj (E, 2I, H) with the gate half first, down_proj (E, H, I)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))


class SparseMoE(nn.Module):
    def __init__(self, hidden: int, num_experts: int, top_k: int, intermediate: int, norm_topk_prob: bool,
                 shared_intermediate: int = 0):
        super().__init__()
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob
        self.gate = Router(hidden, num_experts)
        self.experts = Experts(num_experts, hidden, intermediate)
        if shared_intermediate > 0:
            self.shared_expert = DenseMLP(hidden, shared_intermediate)
            self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)
        else:
            self.shared_expert = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (tokens, hidden) → (tokens, hidden)."""
        weights, ids = _moe.route(self.gate(x), self.top_k, self.norm_topk_prob)
        out = _moe.fused_moe(x, self.experts.gate_up_proj, self.experts.down_proj, weights, ids)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out
