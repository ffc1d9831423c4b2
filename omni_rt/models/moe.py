"""Sparse MoE block: fp32-softmax router → top-k (→ renormalise) → experts through kernels.fused_moe; the
talker's sigmoid-gated shared expert is folded into the routed experts after loading (``fuse_shared_expert``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import fused_moe as _moe
from ..kernels import fused_moe_fp8 as _moe_fp8
from .layers import DenseMLP

SCALE_BLOCK = _moe_fp8.SCALE_BLOCK


class Router(nn.Module):
    def __init__(self, hidden: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (tokens, hidden) → router logits (tokens, experts) (+1 column once a shared gate is folded in)."""
        return F.linear(x, self.weight)


class Experts(nn.Module):
    """Stacked expert weights: gate_up_proj (E, 2I, H) with the gate half first, down_proj (E, H, I).

    ``fp8``: float8_e4m3fn codes plus fp32 block scales ``gate_up_proj_scale_inv`` (E, 2·ceil(I/128),
    ceil(H/128)) — the gate part's grid then the up part's, each on its own 128-row grid — and
    ``down_proj_scale_inv`` (E, ceil(H/128), ceil(I/128)). E counts the shared expert's parts once they are
    folded in (``SparseMoE.fuse_shared_expert``).
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


def _as_experts(gate_up: torch.Tensor, down: torch.Tensor, parts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A SwiGLU MLP — gate_up (2·Is, G) with the gate rows first, down (H', Is) — as ``parts`` experts of
    intermediate Is/parts: ((parts, 2·Is/parts, G), (parts, H', Is/parts)). SwiGLU is elementwise over the
    intermediate dimension and down_proj sums over it, so the parts' outputs add up to the MLP's. Works on
    weights and on their block-scale grids alike (rows/columns of 128-blocks, when the parts split on them)."""
    gate, up = gate_up.chunk(2, dim=0)
    g = gate.reshape(parts, -1, gate.shape[1])
    u = up.reshape(parts, -1, up.shape[1])
    return torch.cat([g, u], dim=1), down.reshape(down.shape[0], parts, -1).transpose(0, 1).contiguous()


def _appended(old: torch.Tensor, extra: torch.Tensor | None, rows: int) -> nn.Parameter:
    """``old`` with ``rows`` more entries along dim 0 (``extra``) as a new parameter. On the meta device (the
    census) there is no data to move: the grown shape is only allocated, which launches nothing."""
    if extra is None:
        t = torch.empty((old.shape[0] + rows,) + tuple(old.shape[1:]), dtype=old.dtype, device=old.device)
    else:
        t = torch.cat([old, extra.to(old.dtype)])
    return nn.Parameter(t, requires_grad=False)


class SparseMoE(nn.Module):
    def __init__(self, hidden: int, num_experts: int, top_k: int, intermediate: int, norm_topk_prob: bool,
                 shared_intermediate: int = 0, fp8: bool = False):
        super().__init__()
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob
        self.gate = Router(hidden, num_experts)
        self.experts = Experts(num_experts, hidden, intermediate, fp8)
        # shared-expert parts folded into ``experts`` (0: none, or the shared expert runs on its own)
        self.num_shared = 0
        if shared_intermediate > 0:
            self.shared_expert = DenseMLP(hidden, shared_intermediate, fp8)
            self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)
        else:
            self.shared_expert = None
        # FP8 experts: from this many tokens on (prefill) also quantize the activations (w8a8); None = never
        self.act_fp8_min_tokens: int | None = None

    def materialize_buffers(self, device: torch.device | str) -> None:
        """The post-load hook (``loader.assign_parameters``, ``census.build_meta_model``): the weights are in."""
        self.fuse_shared_expert()

    def shared_parts(self) -> int:
        """How many routed-width experts the shared expert splits into; 0 when it cannot be folded in: its
        intermediate size is not a multiple of the experts', or (FP8) its parts would cut 128-blocks of the
        scale grids."""
        if self.shared_expert is None:
            return 0
        inter = self.experts.down_proj.shape[2]
        shared = self.shared_expert.down_proj.weight.shape[1]
        if shared % inter:
            return 0
        parts = shared // inter
        if self.experts.gate_up_proj_scale_inv is not None and parts > 1 and inter % SCALE_BLOCK:
            return 0
        return parts

    def fuse_shared_expert(self) -> bool:
        """Fold the shared expert into the routed experts (post-load; the on-disk names and the loader are
        untouched): it becomes ``shared_parts()`` more experts of the routed width (appended to the stacks, FP8
        scale grids split along with them), and ``shared_expert_gate`` one more router row, whose sigmoid
        ``route(num_shared=...)`` returns as those experts' weight. The talker's MoE block then costs the
        router GEMM, the routing kernel and the two expert kernels, the shared expert's five ops gone.
        Returns whether it folded (False: nothing to fold, already folded, or ``shared_parts()`` is 0)."""
        parts = self.shared_parts()
        if not parts:
            return False
        ex, se = self.experts, self.shared_expert
        leaves = [("gate_up_proj", "down_proj", "weight")]
        if ex.gate_up_proj_scale_inv is not None:
            leaves.append(("gate_up_proj_scale_inv", "down_proj_scale_inv", "weight_scale_inv"))
        with torch.no_grad():
            for gu_name, dn_name, leaf in leaves:
                if ex.gate_up_proj.is_meta:
                    extra = (None, None)
                else:
                    extra = _as_experts(getattr(se.gate_up_proj, leaf), getattr(se.down_proj, leaf), parts)
                for name, more in zip((gu_name, dn_name), extra):
                    setattr(ex, name, _appended(getattr(ex, name), more, parts))
            self.gate.weight = _appended(self.gate.weight, None if self.gate.weight.is_meta
                                         else self.shared_expert_gate.weight, 1)
        self.shared_expert = self.shared_expert_gate = None
        self.num_shared = parts
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (tokens, hidden) → (tokens, hidden)."""
        weights, ids = _moe.route(self.gate(x), self.top_k, self.norm_topk_prob, self.num_shared)
        ex = self.experts
        if ex.gate_up_proj_scale_inv is not None:
            w8a8 = self.act_fp8_min_tokens is not None and x.shape[0] >= self.act_fp8_min_tokens
            out = _moe_fp8.fused_moe_fp8(x, ex.gate_up_proj, ex.down_proj, ex.gate_up_proj_scale_inv,
                                         ex.down_proj_scale_inv, weights, ids, act_fp8=w8a8)
        else:
            out = _moe.fused_moe(x, ex.gate_up_proj, ex.down_proj, weights, ids)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out
