"""How long the survivors of a 2-GPU job take to raise when a peer stalls or dies (NCCL).

    python scripts/fault_probe.py                      # every case, all jobs at once, EP_RUNTIME_TIMEOUT_S=10
    python scripts/fault_probe.py --timeout 5 --cases deepep_normal/stall,deepep_ll_graph/sigkill --sequential
    python scripts/fault_probe.py --json times.json    # also write the results as JSON

Each case is one job of two fresh processes started the way torchrun starts them (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT, EP_RUNTIME_TIMEOUT_S), each calling ep.init_distributed() and
running an EPMoE forward in bf16 under torch.no_grad() (the exchange's kernel path): a few healthy
steps, a barrier, then rank 1 stalls (sleeps) or SIGKILLs itself and rank 0 keeps stepping. Cases:
deepep_normal, mori and deepep_ll eager; deepep_ll (the layer) and the static modes of deepep_normal
(num_worst_tokens) and mori (static=True) (dispatch -> combine) replayed from a CUDA graph, each step
`graph.replay(); layer.synchronize()`. Printed per case: seconds from the fault to rank 0's error,
its type and first words, and seconds to rank 0's exit. A warm-up job first runs every case healthy
with a long timeout so that Triton's kernel cache is filled before the timed jobs start.

Needs 2 GPUs and ep-runtime installed (the jobs import it as installed: `pip install .` or `-e .`).
tests/test_gpu_faults.py runs this and checks every survivor raised ep.PeerFailure
within EP_RUNTIME_TIMEOUT_S + 5 s.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

E, K, H, INTER, T = 32, 4, 256, 256, 64
CASES = ["deepep_normal", "mori", "deepep_ll", "deepep_ll_graph", "deepep_normal_static_graph", "mori_static_graph"]
# The static modes' options (as the benchmarks' static variants set them); deepep_ll's M.
OPTIONS = {"deepep_ll": {"num_max_dispatch_tokens_per_rank": T},
           "deepep_normal_static": {"num_worst_tokens": 2 * T, "num_max_dispatch_tokens_per_rank": T},
           "mori_static": {"max_dispatch_tokens_per_rank": T, "static": True}}
FAULTS = ["stall", "sigkill"]
FAULT_RANK = 1


# ---------------------------------------------------------------- one rank of a job

def _layer_and_step(case: str):
    import torch

    import ep_runtime as ep
    from ep_runtime.bench.timing import capture_graphs
    from ep_runtime.runner_core import CombineInput

    graph_mode = case.endswith("_graph")
    mode = case.removesuffix("_graph")
    dispatcher = mode.removesuffix("_static")
    options = OPTIONS.get(mode, {})
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU (gloo): a dry run of this script's machinery
    layer = ep.EPMoE(E, K, H, INTER, dispatcher=dispatcher, runner="auto", dtype=torch.bfloat16, device=device,
                     dispatcher_options=options)
    gen = torch.Generator(device=device).manual_seed(7 + torch.distributed.get_rank())
    x = torch.randn(T, H, device=device, dtype=torch.bfloat16, generator=gen)
    ids = torch.rand(T, E, device=device, generator=gen).topk(K, dim=1).indices.to(torch.int32)
    w = torch.rand(T, K, device=device, generator=gen)
    w = w / w.sum(1, keepdim=True)
    if not graph_mode:
        return layer, None, lambda: layer(x, ids, w)
    def captured():
        if dispatcher == "deepep_ll":  # the whole layer (its masked runner captures)
            return layer(x, ids, w)
        sent = layer.dispatcher.dispatch(x, ep.TopKOutput(ids, w))  # the static modes: dispatch -> combine,
        return layer.dispatcher.combine(CombineInput(sent.recv_x * 2, sent))  # as tests/test_gpu.py captures them
    graph = capture_graphs(lambda k: captured(), 1, torch.device(device), warmup=3,
                           before_capture=layer.dispatcher.raise_deferred)[0][0]

    def step():
        graph.replay()
        layer.synchronize()
    return layer, graph, step


def worker(case: str, fault: str, folder: Path) -> None:
    import torch
    import torch.distributed as dist

    import ep_runtime as ep

    ep.init_distributed()
    rank = dist.get_rank()
    everything = CASES if torch.cuda.is_available() else [c for c in CASES if not c.endswith("_graph")]
    for name in (everything if case == "all" else [case]):
        with torch.no_grad():
            layer, graph, step = _layer_and_step(name)
            for _ in range(3):  # healthy steps: the job works until the fault
                step()
            layer.dispatcher.raise_deferred()
            sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
            sync()
            dist.barrier()
            sync()
            if fault == "none":  # the warm-up job; a graph holding the group's collectives goes before the group
                del graph, step
                continue
            if rank == FAULT_RANK:
                (folder / "fault_at").write_text(repr(time.time()))
                if fault == "sigkill":
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(3600)
            calls = 0
            try:
                for calls in range(1, 1001):
                    step()
                result = {"raised": False, "calls": calls}
                error = None
            except Exception as exc:  # noqa: BLE001 - reported, then raised again below
                result = {"raised": True, "type": type(exc).__name__, "message": str(exc), "calls": calls}
                error = exc
            result["at"] = time.time()
            if error is not None:  # a later call must fail at once, not wait on the aborted group (never
                try:  # replay a graph that captured an aborted group's collectives: its kernels would use freed state)
                    (layer.synchronize if graph is not None else step)()
                    result["again"] = "no error"
                except Exception as exc:  # noqa: BLE001
                    result["again"] = f"{type(exc).__name__}: {exc}"
                result["again_s"] = time.time() - result["at"]
            (folder / f"rank{rank}.json").write_text(json.dumps(result))
            del graph, step
            if error is not None:
                raise error
    print(f"rank {rank}: done", flush=True)


# ---------------------------------------------------------------- the jobs

class Job:
    def __init__(self, case: str, fault: str, folder: Path, timeout_s: float):
        self.case, self.fault, self.folder = case, fault, folder
        from ep_runtime.distributed import free_port
        folder.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                   EP_RUNTIME_TIMEOUT_S=str(timeout_s), NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1")
        self.procs, self.exited = [], {}
        for r in range(2):
            log = open(folder / f"rank{r}.log", "w")
            self.procs.append(subprocess.Popen([sys.executable, __file__, "--worker", case, fault, str(folder)],
                                               env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=log,
                                               stderr=subprocess.STDOUT))
            log.close()

    def poll(self) -> None:
        for r, p in enumerate(self.procs):
            if r not in self.exited and p.poll() is not None:
                self.exited[r] = (p.returncode, time.time())

    def fault_at(self):
        f = self.folder / "fault_at"
        return float(f.read_text()) if f.exists() and f.read_text() else None

    def done(self, timeout_s: float) -> bool:
        self.poll()
        if len(self.exited) == 2 or (0 in self.exited and self.fault == "stall"):  # a stalled rank 1 never exits
            return True
        fault = self.fault_at()
        return fault is not None and time.time() > fault + timeout_s + 30

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        self.poll()

    def result(self) -> dict:
        fault = self.fault_at()
        out = {"case": self.case, "fault": self.fault, "fault_at": fault}
        path = self.folder / "rank0.json"
        survivor = json.loads(path.read_text()) if path.exists() else {"raised": None}
        out.update({k: survivor.get(k) for k in ("raised", "type", "message", "calls", "again", "again_s")})
        out["raise_s"] = survivor["at"] - fault if fault and "at" in survivor else None
        code, exited = self.exited.get(0, (None, None))
        out["exit_code"] = code
        out["exit_s"] = exited - fault if fault and exited else None
        out["log_tail"] = (self.folder / "rank0.log").read_text()[-3000:]
        return out


def run(cases: list[str], timeout_s: float, sequential: bool, warmup: bool, folder: Path) -> list[dict]:
    if warmup:
        job = Job("all", "none", folder / "warmup", 120.0)
        deadline = time.time() + 240
        while not job.done(120.0) and time.time() < deadline:
            time.sleep(0.2)
        job.kill()
        if job.exited.get(0, (None,))[0] != 0 or job.exited.get(1, (None,))[0] != 0:
            raise RuntimeError("the warm-up job (every case healthy) failed:\n" +
                               (folder / "warmup" / "rank0.log").read_text()[-4000:] +
                               (folder / "warmup" / "rank1.log").read_text()[-2000:])
    batches = [[c] for c in cases] if sequential else [cases]
    results = []
    for batch in batches:
        jobs = [Job(*c.split("/"), folder / c.replace("/", "_"), timeout_s) for c in batch]
        deadline = time.time() + 180  # start-up until the faults fire, then TIMEOUT + 30 s each
        try:
            while not all(j.done(timeout_s) for j in jobs) and time.time() < deadline:
                time.sleep(0.05)
        finally:
            for j in jobs:
                j.kill()
        results += [j.result() for j in jobs]
    return results


def table(results: list[dict], timeout_s: float) -> str:
    lines = [f"fault_probe: EP_RUNTIME_TIMEOUT_S={timeout_s:g}; seconds from the fault on rank {FAULT_RANK}",
             "fault_probe: case/fault | rank 0 raised after | error | rank 0 exited after (code)"]
    for r in results:
        raised = f"{r['raise_s']:.2f} s" if r["raise_s"] is not None else "never"
        exited = f"{r['exit_s']:.2f} s ({r['exit_code']})" if r["exit_s"] is not None else "not (killed)"
        error = f"{r['type']}: {(r['message'] or '')[:110]}" if r["raised"] else "none"
        lines.append(f"fault_probe: {r['case']}/{r['fault']} | {raised} | {error} | {exited}")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=10.0, help="EP_RUNTIME_TIMEOUT_S of the jobs (default 10)")
    parser.add_argument("--cases", default=",".join(f"{c}/{f}" for c in CASES for f in FAULTS),
                        help="comma-separated CASE/FAULT (cases: %s; faults: %s)" % (", ".join(CASES), ", ".join(FAULTS)))
    parser.add_argument("--sequential", action="store_true", help="one job at a time (default: all at once)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the healthy warm-up job")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--dir", help="keep each job's logs here (default: a temporary folder)")
    args = parser.parse_args(argv)
    cases = args.cases.split(",")
    for c in cases:
        case, _, fault = c.partition("/")
        if case not in CASES or fault not in FAULTS:
            parser.error(f"--cases {c}: expected CASE/FAULT with CASE in {', '.join(CASES)} and FAULT in "
                         f"{', '.join(FAULTS)}")
    with tempfile.TemporaryDirectory() as tmp:
        results = run(cases, args.timeout, args.sequential, not args.no_warmup, Path(args.dir or tmp))
    print(table(results, args.timeout), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"timeout_s": args.timeout, "results": results}, indent=1))
    return results


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], Path(sys.argv[4]))
    else:
        main()
