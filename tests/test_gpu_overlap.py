"""Asynchronous exchanges on GPUs (marker `gpu`; 2 NCCL ranks, skipped without 2 GPUs): the exchange
is ordered after the caller's stream and after previous_event, runs on the communication stream while
the caller's stream goes on, equals the synchronous call bit for bit; the receive-hook path and the
two-micro-batch schedule capture into CUDA graphs whose replays equal the sequential eager run; a
layer's shared experts on the side stream leave its output unchanged."""
import traceback

import pytest
import torch

import ep_runtime as ep
from ep_runtime.bench.overlap import capture_graphs, run_overlapped, run_sequential
from ep_runtime.runner_core import CombineInput
from ep_runtime.testing import run_ranks

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                                  reason="needs 2 CUDA GPUs")]

E, K, H, INTER, T = 32, 4, 256, 128, 96
OPTIONS = {"deepep_normal": {}, "deepep_normal static": dict(num_worst_tokens=2 * T, num_max_dispatch_tokens_per_rank=T),
           "deepep_ll": dict(num_max_dispatch_tokens_per_rank=T), "mori": dict(max_dispatch_tokens_per_rank=T)}
SLEEP = 200_000_000  # cycles of torch.cuda._sleep: ~0.1 s, far longer than the exchange


def _routing(device, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.rand(T, E, device=device, generator=gen).topk(K, dim=1).indices.to(torch.int32)
    w = torch.rand(T, K, device=device, generator=gen)
    return ep.TopKOutput(ids, w / w.sum(1, keepdim=True))


def _rows(out):
    return getattr(out, "recv_x", None)


def _checked(out: dict, key: str, fn) -> None:
    try:
        out[key] = ("ok", fn())
    except Exception:  # noqa: BLE001 - report this case, go on with the others
        out[key] = ("error", traceback.format_exc()[-2000:])


def _ordering(rank, name, device) -> dict:
    d = ep.dispatchers.create(name.split()[0], ep.MoeConfig(E, K, H, INTER), **OPTIONS[name])
    data = torch.randn(T, H, device=device, dtype=torch.bfloat16)
    topk = _routing(device, 1 + rank)
    sync = d.dispatch(data, topk)
    y_sync = d.combine(CombineInput(_rows(sync) * 2, sync))
    # x is written by a kernel queued behind a long sleep on the caller's stream: the exchange must
    # read it after that (ordered after the caller's stream), not the zeros there when it was called.
    x = torch.zeros_like(data)
    torch.cuda._sleep(SLEEP)
    x.copy_(data)
    out, work = d.dispatch(x, topk, async_op=True)
    work.wait()
    y, work = d.combine(CombineInput(_rows(out) * 2, out), async_op=True)
    work.wait()
    after_caller = torch.equal(y, y_sync)
    # previous_event: x written on another stream the caller never waited for.
    side = torch.cuda.Stream()
    x2 = torch.zeros_like(data)
    with torch.cuda.stream(side):
        torch.cuda._sleep(SLEEP)
        x2.copy_(data)
        written = torch.cuda.Event()
        written.record()
    out, work = d.dispatch(x2, topk, async_op=True, previous_event=written)
    work.wait()
    y2 = d.combine(CombineInput(_rows(out) * 2, out))
    after_event = torch.equal(y2, y_sync)
    # While rank 1's caller stream sleeps before its dispatch, rank 0's exchange cannot finish, yet
    # rank 0's caller stream runs on: its own event completes first.
    torch.cuda.synchronize()
    torch.distributed.barrier()
    if rank == 1:
        torch.cuda._sleep(SLEEP)
    out, work = d.dispatch(data, topk, async_op=True)
    mine = torch.cuda.Event()
    torch.cuda._sleep(1000)
    mine.record()
    mine.synchronize()
    # (a host-planned dispatch reads the count table inside the call, so only static plans return early)
    static = name in ("deepep_ll", "deepep_normal static")
    pending_while_caller_ran = not work.is_completed() if rank == 0 and static else True
    work.wait()
    torch.cuda.synchronize()
    return dict(after_caller=after_caller, after_event=after_event,
                pending_while_caller_ran=pending_while_caller_ran, event=isinstance(work.event, torch.cuda.Event))


def _hook_graph(rank, device) -> dict:
    runner = "masked" if "masked" in ep.runners.available() else "triton"
    layer = ep.EPMoE(E, K, H, INTER, dispatcher="deepep_ll", runner=runner, dtype=torch.bfloat16, device=device,
                     dispatcher_options=dict(num_max_dispatch_tokens_per_rank=T))
    x = torch.randn(T, H, device=device, dtype=torch.bfloat16)
    topk = _routing(device, 5 + rank)
    d = layer.dispatcher

    def hooked():
        out, hook = d.dispatch(x, topk, return_recv_hook=True)
        hook()
        y, hook = d.combine(layer.runner.run(out, layer.weights), return_recv_hook=True)
        hook()
        return y

    with torch.inference_mode():
        graphs, outs = capture_graphs(lambda k: hooked(), 1, device)
        same = []
        for i in range(3):
            x.copy_(torch.randn_like(x))
            graphs[0].replay()
            same.append(torch.equal(outs[0], layer(x, *topk)))
        torch.cuda.synchronize()
        graphs[0].reset()
    return dict(replays_equal_eager=all(same))


def _two_batches(rank, device) -> dict:
    out = {}
    for name in ("deepep_normal static", "deepep_ll"):
        layer = ep.EPMoE(E, K, H, INTER, dispatcher=name.split()[0], dtype=torch.bfloat16, device=device,
                         dispatcher_options=OPTIONS[name])
        batches = [(torch.randn(T, H, device=device, dtype=torch.bfloat16), _routing(device, 10 * b + rank))
                   for b in range(2)]
        with torch.inference_mode():
            sequential = run_sequential(layer, batches)
            eager = run_overlapped(layer, batches)
            graphs, outs = capture_graphs(lambda k: run_overlapped(layer, batches), 1, device)
            graphs[0].replay()
            torch.cuda.synchronize()
            out[name] = dict(eager=all(torch.equal(a, b) for a, b in zip(sequential, eager)),
                             graph=all(torch.equal(a, b) for a, b in zip(sequential, outs[0])))
            graphs[0].reset()
    return out


def _shared(rank, device) -> dict:
    torch.manual_seed(0)
    shared = torch.nn.Sequential(torch.nn.Linear(H, 64, bias=False), torch.nn.SiLU(),
                                 torch.nn.Linear(64, H, bias=False)).to(device, torch.bfloat16)
    torch.manual_seed(1)
    layer = ep.EPMoE(E, K, H, INTER, dispatcher="deepep_normal", dtype=torch.bfloat16, device=device,
                     shared_experts=shared)
    torch.manual_seed(1)
    plain = ep.EPMoE(E, K, H, INTER, dispatcher="deepep_normal", dtype=torch.bfloat16, device=device)
    x = torch.randn(T, H, device=device, dtype=torch.bfloat16)
    topk = _routing(device, 3 + rank)
    with torch.inference_mode():
        return dict(equal=torch.equal(layer(x, *topk), plain(x, *topk) + shared(x)))


def overlap_on_rank(rank: int, world_size: int) -> dict:
    from ep_runtime.distributed import device_for_rank

    device = device_for_rank()
    out = {}
    for name in OPTIONS:
        _checked(out, f"ordering/{name}", lambda: _ordering(rank, name, device))
    _checked(out, "hook graph/deepep_ll", lambda: _hook_graph(rank, device))
    _checked(out, "two batches", lambda: _two_batches(rank, device))
    _checked(out, "shared experts", lambda: _shared(rank, device))
    return out


def test_async_exchanges_on_gpus():
    for rank, result in enumerate(run_ranks(overlap_on_rank, 2, backend="nccl", timeout=300)):
        errors = {k: v[1] for k, v in result.items() if v[0] == "error"}
        assert not errors, "\n".join(f"rank {rank} {k}:\n{tb}" for k, tb in errors.items())
        for key, (_, checks) in result.items():
            flat = {f"{k}/{kk}": vv for k, v in checks.items() for kk, vv in (v.items() if isinstance(v, dict)
                                                                                else [("", v)])}
            assert all(flat.values()), (rank, key, flat)
