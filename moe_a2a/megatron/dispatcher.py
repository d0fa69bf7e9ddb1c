"""``MoEA2ATokenDispatcher``: megatron-core's six-method token-dispatcher interface on ``moe_a2a.fused_a2a``.

Selected with ``moe_token_dispatcher_type="moe_a2a"`` after ``moe_a2a.megatron.install()``. Two
paths, chosen by ``config.moe_flex_dispatcher_backend`` (the key Megatron's flex dispatcher uses):

* ``"deepep"``: tokens travel with their top-k expert ids and weights (``fused_dispatch``); the
  received copies are then grouped by local expert here, and ungrouped before ``fused_combine``.
* ``"hybridep"``: ``hybrid_ep_dispatch`` takes the multi-hot routing map and returns the tokens
  already grouped by local expert (padded per expert for FP8 GEMMs), ``hybrid_ep_combine`` undoes it.
  With ``moe_pad_expert_input_to_capacity`` the output size is known up front: no host sync.

Buffer-resident mode (``config.moe_a2a_buffer_resident``, default True; set False for the plain calls):
the deepep path receives the dispatched rows in the communication buffer and permutes them from there,
and writes the summed expert output straight into the buffer's combine input; backward likewise (the
combine's backward receives its gradient in the buffer, the permute's backward sums into the combine
input). Every such tensor is held in ``moe_a2a.resident`` until read: if another dispatch or combine on
the same buffer runs first (overlap schedules, other micro-batches, another layer), it is copied out
before being overwritten, so results are the same in either mode.

Tensor x expert parallelism is handled as megatron's ``flex`` dispatcher does it: one communication
group over all TP x EP ranks (``pg_collection.tp_ep``). A token routed to an expert of EP rank ``e``
is sent to every expert-TP rank of ``e``; each computes a partial expert output (its slice of the
FFN) and the combine's sum over copies adds the partials, so no separate TP all-gather or
reduce-scatter is needed.

Shapes (T = tokens of this rank, H = hidden, K = top-k x expert-TP size, L = local experts,
N = received copies, P = rows given to the experts):

    dispatch_preprocess  [S/TP, B, H], routing_map [T, E] bool, probs [T, E] -> [T, H], probs
    token_dispatch       -> [N, H] (deepep) or [P, H] (hybridep), received probs
    dispatch_postprocess -> [P, H], tokens_per_expert [L] int64 on the CPU, permuted probs [P] float32
    combine_preprocess   [P, H] -> [N, H] (deepep) or [P, H] (hybridep)
    token_combine        -> [T, H]
    combine_postprocess  -> [S/TP, B, H]
"""
from __future__ import annotations

from typing import List, Optional

import torch

from megatron.core.transformer.moe.moe_utils import get_align_size_for_quantization, get_capacity
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher

from .. import fused_a2a, resident
from ..permute import GatherRows, SumRows, group_by_expert

BACKENDS = ("deepep", "hybridep")


class MoEA2ATokenDispatcher(MoETokenDispatcher):
    """Token dispatcher for megatron-core's ``MoELayer`` running on moe_a2a's dispatch/combine.

    Args:
        num_local_experts: experts held by this rank (``num_moe_experts / EP``).
        local_expert_indices: their global indices.
        config: the layer's ``TransformerConfig``; reads ``moe_flex_dispatcher_backend``,
            ``moe_router_topk``, ``moe_expert_capacity_factor``, ``moe_pad_expert_input_to_capacity``,
            ``moe_router_padding_for_quantization``, ``moe_flex_dispatcher_num_sms`` (0.19) or
            ``moe_deepep_num_sms`` / ``moe_hybridep_num_sms`` (0.16), and ``moe_a2a_buffer_resident``
            (moe_a2a's own attribute, default True: see the module docstring).
        pg_collection: process groups (``ep``, ``expt_tp``, ``tp_ep``).
    """

    def __init__(self, num_local_experts: int, local_expert_indices: List[int], config,
                 pg_collection=None) -> None:
        if pg_collection is None:
            from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

            pg_collection = get_default_pg_collection()
        super().__init__(config=config, pg_collection=pg_collection)
        self.num_local_experts = num_local_experts
        self.local_expert_indices = local_expert_indices
        self.backend = getattr(config, "moe_flex_dispatcher_backend", "deepep")
        self.buffer_resident = bool(getattr(config, "moe_a2a_buffer_resident", True))
        if self.backend not in BACKENDS:
            raise ValueError(f"moe_flex_dispatcher_backend={self.backend!r} is not supported by the moe_a2a "
                             f"dispatcher; expected one of {BACKENDS}")
        if config.moe_shared_expert_overlap:
            raise NotImplementedError("moe_shared_expert_overlap is not supported by the moe_a2a dispatcher "
                                      "(megatron implements it for the alltoall dispatcher only)")
        self.group = self.tp_ep_group
        self.group_size = self.tp_size * self.ep_size
        # The routing map is widened to one column per (EP rank, TP rank, local expert).
        self.num_group_experts = self.num_local_experts * self.group_size
        self.topk = config.moe_router_topk * self.tp_size
        self.drop_and_pad = bool(config.moe_pad_expert_input_to_capacity)
        if self.drop_and_pad and config.moe_expert_capacity_factor is None:
            raise ValueError("moe_pad_expert_input_to_capacity=True needs moe_expert_capacity_factor")
        if self.drop_and_pad and self.backend == "deepep":
            raise NotImplementedError(
                "moe_pad_expert_input_to_capacity with moe_flex_dispatcher_backend='deepep': a padded "
                "routing map may route a token to more than top-k experts, which the top-k form cannot "
                "carry; use moe_flex_dispatcher_backend='hybridep'")
        self.pad_multiple: Optional[int] = None
        if config.moe_router_padding_for_quantization:
            self.pad_multiple = get_align_size_for_quantization(config)
        # megatron-core 0.19 unified the SM counts into moe_flex_dispatcher_num_sms.
        legacy = "moe_deepep_num_sms" if self.backend == "deepep" else "moe_hybridep_num_sms"
        self.num_sms = next((v for v in (getattr(config, "moe_flex_dispatcher_num_sms", None),
                                         getattr(config, legacy, None)) if v is not None), 20)
        if self.backend == "deepep":
            fused_a2a.set_deepep_num_sms(self.num_sms)
        self._reset()

    def _reset(self) -> None:
        self.handle = None
        self.hidden_shape = None
        self.routing_map = None  # [T, group experts] bool (hybridep)
        self.token_indices = None  # [T, K] int64 (deepep)
        self.recv_indices = None  # [N, K] int64 local expert of each received slot (deepep)
        self.token_probs = None
        self.src_rows = None  # [P] int64 received row of each expert row (deepep); N marks padding
        self.num_recv = None
        self.num_permuted_tokens = None
        self.tokens_per_expert = None

    # ------------------------------------------------------------------------------------ dispatch
    def dispatch_preprocess(self, hidden_states: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor):
        """Flatten tokens and widen ``routing_map``/``probs`` ``[T, E]`` to the TP x EP group's columns.

        Returns ``(hidden [T, H], probs)``: probs ``[T, K]`` float32 (deepep) or ``[T, group experts]``
        float32 (hybridep).
        """
        self.hidden_shape = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, self.hidden_shape[-1])
        num_tokens = hidden_states.size(0)
        # [T, EP, L] -> [T, EP, TP, L]: every expert-TP rank of an EP rank receives the token.
        shape = (num_tokens, self.ep_size, 1, self.num_local_experts)
        routing_map = routing_map.reshape(shape).expand(-1, -1, self.tp_size, -1).reshape(num_tokens, -1)
        probs = probs.reshape(shape).expand(-1, -1, self.tp_size, -1).reshape(num_tokens, -1).float()
        if self.backend == "hybridep":
            self.routing_map = routing_map.contiguous()
            self.token_probs = probs.contiguous()
            if self.drop_and_pad:
                # The router kept exactly `capacity` tokens per expert on every rank (padding with
                # zero-weight tokens), so each local expert receives capacity x group size rows.
                capacity = get_capacity(num_tokens=num_tokens * self.config.moe_router_topk,
                                        num_experts=self.config.num_moe_experts,
                                        capacity_factor=self.config.moe_expert_capacity_factor)
                rows = capacity * self.group_size
                self.tokens_per_expert = torch.full((self.num_local_experts,), rows, dtype=torch.int64)
                self.num_permuted_tokens = rows * self.num_local_experts
            return hidden_states, self.token_probs
        # Top-k form from the routing map itself (not from probs), so tokens the router dropped under a
        # capacity factor are "-1" even when a kept weight is 0. Ascending expert order per token.
        columns = torch.arange(self.num_group_experts, device=routing_map.device)
        keyed = torch.where(routing_map, columns, self.num_group_experts)
        k = min(self.topk, self.num_group_experts)
        indices = keyed.topk(k, dim=1, largest=False, sorted=True).values
        valid = indices < self.num_group_experts
        self.token_indices = torch.where(valid, indices, -1)
        self.token_probs = probs.gather(1, indices.clamp(max=self.num_group_experts - 1)).masked_fill(~valid, 0.0)
        return hidden_states, self.token_probs

    def token_dispatch(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        """Send tokens to the ranks of their experts; returns ``(received tokens, received probs)``."""
        if self.backend == "hybridep":
            x, dispatched_probs, _, tokens_per_expert, self.handle = fused_a2a.hybrid_ep_dispatch(
                hidden_states, self.routing_map, probs, self.group, self.num_local_experts,
                num_sms_dispatch_api=self.num_sms, num_sms_combine_api=self.num_sms,
                num_permuted_tokens=self.num_permuted_tokens, pad_multiple=self.pad_multiple)
            if not self.drop_and_pad:
                self.tokens_per_expert = tokens_per_expert  # host counts of the dispatch
                self.num_permuted_tokens = int(tokens_per_expert.sum())
            return x, dispatched_probs
        dispatch = fused_a2a.fused_dispatch
        if self.buffer_resident:
            # Room for the most rows a rank can receive (megatron gives every rank the same token count).
            fused_a2a.reserve_receive_rows(self.group, hidden_states.size(0) * self.group_size)
            dispatch = fused_a2a.fused_dispatch_resident
        x, recv_indices, recv_probs, tokens_per_expert, self.handle = dispatch(
            hidden_states, self.token_indices, probs, self.num_group_experts, self.group)
        self.recv_indices = recv_indices
        self.tokens_per_expert = tokens_per_expert
        return x, recv_probs

    def dispatch_postprocess(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        """Group received copies by local expert.

        Returns ``(tokens [P, H], tokens_per_expert [L] int64 on the CPU, probs [P] float32, or float64
        with ``moe_router_dtype="fp64"``)``.
        """
        if self.backend == "hybridep":
            return hidden_states, self.tokens_per_expert.cpu(), self._expert_probs(probs)
        hidden_states = resident.claim(hidden_states)  # the received rows, or their copy if overwritten since
        self.num_recv = hidden_states.size(0)
        counts = self.tokens_per_expert
        if self.pad_multiple:
            counts = (counts + self.pad_multiple - 1) // self.pad_multiple * self.pad_multiple
        self.src_rows, row_probs = group_by_expert(self.recv_indices, probs, counts, self.num_local_experts)
        self.recv_indices = None
        self.tokens_per_expert = counts
        num_topk = self.token_indices.size(1) if self.token_indices is not None else 0
        permuted = GatherRows.apply(hidden_states, self.src_rows, self._buffer_target(num_topk))
        return permuted, counts, self._expert_probs(row_probs)

    def _buffer_target(self, num_topk: int):
        """What a gradient or output summed into the combine input needs: ``(group, handle, num_topk)``, or
        None in plain mode."""
        return (self.group, self.handle, num_topk) if self.buffer_resident else None

    def _expert_probs(self, probs: torch.Tensor) -> torch.Tensor:
        # Communication carries float32 weights; an fp64 router gives the experts fp64 ones, as megatron does.
        return probs.double() if self.config.moe_router_dtype == "fp64" else probs

    # ------------------------------------------------------------------------------------- combine
    def combine_preprocess(self, hidden_states: torch.Tensor):
        """deepep: sum each received token's expert rows ``[P, H]`` -> ``[N, H]``; hybridep: unchanged."""
        if self.backend == "hybridep":
            return hidden_states
        target = self._buffer_target(0)
        summed = SumRows.apply(hidden_states, self.src_rows, self.num_recv, target)
        self.src_rows = None
        if target is not None:
            # Held as the graph's tensor (the one megatron hands to token_combine); never read stale.
            resident.hold(fused_a2a.get_buffer(self.group, fused_a2a.get_hidden_bytes(hidden_states)), summed)
        return summed

    def token_combine(self, hidden_states: torch.Tensor):
        """Send expert outputs back to the tokens' ranks, summed per token: ``[T, H]``."""
        if self.backend == "hybridep":
            out = fused_a2a.hybrid_ep_combine(hidden_states, self.handle, self.num_permuted_tokens,
                                              self.pad_multiple)
            if not self.drop_and_pad:
                self.num_permuted_tokens = None
        else:
            combine = fused_a2a.fused_combine_resident if self.buffer_resident else fused_a2a.fused_combine
            out, _ = combine(resident.claim(hidden_states), self.group, self.handle)
        self.handle = None
        return out

    def combine_postprocess(self, hidden_states: torch.Tensor):
        """Restore the layer's input shape ``[S/TP, B, H]``."""
        return hidden_states.view(self.hidden_shape)

