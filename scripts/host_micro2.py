"""Host cost of collective call paths on GPU ranks (torchrun --nproc-per-node 2)."""
import time, torch, torch.distributed as dist, os
dist.init_process_group("nccl", device_id=torch.device("cuda", int(os.environ["LOCAL_RANK"])))
torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
dev = torch.device("cuda", torch.cuda.current_device())
R = dist.get_world_size()
def host(fn, n=200, label=""):
    try:
        for _ in range(10): fn()
    except Exception as e:
        if dist.get_rank() == 0: print(label, "FAILED", repr(e)[:300], flush=True)
        torch.cuda.synchronize(); dist.barrier(); return
    torch.cuda.synchronize(); dist.barrier(); torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n): fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    if dist.get_rank() == 0:
        print(f"{label:45s} per-call host {1e6*(t1-t0)/n:8.1f} us  (with drain {1e6*(t2-t0)/n:8.1f})", flush=True)
o2 = torch.empty(128 * R, 7168, device=dev, dtype=torch.bfloat16); x2 = torch.randn(128 * R, 7168, device=dev, dtype=torch.bfloat16)
host(lambda: dist.all_to_all_single(o2, x2), label="dist.all_to_all_single")
pg = dist.group.WORLD
opts = dist.AllToAllOptions()
host(lambda: pg.alltoall_base(o2, x2, [], [], opts), label="pg.alltoall_base")
host(lambda: pg.alltoall_base(o2, x2, [128]*R, [128]*R, opts), label="pg.alltoall_base splits")
be = pg._get_backend(dev)
host(lambda: be.alltoall_base(o2, x2, [128]*R, [128]*R, opts), label="backend.alltoall_base splits")
host(lambda: torch.ops.c10d.alltoall_base_(o2, x2, pg, [128]*R, [128]*R, -1), label="torch.ops.c10d.alltoall_base_")
fc = torch.ops._c10d_functional
name = pg.group_name
def func_a2a():
    y = fc.all_to_all_single(x2, [128]*R, [128]*R, name)
    return fc.wait_tensor(y)
host(func_a2a, label="functional all_to_all_single + wait")
row = torch.zeros(300, dtype=torch.int32, device=dev); table = torch.empty(300 * R, dtype=torch.int32, device=dev)
host(lambda: dist.all_gather_into_tensor(table, row), label="dist.all_gather_into_tensor")
host(lambda: pg._allgather_base(table, row), label="pg._allgather_base")
host(lambda: fc.wait_tensor(fc.all_gather_into_tensor(row, R, name)), label="functional all_gather + wait")
host(lambda: pg._allgather_base(table, row).wait(), label="pg._allgather_base + work.wait")
# triton launch cost
import triton, triton.language as tl
@triton.jit
def k(x_ptr, n, B: tl.constexpr):
    i = tl.program_id(0) * B + tl.arange(0, B)
    tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < n) + 1, mask=i < n)
buf = torch.zeros(1024, device=dev)
host(lambda: k[(4,)](buf, 1024, B=256), label="triton launch (1 ptr)")
host(lambda: k[(4,)](buf, 1024, B=256), label="triton launch again")
from torch.distributed import _symmetric_memory as symm
t = symm.empty(1 << 20, device=dev, dtype=torch.uint8)
hdl = symm.rendezvous(t, pg.group_name)
host(lambda: hdl.barrier(channel=0), n=50, label="symm barrier")
ptrs = hdl.buffer_ptrs
if dist.get_rank() == 0: print("symm ok, peers", len(ptrs), "signal_pad", hdl.signal_pad_ptrs_dev is not None, flush=True)
dist.barrier()
dist.destroy_process_group()
