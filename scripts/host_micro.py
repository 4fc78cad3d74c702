"""Host cost of primitives on GPU ranks (torchrun --nproc-per-node 2)."""
import time, torch, torch.distributed as dist, os
dist.init_process_group("nccl", device_id=torch.device("cuda", int(os.environ["LOCAL_RANK"])))
torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
dev = torch.device("cuda", torch.cuda.current_device())
R = dist.get_world_size()
def host(fn, n=200, label=""):
    for _ in range(10): fn()
    torch.cuda.synchronize(); dist.barrier(); torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n): fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    single = []
    for _ in range(20):
        torch.cuda.synchronize(); s = time.perf_counter(); fn(); single.append(time.perf_counter() - s)
    single.sort()
    if dist.get_rank() == 0:
        print(f"{label:40s} per-call host {1e6*(t1-t0)/n:8.1f} us  (with drain {1e6*(t2-t0)/n:8.1f})  single {1e6*single[10]:8.1f}", flush=True)
x = torch.randn(4096, 7168, device=dev, dtype=torch.bfloat16)
small = torch.zeros(1, 7168, device=dev, dtype=torch.bfloat16)
host(lambda: small.new_zeros(1, 7168), label="new_zeros(1,H)")
host(lambda: torch.empty(4096, 7168, device=dev, dtype=torch.bfloat16), label="empty big")
host(lambda: small.add_(1), label="add_ small")
out = torch.empty_like(x)
host(lambda: dist.all_to_all_single(out, x), label="a2a equal 4096")
o2 = torch.empty(128 * R, 7168, device=dev, dtype=torch.bfloat16); x2 = torch.randn(128 * R, 7168, device=dev, dtype=torch.bfloat16)
host(lambda: dist.all_to_all_single(o2, x2), label="a2a equal 128/peer")
host(lambda: dist.all_to_all_single(o2, x2, [128] * R, [128] * R), label="a2a splits 128/peer")
row = torch.zeros(300, dtype=torch.int32, device=dev); table = torch.empty(300 * R, dtype=torch.int32, device=dev)
host(lambda: dist.all_gather_into_tensor(table, row), label="all_gather 300 int32")
host(lambda: (dist.all_gather_into_tensor(table, row), table.tolist()), n=50, label="all_gather + tolist")
host(lambda: (dist.all_gather_into_tensor(table, row), table.cpu()), n=50, label="all_gather + cpu()")
host(lambda: (small.add_(1), small.sum().item()), n=50, label="add + item")
pinned = torch.empty(300 * R, dtype=torch.int32, pin_memory=True)
ev = torch.cuda.Event()
def pinned_read():
    dist.all_gather_into_tensor(table, row); pinned.copy_(table, non_blocking=True); ev.record(); ev.synchronize(); return pinned.tolist()
host(pinned_read, n=50, label="all_gather + pinned copy + event")
def seq():
    z = small.new_zeros(1, 7168); dist.all_to_all_single(o2, x2); o2.add_(1)
host(seq, label="zeros + a2a + add")
dist.destroy_process_group()
