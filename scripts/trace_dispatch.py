"""Timeline of one dispatch call's host side (torchrun --nproc-per-node 2): every profiler event
in order with its start offset and duration, so gaps and slow calls show."""
import time, torch, torch.distributed as dist
import ep_runtime as ep
from torch.profiler import ProfilerActivity, profile, record_function
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
    for _ in range(20): d.dispatch(x, topk)
    torch.cuda.synchronize(); dist.barrier()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(3):
            with record_function(f"CALL{i}"):
                d.dispatch(x, topk)
        torch.cuda.synchronize()
    if me == 0:
        evs = [e for e in prof.events() if e.device_type.name == "CPU"]
        calls = sorted([e for e in evs if e.name.startswith("CALL")], key=lambda e: e.time_range.start)
        c = calls[-1]
        t0 = c.time_range.start
        print(f"== {name}: call {c.time_range.elapsed_us():.0f} us", flush=True)
        inside = sorted([e for e in evs if e.time_range.start >= t0 and e.time_range.end <= c.time_range.end and e is not c],
                        key=lambda e: e.time_range.start)
        last_end = t0
        for e in inside:
            if e.time_range.elapsed_us() < 4: continue
            print(f"  +{e.time_range.start - t0:7.0f}  {e.time_range.elapsed_us():7.0f} us  {e.name[:70]}", flush=True)
        gpu = sorted([e for e in prof.events() if e.device_type.name == "CUDA"], key=lambda e: e.time_range.start)
        print("  GPU kernels (last 12):", flush=True)
        for e in gpu[-12:]:
            print(f"    {e.time_range.start - t0:8.0f} {e.time_range.elapsed_us():7.0f} us {e.name[:60]}", flush=True)
    dist.barrier()
ep.destroy_distributed()
