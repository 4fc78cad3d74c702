"""EPMoE: the expert-parallel MoE layer. forward reads as the data flow: route, dispatch, run, combine."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from . import dispatchers, runners
from .config import ExpertWeights, MoeConfig
from .dispatchers.peer_transport import describe as describe_transport
from .distributed import naming_peer_failures
from .routing import TopKConfig, TopKOutput, select_experts
from .runner_core import MoeRunner
from .validation import check_finite, check_hidden_states, layer_dtype_and_device


class EPMoE(nn.Module):
    """Mixture-of-Experts layer whose experts are spread over the ranks of `group`.

    Owns this rank's experts only: w13 [L, 2I, H] ([gate; up]; [L, I, H] when not gated),
    w2 [L, H, I], b13/b2 when has_bias. `load_experts` takes the global [E, ...] weights of a
    checkpoint and keeps this rank's slice, or this rank's [L, ...] shard; `gather_experts` hands
    every expert back in that layout. device="meta" builds it without memory: `to_empty(device=...)`
    then `load_experts` materialises it. dispatcher: a name from ep_runtime.dispatchers;
    runner: a name from ep_runtime.runners or "auto" (EP_RUNTIME_RUNNER, else triton on CUDA,
    else torch). group None: the default process group when one exists, else a single process.
    Until load_experts, the experts are random and depend only on the seed and their global ids
    (see reset_parameters): an EP layer equals a one-process layer built after the same manual_seed.
    expert_to_rank: which rank holds each global expert (default contiguous: rank r holds
    [r*L, (r+1)*L)); load_experts, gather_experts and the exchange all follow it.
    shared_experts: a module every rank holds (DeepSeek-V3's and Qwen2-MoE's shared experts),
    [T, H] -> [T, H]; forward adds its output to the routed experts'. It runs while the dispatch is
    in flight (on a side CUDA stream, or on CPU ranks while the exchange thread moves the rows), so
    it costs no time on the critical path; the sum equals routed + shared computed one after the other.
    """

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, *,
                 dispatcher: str = "standard", runner: str = "auto", group: Optional[Any] = None,
                 dtype: torch.dtype = torch.float32, device: Any = None,
                 activation: str = "silu", is_gated: bool = True, has_bias: bool = False,
                 gemm1_alpha: Optional[float] = None, gemm1_clamp_limit: Optional[float] = None,
                 routed_scaling_factor: float = 1.0, apply_router_weight_on_input: bool = False,
                 topk_config: Optional[TopKConfig] = None, hooks: Optional[runners.GemmHooks] = None,
                 dispatcher_options: Optional[dict] = None, runner_options: Optional[dict] = None,
                 expert_to_rank: Optional[Sequence[int]] = None, shared_experts: Optional[nn.Module] = None):
        super().__init__()
        from . import envs
        if shared_experts is not None and not isinstance(shared_experts, nn.Module):
            raise TypeError(f"shared_experts={type(shared_experts).__name__}; allowed: None or an nn.Module "
                            f"mapping [T, H] to [T, H]")
        self.shared_experts = shared_experts
        self._side_streams: dict = {}
        self.config = MoeConfig(num_experts, top_k, hidden_size, intermediate_size, activation=activation,
                                is_gated=is_gated, has_bias=has_bias, gemm1_alpha=gemm1_alpha,
                                gemm1_clamp_limit=gemm1_clamp_limit, routed_scaling_factor=routed_scaling_factor,
                                apply_router_weight_on_input=apply_router_weight_on_input)
        if group is None and dist.is_available() and dist.is_initialized():
            group = dist.group.WORLD
        dtype, device = layer_dtype_and_device(dtype, device)
        options = dict(dispatcher_options or {})
        if expert_to_rank is not None:
            options["expert_to_rank"] = expert_to_rank
        self.dispatcher = dispatchers.create(dispatcher, self.config, group=group, device=device, **options)
        self.placement = self.dispatcher.placement
        if runner == "auto":
            runner = envs.get("RUNNER")
        backend = runners.create(runner, self.config, hooks=hooks, device=device, format=self.dispatcher.format,
                                 **(runner_options or {}))
        self.runner = MoeRunner(backend, self.config, self.placement)
        self.runner.check_format(self.dispatcher.format)
        self.topk_config = topk_config or TopKConfig(top_k=top_k)
        if self.topk_config.top_k != top_k:
            raise ValueError(f"topk_config.top_k={self.topk_config.top_k} differs from top_k={top_k}")
        self.topk_config.check(num_experts)

        L, H, I = self.placement.num_local_experts, hidden_size, intermediate_size
        factory = dict(dtype=dtype, device=device)
        self.w13 = nn.Parameter(torch.empty(L, self.config.w13_rows, H, **factory))
        self.w2 = nn.Parameter(torch.empty(L, H, I, **factory))
        self.b13 = nn.Parameter(torch.zeros(L, self.config.w13_rows, **factory)) if has_bias else None
        self.b2 = nn.Parameter(torch.zeros(L, H, **factory)) if has_bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random initial experts that depend only on torch's seed and each expert's global id, so a
        layer spread over R ranks holds exactly the experts a one-process layer built after the same
        torch.manual_seed holds (and two ranks never start with copies of each other's experts).
        One base seed is drawn from torch's global generator (the same draw on every rank), then
        expert e gets its own generator seeded base + e: w13 ~ N(0, 1/H), w2 ~ N(0, 1/I), drawn in
        float32 on the CPU and cast to the layer's dtype; biases start at 0. Nothing is drawn on the
        meta device (materialise with to_empty, then load_experts)."""
        base = int(torch.randint(0, 2 ** 62, (), dtype=torch.int64))
        if self.w13.is_meta:
            return
        H, I = self.config.hidden_size, self.config.intermediate_size
        global_ids = self.placement.local_expert_ids().tolist()
        for local, expert in enumerate(global_ids):
            gen = torch.Generator().manual_seed(base + expert)
            self.w13[local].copy_(torch.randn(self.w13.shape[1:], generator=gen) * H ** -0.5)
            self.w2[local].copy_(torch.randn(self.w2.shape[1:], generator=gen) * I ** -0.5)
        for bias in (self.b13, self.b2):
            if bias is not None:
                bias.zero_()

    @property
    def weights(self) -> ExpertWeights:
        return ExpertWeights(self.w13, self.w2, self.b13, self.b2)

    @torch.no_grad()
    def load_experts(self, w13: torch.Tensor, w2: torch.Tensor, b13: Optional[torch.Tensor] = None,
                     b2: Optional[torch.Tensor] = None) -> None:
        """Load this rank's experts from either the global weights (w13 [E, 2I, H], gate rows then up
        rows, [E, I, H] when not gated; w2 [E, H, I]; b13 [E, 2I]; b2 [E, H]), of which it keeps its
        shard, or this rank's shard itself ([L, ...], experts in the order of its global ids: what
        gather_experts' inverse and a sharded checkpoint hold), so no rank needs every expert in
        memory. Dim 0 tells them apart: E means global, L means shard (with one rank, L == E and both
        are the same). Works after building on the meta device and `to_empty(device=...)`."""
        E, L = self.config.num_experts, self.placement.num_local_experts
        given = w13.shape[0] if isinstance(w13, torch.Tensor) and w13.dim() == 3 else None
        if given not in (E, L):
            raise ValueError(f"w13 has shape {list(w13.shape) if isinstance(w13, torch.Tensor) else w13!r}; dim 0 must "
                             f"be num_experts={E} (global weights) or this rank's num_local_experts={L} (its shard)")
        shard = given == L
        full = ExpertWeights(w13, w2, b13, b2)
        full.check(self.config, L if shard else E)
        experts = self.placement.local_expert_ids()  # this rank's global ids, in local order
        for name in ("w13", "w2", "b13", "b2"):
            src = getattr(full, name)
            if src is not None:  # checked after the copy, in the layer's dtype (float8 sources have no isfinite)
                piece = src if shard else src[experts.to(src.device)]
                check_finite(f"{name} (experts {self.placement.describe_local_experts()})",
                             getattr(self, name).copy_(piece))

    @torch.no_grad()
    def gather_experts(self, dst: Optional[int] = None) -> Optional[ExpertWeights]:
        """Every expert back in checkpoint layout: ExpertWeights with w13 [E, 2I, H] ([gate; up]),
        w2 [E, H, I] (and b13 [E, 2I], b2 [E, H] with biases), the inverse of load_experts. dst None:
        on every rank (one all_gather per tensor); dst r (a rank of the layer's group): only there
        (one gather per tensor), the other ranks get None. Every rank of the group must call it."""
        shards = [self.w13, self.w2, self.b13, self.b2]
        group, R = self.dispatcher.group, self.dispatcher.world_size
        if dst is not None and (isinstance(dst, bool) or not isinstance(dst, int) or not 0 <= dst < R):
            raise ValueError(f"dst={dst!r}; allowed: None (every rank) or a rank 0..{R - 1} of the layer's group")
        me = self.dispatcher.rank
        if not self.dispatcher.shards_experts or R == 1:  # every rank already holds every expert
            if dst is not None and me != dst:
                return None
            return ExpertWeights(*[t.detach().clone() if t is not None else None for t in shards])
        local_ids = self.placement.local_expert_ids(self.w13.device)
        ids = self._collect(local_ids, group, R, dst)
        out = []
        for t in shards:
            parts = None if t is None else self._collect(t.detach().contiguous(), group, R, dst)
            if parts is None or (dst is not None and me != dst):
                out.append(None)
                continue
            full = parts.new_empty((self.config.num_experts,) + tuple(parts.shape[2:]))
            full[ids.reshape(-1)] = parts.reshape((-1,) + tuple(parts.shape[2:]))
            out.append(full)
        if dst is not None and me != dst:
            return None
        return ExpertWeights(*out)

    @staticmethod
    def _collect(t: torch.Tensor, group, world_size: int, dst: Optional[int]) -> Optional[torch.Tensor]:
        """[R, *t.shape]: every rank's t in group-rank order, on every rank (dst None) or on dst only."""
        parts = [torch.empty_like(t) for _ in range(world_size)]
        if dst is None:
            dist.all_gather(parts, t, group=group)
        elif dist.get_rank(group) == dst:
            dist.gather(t, parts, group=group, group_dst=dst)
        else:
            dist.gather(t, None, group=group, group_dst=dst)
            return None
        return torch.stack(parts)

    def forward(self, x: torch.Tensor, topk_ids: Optional[torch.Tensor] = None,
                topk_weights: Optional[torch.Tensor] = None, *, router_logits: Optional[torch.Tensor] = None,
                correction_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [T, H] -> y [T, H]. Give topk_ids [T, K] (global, -1 allowed) with topk_weights [T, K],
        or router_logits [T, E] (routed with self.topk_config). x may also be [..., H] (e.g. a Hugging
        Face block's [batch, seq, H]) with ids/weights/logits [..., K or E]: tokens are flattened and
        y comes back in x's shape."""
        if isinstance(x, torch.Tensor) and x.dim() > 2:
            lead = tuple(x.shape[:-1])
            K, E = self.config.top_k, self.config.num_experts
            y = self.forward(x.reshape(-1, x.shape[-1]), _flatten("topk_ids", topk_ids, lead, K),
                             _flatten("topk_weights", topk_weights, lead, K),
                             router_logits=_flatten("router_logits", router_logits, lead, E),
                             correction_bias=correction_bias)
            return y.view(*lead, y.shape[-1])
        check_hidden_states(x, self.config.hidden_size, self.w13.dtype, self.w13.device)
        topk = self.route(x, topk_ids, topk_weights, router_logits, correction_bias)
        if self.shared_experts is None:
            with naming_peer_failures(self.dispatcher, "dispatch"):
                dispatch_output = self.dispatcher.dispatch(x, topk)
            return self.experts_and_combine(dispatch_output)
        routed, shared = self.routed_and_shared(x, topk)
        return routed + shared

    def experts_and_combine(self, dispatch_output) -> torch.Tensor:
        """The routed experts on a (waited) dispatch output, then combine: [T, H]."""
        combine_input = self.runner.run(dispatch_output, self.weights)
        with naming_peer_failures(self.dispatcher, "combine"):
            return self.dispatcher.combine(combine_input)

    def routed_and_shared(self, x: torch.Tensor, topk: TopKOutput, shared_experts: Optional[nn.Module] = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """(routed experts' output, shared(x)), both [T, H], shared = shared_experts or the layer's own;
        the shared experts run while the dispatch is in flight. CUDA: on a side stream forked before the dispatch is issued (so they also
        overlap a host-planned dispatch's count read) and joined before this returns."""
        shared_module = shared_experts if shared_experts is not None else self.shared_experts
        side = None
        if x.is_cuda:
            caller = torch.cuda.current_stream(x.device)
            side = self._side_streams.setdefault(x.device, torch.cuda.Stream(x.device))
            side.wait_stream(caller)
            with torch.cuda.stream(side):
                shared = shared_module(x)
            x.record_stream(side)
        with naming_peer_failures(self.dispatcher, "dispatch"):
            dispatch_output, work = self.dispatcher.dispatch(x, topk, async_op=True)
        if side is None:  # CPU ranks: here, while the exchange thread moves the rows
            shared = shared_module(x)
        with naming_peer_failures(self.dispatcher, "dispatch"):
            work.wait()
        routed = self.experts_and_combine(dispatch_output)
        if side is not None:
            caller.wait_stream(side)
            shared.record_stream(caller)
        return routed, shared

    def route(self, x, topk_ids, topk_weights, router_logits, correction_bias) -> TopKOutput:
        if router_logits is not None:
            if topk_ids is not None or topk_weights is not None:
                raise ValueError("give either topk_ids/topk_weights or router_logits, not both")
            if router_logits.dim() != 2 or tuple(router_logits.shape) != (x.shape[0], self.config.num_experts):
                raise ValueError(f"router_logits has shape {list(router_logits.shape)}; expected "
                                 f"[{x.shape[0]}, {self.config.num_experts}] (T, num_experts)")
            return select_experts(router_logits, self.topk_config, correction_bias)
        if topk_ids is None or topk_weights is None:
            raise ValueError("forward needs topk_ids and topk_weights, or router_logits")
        return TopKOutput(topk_ids, topk_weights)  # checked by the dispatcher before any exchange

    def extra_repr(self) -> str:
        c = self.config
        transport = getattr(self.dispatcher, "transport_options", None)
        moved_by = "" if transport is None else ", " + describe_transport(self.dispatcher.group, transport.transport)
        return (f"E={c.num_experts}, K={c.top_k}, H={c.hidden_size}, I={c.intermediate_size}, "
                f"L={self.placement.num_local_experts}, dispatcher={self.dispatcher.name}, "
                f"runner={self.runner.backend.name}{moved_by}"
                + (", shared_experts" if self.shared_experts is not None else ""))


def _flatten(name: str, t: Optional[torch.Tensor], lead: tuple, last: int) -> Optional[torch.Tensor]:
    """[*lead, last] -> [prod(lead), last]; a tensor without x's leading dims is an error."""
    if not isinstance(t, torch.Tensor):
        return t
    if tuple(t.shape) != lead + (last,):
        raise ValueError(f"{name} has shape {list(t.shape)}; expected {list(lead) + [last]} (x's leading dims, "
                         f"then {'num_experts' if name == 'router_logits' else 'top_k'})")
    return t.reshape(-1, last)
