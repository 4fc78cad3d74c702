"""Extension points: a runner backend and a dispatcher defined in this file alone (no edit anywhere
else, one registration line each) run with everything already registered, on 2 gloo ranks, and equal
the float64 reference, forward and gradients. The dispatcher also carries a non-contiguous placement
(experts dealt round-robin), which load_experts, the runner input and the gradients must follow.

The registration lines (register_extensions) run inside this test's own worker processes only: the
pytest process keeps the package's registries, so other test files that list them are unaffected."""
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import ep_runtime as ep
from ep_runtime.dispatchers.base import Dispatcher
from ep_runtime.runner_core import DispatchOutput, RunnerInput, register_format
from ep_runtime.runners.base import RunnerBackend
from ep_runtime.testing import check_layer, make_problem, run_ranks, tolerance

BUILT_IN_DISPATCHERS = ("standard", "deepep_normal", "deepep_ll", "mori")
BUILT_IN_RUNNERS = ("torch", "triton", "masked")
OPTIONS = {"deepep_ll": {"num_max_dispatch_tokens_per_rank": 16}, "mori": {"max_dispatch_tokens_per_rank": 16}}


# ---------------------------------------------------------------- a new runner backend

class Float64LoopRunner(RunnerBackend):
    """Token rows, one expert at a time in float64: the plainest backend the contract allows. Gated SiLU
    without biases only; anything else is rejected at construction, as the contract asks."""

    name = "test_float64_loop"
    layouts = (RunnerInput,)

    def __init__(self, config, hooks=None):
        super().__init__(config, hooks)
        if config.has_bias or not config.is_gated or config.activation != "silu" or config.gemm1_alpha is not None:
            raise ValueError("runner='test_float64_loop' computes gated silu without biases only")

    def compute(self, inp: RunnerInput, weights: ep.ExpertWeights) -> torch.Tensor:
        cfg, x = self.config, inp.hidden_states.double()
        y = torch.zeros_like(x)
        for e in range(inp.num_local_experts):
            if not inp.expert_mask[e]:
                continue
            token, slot = (inp.topk_ids == e).nonzero(as_tuple=True)
            w = inp.topk_weights[token, slot].double().unsqueeze(1)
            rows = x[token] * w if cfg.apply_router_weight_on_input else x[token]
            gate, up = (rows @ weights.w13[e].double().t()).split(cfg.intermediate_size, dim=1)
            out = (F.silu(gate) * up) @ weights.w2[e].double().t()
            y = y.index_add(0, token, out if cfg.apply_router_weight_on_input else out * w)
        return (y * cfg.routed_scaling_factor).to(inp.hidden_states.dtype)


# ---------------------------------------------------------------- a new dispatcher

def _gather_rows(rows: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """Every rank's rows [T_r, C], concatenated in rank order ([sum T, C])."""
    padded = rows.new_zeros(max(sizes), *rows.shape[1:])
    padded[:rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def _sum_own_rows(rows: torch.Tensor, sizes: list[int], rank: int, group) -> torch.Tensor:
    """[sum T, C] partial rows summed over ranks; this rank's slice [T_rank, C]."""
    total = rows.contiguous().clone()
    dist.all_reduce(total, group=group)
    start = sum(sizes[:rank])
    return total[start:start + sizes[rank]]


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, sizes, rank, group):
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return _gather_rows(rows, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        return _sum_own_rows(grad, ctx.sizes, ctx.rank, ctx.group), None, None, None


class _SumOwnRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, sizes, rank, group):
        ctx.sizes, ctx.group = sizes, group
        return _sum_own_rows(rows, sizes, rank, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_rows(grad.contiguous(), ctx.sizes, ctx.group), None, None, None


@dataclass
class AllGatherDispatchOutput(DispatchOutput):
    """Every rank's tokens: hidden_states [sum T, H]; topk_ids [sum T, K] int32 global; topk_weights
    [sum T, K] fp32; num_tokens: T of each rank."""

    format = "test_allgather"
    hidden_states: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    num_tokens: list[int]


class AllGatherDispatcher(Dispatcher):
    """Every rank receives every token, computes its own experts' share of all of them, and combine
    sums the shares on each token's rank (all_reduce). Simple and wasteful: a test of the seams."""

    name = "test_allgather"
    format = "test_allgather"
    round_robin = False  # True: expert e lives on rank e % R

    def __init__(self, config, group=None):
        super().__init__(config, group)
        if self.round_robin:
            owner = [e % self.world_size for e in range(config.num_experts)]
            self.placement = ep.ExpertPlacement(config.num_experts, self.world_size, self.rank, expert_to_rank=owner)

    def _dispatch(self, x, topk):
        sizes = [0] * self.world_size
        dist.all_gather_object(sizes, x.shape[0], group=self.group)
        gather = lambda t: _GatherRows.apply(t, sizes, self.rank, self.group)  # noqa: E731
        return AllGatherDispatchOutput(gather(x), gather(topk.topk_ids), gather(topk.topk_weights), sizes)

    def _combine(self, combine_input):
        return _SumOwnRows.apply(combine_input.hidden_states, combine_input.dispatch_output.num_tokens, self.rank,
                                 self.group)


class RoundRobinAllGatherDispatcher(AllGatherDispatcher):
    name = "test_allgather_round_robin"
    round_robin = True


def register_extensions() -> None:
    """What a plugin module would run at import: one line per backend, dispatcher and format."""
    ep.runners.register(Float64LoopRunner)
    ep.dispatchers.register(AllGatherDispatcher)
    ep.dispatchers.register(RoundRobinAllGatherDispatcher)
    register_format("test_allgather", RunnerInput, lambda out, placement, config: RunnerInput.from_global_ids(
        out.hidden_states, out.topk_ids, out.topk_weights, placement))


# ---------------------------------------------------------------- the tests (each in fresh processes)

def _layer_errors(rank, world_size, dispatcher, runner, extra):
    layer = ep.EPMoE(8, 2, 32, 16, dispatcher=dispatcher, runner=runner, dispatcher_options=OPTIONS.get(dispatcher),
                     **extra)
    return check_layer(layer, make_problem(layer.config, [11, 6][:world_size], seed=4, ep_size=world_size), rank)


def _every_dispatcher_rank(rank, world_size, runner, extra):
    register_extensions()
    return {d: _layer_errors(rank, world_size, d, runner, extra) for d in ep.dispatchers.registered()}


@pytest.mark.parametrize("extra", [{}, dict(apply_router_weight_on_input=True, routed_scaling_factor=2.5)])
def test_new_runner_runs_under_every_dispatcher(extra):
    for errors in run_ranks(_every_dispatcher_rank, 2, Float64LoopRunner.name, extra, timeout=300):
        assert set(errors) == {*BUILT_IN_DISPATCHERS, AllGatherDispatcher.name, RoundRobinAllGatherDispatcher.name}
        assert all(max(e.values()) <= tolerance(torch.float32) for e in errors.values()), errors


def _every_runner_rank(rank, world_size, dispatcher):
    register_extensions()
    return {r: _layer_errors(rank, world_size, dispatcher, r, {}) for r in ep.runners.available()}


@pytest.mark.parametrize("dispatcher", [AllGatherDispatcher.name, RoundRobinAllGatherDispatcher.name])
def test_new_dispatcher_runs_under_every_runner(dispatcher):
    for errors in run_ranks(_every_runner_rank, 2, dispatcher, timeout=300):
        assert set(BUILT_IN_RUNNERS) <= set(errors), "triton and masked run on CPU through TRITON_INTERPRET=1"
        assert all(max(e.values()) <= tolerance(torch.float32) for e in errors.values()), errors


def _registry_rank(rank, world_size):
    """The new backend's construction check and the EP_RUNTIME_RUNNER knob, which reads the registry."""
    import os
    register_extensions()
    with pytest.raises(ValueError, match="computes gated silu without biases only"):
        ep.EPMoE(4, 1, 8, 8, runner=Float64LoopRunner.name, has_bias=True)
    with pytest.raises(ValueError, match="runner 'test_float64_loop' is already registered"):
        ep.runners.register(Float64LoopRunner)
    os.environ["EP_RUNTIME_RUNNER"] = Float64LoopRunner.name  # this worker process only
    assert ep.envs.get("RUNNER") == Float64LoopRunner.name
    assert ep.EPMoE(4, 1, 8, 8).runner.backend.name == Float64LoopRunner.name  # runner="auto" reads the knob
    os.environ["EP_RUNTIME_RUNNER"] = "test_no_such_runner"
    with pytest.raises(ValueError, match=r"EP_RUNTIME_RUNNER='test_no_such_runner' is not allowed; allowed: auto, "
                                         r"torch, triton, masked, test_float64_loop"):
        ep.envs.get("RUNNER")


def test_new_runner_is_checked_and_the_runner_knob_accepts_it():
    run_ranks(_registry_rank, 1)
    assert Float64LoopRunner.name not in ep.runners.registered()  # the pytest process kept the package's registry
