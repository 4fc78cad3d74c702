"""Multi-rank test harness and the shared correctness check (used by tests/ and `ep-runtime demo`).

run_ranks(fn, R, ...) runs fn(rank, world_size, ...) on R local processes joined in a gloo group,
destroys every group, fails with the traceback of any rank that raised, and kills everything after
`timeout` seconds so no test hangs. Processes fork from a server that imported torch once.
"""
from __future__ import annotations

import multiprocessing as mp
import queue
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from .config import MoeConfig
from .distributed import free_port
from .reference import moe_reference, rel_err

_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        # torch._dynamo too: `import ep_runtime` leaves it out, but DDP/FSDP/DCP/compile in a rank import it
        # (2-3 s per rank, 151 -> 61 s for test_training + test_checkpoints); the server imports it once
        _CTX.set_forkserver_preload(["torch", "ep_runtime", "torch._dynamo"])
    return _CTX


class RankFailure(RuntimeError):
    """One or more ranks raised; the message holds each failing rank's traceback."""


def _worker(fn, rank, world_size, port, results, args, kwargs, group_timeout, backend):
    torch.set_num_threads(1)
    status, payload = "ok", None
    try:
        if backend == "nccl":  # one GPU per rank, as torchrun's LOCAL_RANK gives it
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=group_timeout))
        # init_process_group returns on a rank once its own pairs connect; a fn that ends before any collective
        # (an error raised at construction) then closed its sockets under peers still in gloo's connectFullMesh
        # ("Connection closed by peer", 2 runs in 40 of a fn that only returns, 4 ranks on 2 cores).
        dist.barrier()
        payload = fn(rank, world_size, *args, **kwargs)
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent
        status, payload = "error", traceback.format_exc()
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass
    results.put((rank, status, payload))


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0,
              backend: str = "gloo", group_timeout: Optional[float] = None, **kwargs: Any) -> list[Any]:
    """Run fn(rank, world_size, *args, **kwargs) on world_size processes; return each rank's result
    (results must be picklable plain values). fn must be importable (module level). backend="nccl"
    puts rank r on GPU r % (GPUs visible)."""
    ctx = _context()
    port = free_port()
    results = ctx.Queue()
    group_timeout = group_timeout if group_timeout is not None else min(timeout, 60.0)
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, results, args, kwargs, group_timeout,
                                               backend), daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    outcome: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    first_error_at = None
    try:
        while len(outcome) < world_size:
            now = time.monotonic()
            # After one rank failed, give the others a few seconds to report, then stop waiting.
            limit = deadline if first_error_at is None else min(deadline, first_error_at + 10.0)
            if now >= limit:
                break
            try:
                rank, status, payload = results.get(timeout=min(1.0, limit - now))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in outcome]
                for r in dead:
                    outcome[r] = ("error", f"rank {r} died with exit code {procs[r].exitcode}")
                if dead and first_error_at is None:
                    first_error_at = time.monotonic()
                continue
            outcome[rank] = (status, payload)
            if status == "error" and first_error_at is None:
                first_error_at = time.monotonic()
    finally:
        for p in procs:
            p.join(timeout=5.0 if len(outcome) == world_size else 0.1)
            if p.is_alive():
                p.kill()
                p.join()
    errors = [f"--- rank {r} ---\n{payload}" for r, (status, payload) in sorted(outcome.items()) if status == "error"]
    missing = [r for r in range(world_size) if r not in outcome]
    if errors:
        raise RankFailure("\n".join(errors) + (f"\n(ranks {missing} did not finish)" if missing else ""))
    if missing:
        raise TimeoutError(f"ranks {missing} of {world_size} did not finish within {timeout:g} s")
    return [outcome[r][1] for r in range(world_size)]


# ---------------------------------------------------------------- the shared correctness check

@dataclass
class Problem:
    """One layer's global weights and every rank's tokens, built identically on every rank."""

    config: MoeConfig
    w13: torch.Tensor
    w2: torch.Tensor
    b13: Optional[torch.Tensor]
    b2: Optional[torch.Tensor]
    xs: list[torch.Tensor]
    topk_ids: list[torch.Tensor]
    topk_weights: list[torch.Tensor]
    grad_outputs: list[torch.Tensor]


def random_topk_ids(gen: torch.Generator, num_tokens: int, num_experts: int, top_k: int, ep_size: int,
                    minus_one_fraction: float = 0.2, one_rank_fraction: float = 0.1) -> torch.Tensor:
    """[T, K] int32 distinct experts per token; a fraction of slots -1; a fraction of tokens with all
    K experts on one rank (when a rank holds >= K experts)."""
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    L = num_experts // ep_size
    if L >= top_k and ep_size > 1 and num_tokens:
        pick = torch.rand(num_tokens, generator=gen) < one_rank_fraction
        home = torch.randint(0, ep_size, (num_tokens,), generator=gen)
        owner = torch.arange(num_experts) // L
        scores = torch.where(pick[:, None] & (owner[None, :] == home[:, None]), scores + 2.0, scores)
    ids = scores.topk(top_k, dim=1).indices
    holes = torch.rand(num_tokens, top_k, generator=gen) < minus_one_fraction
    return torch.where(holes, torch.full_like(ids, -1), ids).to(torch.int32)


def make_problem(config: MoeConfig, tokens_per_rank: Sequence[int], seed: int = 0, ep_size: int = 1,
                 minus_one_fraction: float = 0.2) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    E, H, I = config.num_experts, config.hidden_size, config.intermediate_size
    randn = lambda *shape, std=1.0: torch.randn(*shape, generator=gen, dtype=torch.float64) * std  # noqa: E731
    w13 = randn(E, config.w13_rows, H, std=H ** -0.5)
    w2 = randn(E, H, I, std=I ** -0.5)
    b13 = randn(E, config.w13_rows, std=0.1) if config.has_bias else None
    b2 = randn(E, H, std=0.1) if config.has_bias else None
    xs, ids, weights, grads = [], [], [], []
    for T in tokens_per_rank:
        xs.append(randn(T, H))
        ids.append(random_topk_ids(gen, T, E, config.top_k, ep_size, minus_one_fraction))
        weights.append(torch.rand(T, config.top_k, generator=gen, dtype=torch.float64).float() + 0.1)
        grads.append(randn(T, H))
    return Problem(config, w13, w2, b13, b2, xs, ids, weights, grads)


def training_step(layer, problem: Problem, rank: int, *, backward: bool = True, weights_need_grad: bool = True
                  ) -> dict[str, Optional[torch.Tensor]]:
    """The layer's forward on this rank's tokens, the experts (and biases) loaded from the problem in the layer's
    dtype and their gradients reset; with `backward`, x needs a gradient (topk_weights too with weights_need_grad),
    sum(y * grad_output) is back-propagated and reduce_replica_grads() makes each redundant copy's gradient its
    expert's. Returns {y, and with backward dx, dweights (with weights_need_grad), dw13, dw2 ([L, ...], this rank's
    experts)} as the layer computed them, not copies (two steps compare bit for bit); a gradient that reached
    nothing is None. training_step_errors compares them with float64."""
    dtype, device = layer.w13.dtype, layer.w13.device
    # a copy, never the problem's own tensor
    cast = lambda t, to=dtype: None if t is None else t.to(to).to(device).clone()  # noqa: E731
    layer.load_experts(cast(problem.w13), cast(problem.w2), cast(problem.b13), cast(problem.b2))
    layer.zero_grad(set_to_none=True)
    x = cast(problem.xs[rank]).requires_grad_(backward)
    weights = cast(problem.topk_weights[rank], torch.float32).requires_grad_(backward and weights_need_grad)
    y = layer(x, problem.topk_ids[rank].to(device), weights)
    step = {"y": y.detach()}
    if backward:
        if y.requires_grad:
            (y * cast(problem.grad_outputs[rank])).sum().backward()
        layer.reduce_replica_grads()  # with redundant experts: each copy's gradient becomes its expert's
        step["dx"] = x.grad
        if weights_need_grad:
            step["dweights"] = weights.grad
        step.update(dw13=layer.w13.grad, dw2=layer.w2.grad)
    return step


def training_step_errors(layer, problem: Problem, rank: int, step: dict[str, Optional[torch.Tensor]]
                         ) -> dict[str, float]:
    """Relative error of each of training_step's results (its keys say which it computed) against the float64
    reference fed the same rounded inputs; a gradient that reached nothing (None) counts as zeros on either side."""
    dtype = layer.w13.dtype
    backward, weights_need_grad = "dx" in step, "dweights" in step
    as64 = lambda t, to=dtype, need_grad=backward: (  # noqa: E731
        None if t is None else t.to(to).double().clone().requires_grad_(need_grad))
    w13, w2, b13, b2 = as64(problem.w13), as64(problem.w2), as64(problem.b13), as64(problem.b2)
    xs = [as64(x_r) for x_r in problem.xs]
    ws = [as64(w_r, torch.float32, weights_need_grad) for w_r in problem.topk_weights]
    # Sharded experts see every rank's tokens (through dispatch); replicated ones see only their own.
    sources = range(len(problem.xs)) if layer.dispatcher.shards_experts else [rank]
    refs = {r: moe_reference(xs[r], problem.topk_ids[r], ws[r], w13, w2, problem.config, b13, b2) for r in sources}
    want = {"y": refs[rank].detach()}
    if backward:
        loss = sum((refs[r] * problem.grad_outputs[r].to(dtype).double()).sum() for r in sources)
        if loss.requires_grad:
            loss.backward()
        grad = lambda t: torch.zeros_like(t) if t.grad is None else t.grad  # noqa: E731
        mine = layer.placement.local_expert_ids()  # this rank's global experts, in local order
        want.update(dx=grad(xs[rank]), dweights=grad(ws[rank]), dw13=grad(w13)[mine], dw2=grad(w2)[mine])
    return {k: rel_err(torch.zeros_like(want[k]) if t is None else t.cpu(), want[k]) for k, t in step.items()}


def check_layer(layer, problem: Problem, rank: int, backward: bool = True) -> dict[str, float]:
    """Run layer forward (and backward) on this rank's tokens (training_step, topk_weights needing no gradient);
    return relative errors against the float64 reference: y, and the gradients of x and of this rank's expert
    weights."""
    return training_step_errors(layer, problem, rank,
                                training_step(layer, problem, rank, backward=backward, weights_need_grad=False))


def mean_loss_reference(dense: torch.nn.Module, problem: "Problem", config: MoeConfig, world_size: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 reference of the training tests' model, tanh(dense(x)) -> MoE: the mean over the ranks of
    each rank's loss sum(y * grad_output), back-propagated (dense, a float64 copy, gets its gradients);
    returns (w13, w2), the global experts holding theirs."""
    w13, w2 = problem.w13.clone().requires_grad_(True), problem.w2.clone().requires_grad_(True)
    loss = sum((moe_reference(torch.tanh(dense(problem.xs[r])), problem.topk_ids[r], problem.topk_weights[r].double(),
                              w13, w2, config) * problem.grad_outputs[r]).sum() for r in range(world_size)) / world_size
    loss.backward()
    return w13, w2


def tolerance(dtype: torch.dtype) -> float:
    """DESIGN.md's bounds: fp32 1e-5 relative (norm), bf16/fp16 2e-2, float64 1e-12."""
    return {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 2e-2)


def host_syncs(fn: Callable[[], Any]) -> list[str]:
    """The host syncs fn() makes on CUDA, as torch.cuda.set_sync_debug_mode reports them (one line each)."""
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [str(w.message).split("\n")[0][:120] for w in caught if "synchronizing CUDA operation" in str(w.message)]
