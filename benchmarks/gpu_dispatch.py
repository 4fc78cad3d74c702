"""GPU check and benchmark of every dispatcher, run under torchrun on one host:

    torchrun --nproc-per-node 2 benchmarks/gpu_dispatch.py --out DIR

1. bf16 correctness of EPMoE for every registered (dispatcher, runner) pair against the float64
   reference (forward and backward where the runner trains).
2. CUDA graphs: deepep_ll dispatch -> combine (and the masked runner when present) and mori's
   static plan, captured once and replayed 3 times with fresh inputs, equal to eager runs.
3. Timings (CUDA events, warm-up, median and p10/p90): deepep_normal at H=7168, 4096 tokens per
   rank, top-8 of 256 (fresh layout and reused handle) and deepep_ll at 128 tokens per rank
   (graph replay), each beside raw all_to_all_single moving the same bytes in the same run.
Writes DIR/gpu_dispatch.json and DIR/gpu_dispatch.md (rank 0).
"""
from __future__ import annotations

import argparse
import json
import os
import traceback

import torch
import torch.distributed as dist

import ep_runtime as ep
from ep_runtime.bench import measure
from ep_runtime.runner_core import CombineInput, registered_pairs
from ep_runtime.testing import check_layer, make_problem, tolerance


def timed(fn, iters=30, warmup=5):
    """Median, p10, p90 in microseconds of fn(): ep_runtime.bench.measure (CUDA events after a barrier;
    a repeat's time is the slowest rank's)."""
    stats = measure(lambda _: fn(), repeats=iters, warmup=warmup,
                    device=torch.device("cuda", torch.cuda.current_device()), group=dist.group.WORLD)
    return {"median_us": stats.median_us, "p10_us": stats.p10_us, "p90_us": stats.p90_us}


def graph_of(fn):
    """Capture fn() (after warm-up on a side stream) and return (graph, outputs)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def routing(T, E, K, device, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.rand(T, E, device=device, generator=gen).topk(K, dim=1).indices.to(torch.int32)
    w = torch.rand(T, K, device=device, generator=gen)
    return ids, w / w.sum(1, keepdim=True)


def correctness(rank, R, device):
    rows = []
    tokens = [64, 0, 37, 100, 5, 80, 1, 33][:R]
    for fmt, runner in registered_pairs():
        dispatcher = {"deepep_normal": "deepep_normal", "deepep_ll": "deepep_ll", "mori": "mori",
                      "standard": "standard"}.get(fmt)
        if dispatcher is None or runner not in ep.runners.available():
            continue
        opts = {"deepep_ll": {"num_max_dispatch_tokens_per_rank": 128},
                "mori": {"max_dispatch_tokens_per_rank": 128}}.get(dispatcher, {})
        try:
            layer = ep.EPMoE(32, 4, 256, 128, dispatcher=dispatcher, runner=runner, dtype=torch.bfloat16,
                             device=device, dispatcher_options=opts)
            problem = make_problem(layer.config, tokens, seed=3, ep_size=R)
            try:
                errors = check_layer(layer, problem, rank, backward=True)
            except (NotImplementedError, RuntimeError) as exc:
                if "grad" not in str(exc).lower():
                    raise
                errors = check_layer(layer, problem, rank, backward=False)
            ok = max(errors.values()) <= tolerance(torch.bfloat16)
            rows.append({"dispatcher": dispatcher, "runner": runner, "ok": ok,
                         **{k: float(v) for k, v in errors.items()}})
        except Exception:  # noqa: BLE001 - report and go on
            rows.append({"dispatcher": dispatcher, "runner": runner, "ok": False, "error": traceback.format_exc()[-800:]})
    return rows


def kernel_checks(device):
    """The exchange's CUDA kernels against its torch path on CPU, for several R (any GPU count)."""
    from ep_runtime.dispatchers import exchange_kernels as xk
    from ep_runtime.dispatchers.rank_exchange import count_row, row_plan
    from ep_runtime.testing import random_topk_ids
    rows = []
    from ep_runtime.validation import topk_value_flags
    for T, E, K, R in ((0, 8, 2, 2), (1, 8, 8, 4), (4096, 256, 8, 4), (1000, 64, 6, 8), (333, 32, 4, 2)):
        ids = random_topk_ids(torch.Generator().manual_seed(T + R), T, E, K, R, minus_one_fraction=0.2)
        w = torch.rand(T, K)
        rank_of = (torch.arange(E) // (E // R)).int()
        in_rank, row = xk.layout_row(ids.to(device), w.to(device), rank_of.to(device), R, 3)
        layout, want = count_row(ids, E, R)
        want = torch.cat([want, topk_value_flags(ids, w, E, True)])
        ok = torch.equal(in_rank.cpu(), layout.is_token_in_rank) and torch.equal(row.cpu(), want)
        counts = layout.is_token_in_rank.sum(0)
        table = torch.randint(0, 50, (R, row.numel()), dtype=torch.int32)
        table[1 % R, 1:1 + R] = counts.int()
        global_of = torch.arange(E // R, dtype=torch.int32) + (1 % R) * (E // R)
        for base, limit, total, chunk in ((counts.cumsum(0) - counts, counts, int(counts.sum()), None),
                                          (torch.arange(R) * 50, torch.full((R,), 50), R * 50, 50)):
            got = xk.table_plan(in_rank, table.to(device), 1 % R, global_of.to(device), total, chunk)
            want_plan = row_plan(layout.is_token_in_rank, base, limit, total)
            real = want_plan[0] < T
            ok &= (torch.equal(got.send_token.cpu(), want_plan[0]) and torch.equal(got.combine_index.cpu(), want_plan[2])
                   and torch.equal(got.send_rank.cpu()[real], want_plan[1][real]))
        rows.append({"T": T, "E": E, "K": K, "R": R, "ok": bool(ok)})
    from ep_runtime.dispatchers import deepep_ll
    gen = torch.Generator().manual_seed(3)
    for N, K, L in ((256, 8, 64), (512, 8, 128), (1, 2, 4)):
        ids = torch.randint(-1, L, (N, K), generator=gen, dtype=torch.int32)
        slot, m = xk.ll_slots(ids.to(device), L)
        want_slot, want_m = deepep_ll._slots(ids, L)
        rows_ = torch.randn(N, 512, generator=gen).bfloat16()
        got = xk.ll_scatter(rows_.to(device), slot, None, L * N + 1).cpu()
        want = deepep_ll._scatter(rows_, want_slot, None, L * N + 1)
        written = torch.zeros(L * N + 1, dtype=torch.bool)
        written[want_slot[want_slot < L * N]] = True
        w = torch.rand(N, K, generator=gen)
        part = xk.ll_gather(want.to(device)[:L * N], slot, w.to(device)).float().cpu()
        ref = deepep_ll._gather(want[:L * N].float(), want_slot, w)
        ok = (torch.equal(slot.cpu(), want_slot) and torch.equal(m.cpu(), want_m)
              and torch.equal(got[written], want[written]) and torch.allclose(part, ref, rtol=1e-2, atol=1e-2))
        rows.append({"ll_N": N, "K": K, "L": L, "ok": bool(ok)})
    return rows


def graph_checks(rank, R, device):
    rows = []
    E, K, H, M = 32, 4, 256, 64
    cfg = ep.MoeConfig(E, K, H, 128)
    cases = {"deepep_ll": ep.dispatchers.create("deepep_ll", cfg, num_max_dispatch_tokens_per_rank=M),
             "mori_static": ep.dispatchers.create("mori", cfg, max_dispatch_tokens_per_rank=M, static=True)}
    for name, d in cases.items():
        try:
            x = torch.randn(M, H, device=device, dtype=torch.bfloat16)
            ids, w = routing(M, E, K, device, 1 + rank)

            def step():
                out = d.dispatch(x, ep.TopKOutput(ids, w))
                rows_ = out.recv_x if name == "deepep_ll" else out.recv_x
                return d.combine(CombineInput(rows_ * 2, out))

            graph, y = graph_of(step)
            worst = 0.0
            for i in range(3):
                x.copy_(torch.randn_like(x))
                new_ids, new_w = routing(M, E, K, device, 100 * i + rank)
                ids.copy_(new_ids)
                w.copy_(new_w)
                graph.replay()
                eager = step()
                worst = max(worst, (y.float() - eager.float()).abs().max().item())
            rows.append({"case": name, "max_abs_diff_replay_vs_eager": worst, "ok": worst == 0.0})
        except Exception:  # noqa: BLE001
            rows.append({"case": name, "ok": False, "error": traceback.format_exc()[-800:]})
    if "masked" in ep.runners.available():
        try:
            layer = ep.EPMoE(E, K, H, 128, dispatcher="deepep_ll", runner="masked", dtype=torch.bfloat16,
                             device=device, dispatcher_options={"num_max_dispatch_tokens_per_rank": M})
            x = torch.randn(M, H, device=device, dtype=torch.bfloat16)
            ids, w = routing(M, E, K, device, 7 + rank)
            with torch.no_grad():
                graph, y = graph_of(lambda: layer(x, ids, w))
                worst = 0.0
                for i in range(3):
                    x.copy_(torch.randn_like(x))
                    graph.replay()
                    worst = max(worst, (y.float() - layer(x, ids, w).float()).abs().max().item())
            rows.append({"case": "deepep_ll+masked layer", "max_abs_diff_replay_vs_eager": worst, "ok": worst == 0.0})
        except Exception:  # noqa: BLE001
            rows.append({"case": "deepep_ll+masked layer", "ok": False, "error": traceback.format_exc()[-800:]})
    return rows


def bench_normal(rank, R, device, T, H, E, K):
    cfg = ep.MoeConfig(E, K, H, 2048)
    d = ep.dispatchers.create("deepep_normal", cfg)
    xs = [torch.randn(T, H, device=device, dtype=torch.bfloat16) for _ in range(2)]
    ids, w = routing(T, E, K, device, rank)
    topk = ep.TopKOutput(ids, w)
    out = d.dispatch(xs[0], topk)
    send, recv = out.handle.send_splits, out.handle.recv_splits
    leaving = (sum(send) - send[rank]) * H * 2
    arriving = (sum(recv) - recv[rank]) * H * 2
    i = [0]

    def rotate():
        i[0] ^= 1
        return xs[i[0]]

    res = {"dispatch": timed(lambda: d.dispatch(rotate(), topk)),
           "dispatch_cached_handle": timed(lambda: d.dispatch(rotate(), topk, handle=out.handle))}
    partial = out.recv_x.clone()
    res["combine"] = timed(lambda: d.combine(CombineInput(partial, out)))
    src = torch.randn(sum(send), H, device=device, dtype=torch.bfloat16)
    dst = torch.empty(sum(recv), H, device=device, dtype=torch.bfloat16)
    res["raw_a2a_dispatch_bytes"] = timed(lambda: dist.all_to_all_single(dst, src, recv, send))
    back = torch.empty(sum(send), H, device=device, dtype=torch.bfloat16)
    res["raw_a2a_combine_bytes"] = timed(lambda: dist.all_to_all_single(back, dst, send, recv))
    for key in ("dispatch", "dispatch_cached_handle", "raw_a2a_dispatch_bytes"):
        res[key]["GBps"] = leaving / res[key]["median_us"] / 1e3
    for key in ("combine", "raw_a2a_combine_bytes"):
        res[key]["GBps"] = arriving / res[key]["median_us"] / 1e3
    res["bytes_leaving_dispatch"], res["bytes_leaving_combine"] = leaving, arriving
    # Where the time goes: host (Python + launches) against device time, for one round trip.
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            o = d.dispatch(rotate(), topk)
            d.combine(CombineInput(o.recv_x, o))
        torch.cuda.synchronize()
    res["profile"] = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=40)
    return res


def bench_ll(rank, R, device, T, H, E, K):
    cfg = ep.MoeConfig(E, K, H, 2048)
    d = ep.dispatchers.create("deepep_ll", cfg, num_max_dispatch_tokens_per_rank=T)
    x = torch.randn(T, H, device=device, dtype=torch.bfloat16)
    ids, w = routing(T, E, K, device, rank)
    topk = ep.TopKOutput(ids, w)
    g_dispatch, out = graph_of(lambda: d.dispatch(x, topk))
    expert_out = torch.randn_like(out.recv_x)
    g_combine, _ = graph_of(lambda: d.combine(CombineInput(expert_out, out)))
    src = torch.randn(R * T, H, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    g_raw, _ = graph_of(lambda: dist.all_to_all_single(dst, src))
    res = {"dispatch_graph": timed(g_dispatch.replay, iters=200, warmup=20),
           "combine_graph": timed(g_combine.replay, iters=200, warmup=20),
           "raw_a2a_same_payload_graph": timed(g_raw.replay, iters=200, warmup=20),
           "payload_bytes_per_rank": R * T * H * 2}
    return res


def bench_mori_truncation(rank, R, device, H, E, K, received=128, buffer_per_rank=4096):
    """Runner time on mori's padded buffer (buffer_per_rank * R rows, ~`received` real tokens per
    rank), knob off (the runner sees the whole buffer) against max_input_tokens = 2 * received."""
    res = {}
    x = torch.randn(received, H, device=device, dtype=torch.bfloat16)
    ids, w = routing(received, E, K, device, 11 + rank)
    for runner in [r for r in ("torch", "triton") if r in ep.runners.available()]:
        for label, n in (("knob_off", 0), ("knob_2x_received", 2 * received)):
            layer = ep.EPMoE(E, K, H, 2048, dispatcher="mori", runner=runner, dtype=torch.bfloat16, device=device,
                             dispatcher_options={"max_dispatch_tokens_per_rank": buffer_per_rank,
                                                 "max_input_tokens": n})
            out = layer.dispatcher.dispatch(x, ep.TopKOutput(ids, w))
            with torch.no_grad():
                t = timed(lambda: layer.runner.run(out, layer.weights), iters=20, warmup=3)
            res[f"{runner}_{label}"] = dict(t, runner_rows=out.num_runner_rows,
                                            received=int(out.num_recv_tokens))
    return res


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.getcwd())
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--ll-tokens", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--topk", type=int, default=8)
    args = parser.parse_args()
    ep.init_distributed()
    rank, R = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device())
    report = {"world_size": R, "device": torch.cuda.get_device_name(), "torch": torch.__version__}
    report["correctness"] = correctness(rank, R, device)
    report["cuda_graphs"] = graph_checks(rank, R, device)
    report["kernel_checks"] = kernel_checks(device)
    shape = (args.hidden, args.experts, args.topk)
    for name, fn, T in (("deepep_normal", bench_normal, args.tokens), ("deepep_ll", bench_ll, args.ll_tokens),
                        ("mori_truncation", bench_mori_truncation, None)):
        if T is None:
            try:
                report[f"bench_{name}"] = fn(rank, R, device, *shape)
            except Exception:  # noqa: BLE001
                report[f"bench_{name}"] = {"error": traceback.format_exc()[-1500:]}
            continue
        try:
            report[f"bench_{name}"] = fn(rank, R, device, T, *shape)
        except Exception:  # noqa: BLE001
            report[f"bench_{name}"] = {"error": traceback.format_exc()[-1500:]}
    everything = [None] * R
    dist.all_gather_object(everything, report)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gpu_dispatch.json"), "w") as f:
            json.dump(everything, f, indent=1)
        prof = everything[0].get("bench_deepep_normal", {}).pop("profile", "")
        with open(os.path.join(args.out, "profile_normal.txt"), "w") as f:
            f.write(prof)
        print(json.dumps(everything[0], indent=1)[:6000])
        print(prof[:4000])
    ep.destroy_distributed()


if __name__ == "__main__":
    main()
