"""Host cost of each step of the kernel-path exchange (torchrun --nproc-per-node 2)."""
import time, torch, torch.distributed as dist
import ep_runtime as ep
from ep_runtime.dispatchers import exchange_kernels as xk
from ep_runtime.dispatchers.transport import all_gather_rows, all_to_all
from ep_runtime import envs
from ep_runtime.validation import capturing, check_topk, check_hidden_states
group = ep.init_distributed()
dev = torch.device("cuda", torch.cuda.current_device())
R, me = dist.get_world_size(), dist.get_rank()
def host(fn, n=100, label=""):
    try:
        for _ in range(5): fn()
    except Exception as e:
        if me == 0: print(label, "FAILED", repr(e)[:300], flush=True)
        return
    torch.cuda.synchronize(); dist.barrier(); torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n): fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    if me == 0: print(f"{label:34s} {1e6*(t1-t0)/n:8.1f} us/call", flush=True)
E, K, H = 256, 8, 7168
for T in (128, 4096):
    if me == 0: print("T =", T)
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
    ids = torch.rand(T, E, device=dev).topk(K, 1).indices.int(); w = torch.rand(T, K, device=dev)
    rank_of = (torch.arange(E, device=dev) // (E // R)).int(); local_of = (torch.arange(E, device=dev) % (E // R)).int()
    global_of = (torch.arange(E // R, device=dev) + me * (E // R)).int()
    host(lambda: check_hidden_states(x, H), label="check_hidden_states")
    host(lambda: check_topk(ids, w, T, E, K, dev, values=False), label="check_topk(values=False)")
    host(lambda: envs.get("SYNC_CHECKS"), label="envs.get")
    host(capturing, label="capturing()")
    host(lambda: xk.layout_row(ids, w, rank_of, R, 2), label="layout_row")
    in_rank, row = xk.layout_row(ids, w, rank_of, R, 2)
    host(lambda: all_gather_rows(row, group, R), label="all_gather_rows")
    table = all_gather_rows(row, group, R)
    torch.cuda.synchronize()
    host(lambda: table.tolist(), label="table.tolist (idle gpu)")
    host_t = table.tolist()
    send = [r[1:1 + R] for r in host_t][me]; total = sum(send)
    host(lambda: xk.table_plan(in_rank, table, me, global_of, total), label="table_plan")
    plan = xk.table_plan(in_rank, table, me, global_of, total)
    host(lambda: xk.pack_payload(x, ids, w, plan.send_token, plan.send_rank, rank_of, local_of), label="pack_payload")
    payload = xk.pack_payload(x, ids, w, plan.send_token, plan.send_rank, rank_of, local_of)
    recv = [r[1 + me] for r in host_t]
    host(lambda: all_to_all(payload, recv, send, group, R), label="all_to_all(payload)")
    got = all_to_all(payload, recv, send, group, R)
    host(lambda: xk.payload_views(got, H, x.dtype, K), label="payload_views")
    rows, meta = xk.payload_views(got, H, x.dtype, K)
    host(lambda: (meta[:, K:], meta[:, :K].view(torch.float32)), label="meta views")
    idx = torch.arange(rows.shape[0], device=dev)
    host(lambda: xk.take_rows(rows, meta, idx, rows.shape[0]), label="take_rows")
    host(lambda: xk.gather_rows(rows.contiguous(), plan.combine_index.clamp(max=rows.shape[0])), label="gather_rows(+contig+clamp)")
    c = rows.contiguous(); ci = plan.combine_index.clamp(max=rows.shape[0])
    host(lambda: xk.gather_rows(c, ci), label="gather_rows")
    host(lambda: xk.ll_plan(meta[:, K:], meta[:, :K].view(torch.float32), E // R, False), label="ll_plan")
    sl, first, sw, sc, mm = xk.ll_plan(meta[:, K:], meta[:, :K].view(torch.float32), E // R, False)
    host(lambda: xk.ll_scatter(rows, first, None, (E // R) * rows.shape[0] + 1), label="ll_scatter")
    def pinned():
        p = torch.empty(table.shape, dtype=table.dtype, pin_memory=True); p.copy_(table, non_blocking=True); ev = torch.cuda.Event(); ev.record(); return ev
    host(pinned, label="pinned copy + event")
    host(lambda: torch.empty(10, device=dev), label="torch.empty cuda")
    host(lambda: torch.full((100,), 3, device=dev), label="torch.full cuda")
ep.destroy_distributed()
