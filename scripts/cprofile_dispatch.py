"""cProfile of repeated dispatch+combine calls (torchrun --nproc-per-node 2): where host time goes."""
import cProfile, io, pstats, sys, time, torch, torch.distributed as dist
import ep_runtime as ep
from ep_runtime.runner_core import CombineInput
group = ep.init_distributed()
dev = torch.device("cuda", torch.cuda.current_device())
R, me = dist.get_world_size(), dist.get_rank()
E, K, H, T = 256, 8, 7168, 128
cfg = ep.MoeConfig(E, K, H, 2048)
x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
gen = torch.Generator(device=dev).manual_seed(me)
ids = torch.rand(T, E, device=dev, generator=gen).topk(K, 1).indices.int(); w = torch.rand(T, K, device=dev)
topk = ep.TopKOutput(ids, w)
for name, opts in (("deepep_ll", {"num_max_dispatch_tokens_per_rank": T}), ("deepep_normal", {})):
    d = ep.dispatchers.create(name, cfg, group=group, device=dev, **opts)
    out = d.dispatch(x, topk)
    y = out.recv_x.clone()
    ci = CombineInput(y, out)
    for _ in range(10): d.combine(CombineInput(y, d.dispatch(x, topk)))
    torch.cuda.synchronize(); dist.barrier()
    n = 50
    t0 = time.perf_counter()
    for _ in range(n): d.dispatch(x, topk)
    t1 = time.perf_counter(); torch.cuda.synchronize(); t2 = time.perf_counter()
    for _ in range(n): d.combine(ci)
    t3 = time.perf_counter(); torch.cuda.synchronize(); t4 = time.perf_counter()
    if me == 0:
        print(f"{name}: dispatch pipelined host {1e6*(t1-t0)/n:.1f} us (drained {1e6*(t2-t0)/n:.1f}); combine {1e6*(t3-t2)/n:.1f} (drained {1e6*(t4-t2)/n:.1f})", flush=True)
    dist.barrier()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n): d.dispatch(x, topk)
    torch.cuda.synchronize()
    pr.disable()
    if me == 0:
        s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(22); print(s.getvalue()[:5000], flush=True)
    dist.barrier()
ep.destroy_distributed()
