"""On GPUs (marker `gpu`; skipped without CUDA): what the CPU suite cannot show, the compiled kernels
in bf16 and the exchange over NCCL. `scripts/gpu_check.sh` runs these with `pytest -m gpu`.

- Every dispatcher x runner pair, EPMoE forward and backward in bf16 against the float64 reference
  on min(2, GPUs) ranks, for a few configs (a pair or config a layer rejects at construction is
  skipped with its reason, as DESIGN.md allows).
- Static-shape paths capture into a CUDA graph and replays with fresh inputs equal eager runs: the
  static dispatchers' dispatch -> combine, and the layer on deepep_ll with each runner.
- The exchange kernels compiled for the GPU equal their torch path.
- Each runner in bf16 up to 16384 tokens and in fp32 (DESIGN.md's 1e-5), on one GPU.
"""
import traceback

import pytest
import torch

import ep_runtime as ep
from ep_runtime import dispatchers, runners
from ep_runtime.bench.dispatch import STATIC_VARIANTS
from ep_runtime.bench.timing import capture_graphs
from ep_runtime.reference import moe_reference, rel_err
from ep_runtime.runner_core import CombineInput
from ep_runtime.testing import (
    check_layer,
    host_syncs,
    make_problem,
    run_ranks,
    tolerance,
    training_step,
    training_step_errors,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA GPUs")]

CONFIGS = {
    "default": {},
    "gpt_oss_bias_scaled": dict(gemm1_alpha=1.702, gemm1_clamp_limit=7.0, has_bias=True, routed_scaling_factor=2.5),
    "clamped_swiglu": dict(gemm1_clamp_limit=0.5),
    "not_gated_gelu_tanh_weight_on_input": dict(is_gated=False, activation="gelu_tanh",
                                                apply_router_weight_on_input=True),
}
# The gradients of gate and up through a clamp at 0.5 (most values clamped, so the forward shows the clamp) are
# discontinuous there: a pre-activation within bf16's rounding of a limit (~0.006 wide at 0.5; values ~N(0, 1),
# density 0.35, three limits: gate above, up both sides) falls on the other side than in float64 for ~0.6% of
# them, and each such one's gradient is wholly wrong: sqrt(0.006) ~ 0.08 relative in dx and dw13, what every
# pair measures (torch's runner on CPU in bf16 too; 0.009 at limit 3, 0.005 at 7). Bound: twice that; a clamp
# whose gradient were passed through (or dropped) on the clamped values would be off by O(1).
GRAD_TOLERANCE = {"clamped_swiglu": 0.16}
E, K, H, INTER, M = 32, 4, 256, 128, 64  # INTER: intermediate size; M: static buffers' tokens per rank
TOKENS = [64, 0, 37, 100, 5, 80, 1, 33]  # per rank; rank 1 routes nothing
STATIC = {"deepep_ll": ("deepep_ll", lambda T, R: dict(num_max_dispatch_tokens_per_rank=T)),
          # the NVLink transport captured too (transport='auto' takes NCCL)
          "deepep_ll nvlink": ("deepep_ll", lambda T, R: dict(num_max_dispatch_tokens_per_rank=T, transport="nvlink")),
          **{v.impl: (v.dispatcher, v.options) for v in STATIC_VARIANTS}}
PAIRS = [(d, r, c) for d in dispatchers.registered() for r in runners.registered() for c in CONFIGS]


def _ranks() -> int:
    return min(2, torch.cuda.device_count())


def _poison_cached_memory(device) -> None:
    """Fill the blocks the caching allocator hands out next with NaN (both of its pools: requests up to
    1 MiB and larger ones), so a kernel that reads rows it never wrote (padding, a receive buffer's
    tail, scratch) gives NaN where the CPU suite's fresh memory gives zeros or harmless values."""
    held = [torch.empty(2 ** 18, device=device).fill_(float("nan")) for _ in range(16)]  # 1 MiB each
    held.append(torch.empty(2 ** 26, device=device).fill_(float("nan")))  # 256 MiB
    del held


def pairs_on_rank(rank: int, world_size: int, dtype: torch.dtype) -> dict:
    """{'dispatcher/runner/config': ('ok', errors) | ('skip', why) | ('error', traceback)} on this rank;
    each pair starts on NaN-poisoned cached memory."""
    from ep_runtime.distributed import device_for_rank

    device = device_for_rank()
    out = {}
    for dispatcher, runner, name in PAIRS:
        key = f"{dispatcher}/{runner}/{name}"
        if runner not in runners.available():
            out[key] = ("skip", f"runner={runner!r} is not available here")
            continue
        _poison_cached_memory(device)
        try:
            layer = ep.EPMoE(E, K, H, INTER, dispatcher=dispatcher, runner=runner, dtype=dtype, device=device,
                             dispatcher_options={"deepep_ll": dict(num_max_dispatch_tokens_per_rank=128)}.get(
                                 dispatcher), **CONFIGS[name])
        except ValueError as err:  # a pair or config field this layer rejects at construction
            out[key] = ("skip", str(err).splitlines()[0][:300])
            continue
        try:
            problem = make_problem(layer.config, TOKENS[:world_size], seed=3, ep_size=world_size)
            out[key] = ("ok", check_layer(layer, problem, rank, backward=True))
        except Exception:  # noqa: BLE001 - report this pair, go on with the others
            out[key] = ("error", traceback.format_exc()[-1500:])
    return out


def _capture(fn):
    """(graph, outputs of fn) after three warm-up calls on a side stream."""
    graphs, outs = capture_graphs(lambda k: fn(), 1, torch.device("cuda", torch.cuda.current_device()), warmup=3)
    return graphs[0], outs[0]


def _host_sync_in(fn) -> "str | None":
    """The message of fn's first host sync (torch's sync debug mode), or None when it makes none."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    except RuntimeError as err:
        if "synchroniz" not in str(err):
            raise
        return str(err).splitlines()[0][:300]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return None


def _routing(T: int, device, seed: int):
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.rand(T, E, device=device, generator=gen).topk(K, dim=1).indices.to(torch.int32)
    w = torch.rand(T, K, device=device, generator=gen)
    return ids, w / w.sum(1, keepdim=True)


def graphs_on_rank(rank: int, world_size: int) -> dict:
    """{'dispatch/<impl>' | 'layer/<runner>': ('ok', max |replay - eager|) | ('skip', why) | ('error', tb)}
    for each static dispatcher's dispatch -> combine and the layer on deepep_ll with each runner."""
    from ep_runtime.distributed import device_for_rank

    device = device_for_rank()
    config = ep.MoeConfig(E, K, H, INTER)
    out = {}
    for impl, (name, options) in STATIC.items():
        key = f"dispatch/{impl}"
        _poison_cached_memory(device)
        try:
            d = dispatchers.create(name, config, **options(M, world_size))
            x = torch.randn(M, H, device=device, dtype=torch.bfloat16)
            ids, w = _routing(M, device, 1 + rank)

            def step():
                sent = d.dispatch(x, ep.TopKOutput(ids, w))
                return d.combine(CombineInput(sent.recv_x * 2, sent))  # every static format's rows: recv_x

            graph, y = _capture(step)
            worst = 0.0
            for i in range(3):
                x.copy_(torch.randn_like(x))
                new_ids, new_w = _routing(M, device, 100 * i + rank)
                ids.copy_(new_ids)
                w.copy_(new_w)
                graph.replay()
                worst = max(worst, (y.float() - step().float()).abs().max().item())
            out[key] = ("ok", worst)
        except Exception:  # noqa: BLE001
            out[key] = ("error", traceback.format_exc()[-1500:])
    for runner in runners.available():
        key = f"layer/{runner}"
        try:
            layer = ep.EPMoE(E, K, H, INTER, dispatcher="deepep_ll", runner=runner, dtype=torch.bfloat16, device=device,
                             dispatcher_options=dict(num_max_dispatch_tokens_per_rank=M))
        except ValueError as err:
            out[key] = ("skip", str(err).splitlines()[0][:300])
            continue
        try:
            x = torch.randn(M, H, device=device, dtype=torch.bfloat16)
            ids, w = _routing(M, device, 7 + rank)
            with torch.no_grad():
                # A runner step that syncs with the host cannot be captured (the torch reference does);
                # one that does not must capture and replay exactly.
                dispatched = layer.dispatcher.dispatch(x, ep.TopKOutput(ids, w))
                sync = _host_sync_in(lambda: layer.runner.run(dispatched, layer.weights))
                if sync is not None:
                    out[key] = ("skip", f"runner={runner!r} syncs with the host on deepep_ll's output: {sync}")
                    continue
                graph, y = _capture(lambda: layer(x, ids, w))
                worst = 0.0
                for _ in range(3):
                    x.copy_(torch.randn_like(x))
                    graph.replay()
                    worst = max(worst, (y.float() - layer(x, ids, w).float()).abs().max().item())
            out[key] = ("ok", worst)
        except Exception:  # noqa: BLE001
            out[key] = ("error", traceback.format_exc()[-1500:])
    return out


INFERENCE = {"standard": ("standard", {}), "deepep_normal": ("deepep_normal", {}), "mori": ("mori", {}),
             "deepep_ll": ("deepep_ll", {"num_max_dispatch_tokens_per_rank": 128}),
             **{v.impl: (v.dispatcher, v.options(128, 2)) for v in STATIC_VARIANTS}}
# Host syncs per call, as torch's sync debug mode sees them: none. A dynamic-shape dispatch waits once,
# for its count table, by polling an event after the table's copy to pinned memory (not a device sync);
# combine, a reused handle, static plans and standard (its value check is deferred) wait for nothing.


def inference_on_rank(rank: int, world_size: int) -> dict:
    """The inference kernel path (no autograd) of every dispatcher: bf16 forward against float64, and
    the host syncs of dispatch, combine and (deepep_normal) dispatch with a reused handle."""
    from ep_runtime.distributed import device_for_rank

    device = device_for_rank()
    out = {}
    for impl, (name, options) in INFERENCE.items():
        try:
            layer = ep.EPMoE(E, K, H, INTER, dispatcher=name, runner="torch", dtype=torch.bfloat16, device=device,
                             dispatcher_options=options)
            problem = make_problem(layer.config, TOKENS[:world_size], seed=8, ep_size=world_size)
            with torch.no_grad():
                errors = check_layer(layer, problem, rank, backward=False)
                x = torch.randn(100, H, device=device, dtype=torch.bfloat16)
                topk = ep.TopKOutput(*_routing(100, device, 3 + rank))
                d = layer.dispatcher
                sent = d.dispatch(x, topk)
                combine = CombineInput(getattr(sent, "recv_x", x) * 1, sent)
                d.combine(combine)
                torch.cuda.synchronize()
                syncs = {"dispatch": len(host_syncs(lambda: d.dispatch(x, topk))),
                         "combine": len(host_syncs(lambda: d.combine(combine)))}
                if name == "deepep_normal" and not options:
                    syncs["reused handle"] = len(host_syncs(lambda: d.dispatch(x, topk, handle=sent.handle)))
                    # topk_ids as another tensor: compared on the device, the flag checked later (no sync here)
                    copied = ep.TopKOutput(topk[0].clone(), topk[1])
                    syncs["reused handle, ids copied"] = len(host_syncs(
                        lambda: d.dispatch(x, copied, handle=sent.handle)))
                    d.raise_deferred()  # equal ids: nothing raised
                    other = topk[0].clone()
                    other[:, 0] = (other[:, 0] + E // 2) % E
                    other[:, 1:] = torch.where(other[:, 1:] == other[:, :1], -1, other[:, 1:])
                    d.dispatch(x, ep.TopKOutput(other, topk[1]), handle=sent.handle)
                    try:
                        d.raise_deferred()
                        syncs["other ids refused"] = "no error"
                    except ValueError as err:
                        syncs["other ids refused"] = str(err).startswith("topk_ids[0, 0] = ")
                torch.cuda.synchronize()
            out[f"inference/{impl}"] = ("ok", {"y": errors["y"], "syncs": syncs})
        except Exception:  # noqa: BLE001
            out[f"inference/{impl}"] = ("error", traceback.format_exc()[-1500:])
    return out


# (dispatcher, its options, fp8 experts): every inference path, and the three places fp8 quantizes tokens
ISOLATION = {**{impl: (name, options, False) for impl, (name, options) in INFERENCE.items()},
             "fp8 experts": ("standard", {}, True),
             "fp8 dispatch deepep_normal": ("deepep_normal", {"use_fp8": True}, False),
             "fp8 dispatch deepep_ll, fp8 experts": ("deepep_ll", {"num_max_dispatch_tokens_per_rank": 128,
                                                                  "use_fp8": True}, True)}


def isolation_on_rank(rank: int, world_size: int) -> dict:
    """Rank 0's tokens 3 (NaN) and 5 (inf) leave every other token's output as it was and give non-finite
    rows themselves, for each dispatcher with runner="auto" (bf16 inference, memory NaN-poisoned first;
    fp8 where tokens are quantized): a bad row reaches its own experts' rows only, never padding, another
    token's rows or combine's sums, and no quantization turns it finite."""
    from ep_runtime.distributed import device_for_rank

    device = device_for_rank()
    out = {}
    for impl, (name, options, fp8) in ISOLATION.items():
        _poison_cached_memory(device)
        try:
            layer = ep.EPMoE(E, K, H, INTER, dispatcher=name, runner="auto", dtype=torch.bfloat16, device=device,
                             dispatcher_options=options, quant_config=ep.QuantConfig() if fp8 else None)
            x = torch.randn(100, H, device=device, dtype=torch.bfloat16)
            ids, w = _routing(100, device, 5 + rank)
            bad = x.clone()
            if rank == 0:
                bad[3], bad[5] = float("nan"), float("inf")
            with torch.no_grad():
                clean, poisoned = layer(x, ids, w), layer(bad, ids, w)
            keep = torch.ones(100, dtype=torch.bool, device=device)
            keep[[3, 5]] = rank != 0
            out[f"isolation/{impl}"] = ("ok", {"finite": bool(torch.isfinite(poisoned[keep]).all()),
                                               "bad rows finite": torch.isfinite(poisoned[~keep]).all(1).tolist(),
                                               "err": rel_err(poisoned[keep].double(), clean[keep].double())})
        except Exception:  # noqa: BLE001
            out[f"isolation/{impl}"] = ("error", traceback.format_exc()[-1500:])
    return out


def deferred_check_on_rank(rank: int, world_size: int) -> dict:
    """deepep_ll eager on CUDA: rank 1's bad id passes the call (the table read is deferred), then the
    deferred check fails every rank, the bad one naming the value."""
    from ep_runtime.distributed import device_for_rank

    device = device_for_rank()
    layer = ep.EPMoE(E, K, H, INTER, dispatcher="deepep_ll", runner="torch", dtype=torch.bfloat16, device=device,
                     dispatcher_options=dict(num_max_dispatch_tokens_per_rank=M))
    x = torch.randn(M, H, device=device, dtype=torch.bfloat16)
    ids, w = _routing(M, device, 11 + rank)
    if rank == 1:
        ids[5, 2] = E + 3
    try:
        with torch.no_grad():
            layer(x, ids, w)
        layer.dispatcher.raise_deferred()
        return {"deferred": ("ok", "no error")}
    except ValueError as err:
        return {"deferred": ("ok", str(err))}


TRANSPORTED = {"deepep_normal": ("deepep_normal", {}), "mori": ("mori", {}),
               "deepep_ll": ("deepep_ll", {"num_max_dispatch_tokens_per_rank": 128}),
               **{v.impl: (v.dispatcher, v.options(128, 2)) for v in STATIC_VARIANTS}}


def transports_on_rank(rank: int, world_size: int) -> dict:
    """Each exchange dispatcher on NCCL and on the NVLink transport, bf16, inference: every dispatch
    field and the combine output bit-identical; the NVLink transport really carried the calls."""
    from ep_runtime.dispatchers.peer_transport import peer_transport
    from ep_runtime.distributed import device_for_rank

    if world_size < 2:  # one rank exchanges nothing: there is no NVLink transport to compare
        return {f"transport/{impl}": ("skip", "needs 2 GPUs") for impl in TRANSPORTED}
    device = device_for_rank()
    config = ep.MoeConfig(E, K, H, INTER)
    out = {}
    for impl, (name, options) in TRANSPORTED.items():
        try:
            results = {}
            for transport in ("nccl", "nvlink"):
                d = dispatchers.create(name, config, transport=transport, **options)
                fields = []
                for T, seed in ((100, 1), (0 if rank else 17, 2), (128, 3)):
                    x = torch.randn(T, H, device=device, dtype=torch.bfloat16, generator=torch.Generator(
                        device).manual_seed(seed * 10 + rank))
                    with torch.no_grad():
                        sent = d.dispatch(x, ep.TopKOutput(*_routing(T, device, seed * 10 + rank)))
                        y = d.combine(CombineInput(sent.recv_x * 3, sent))
                    kept = {k: v for k, v in vars(sent).items() if isinstance(v, (torch.Tensor, list, int))
                            and k != "handle"}
                    if "masked_m" in kept:  # expert-major rows past masked_m hold no data
                        kept["recv_x"] = kept["recv_x"][torch.arange(kept["recv_x"].shape[1], device=device)[None, :]
                                                        < kept["masked_m"][:, None]]
                    fields.append(kept | {"y": y})
                results[transport] = fields
            peer = peer_transport(d.group, device, world_size, "nvlink")
            differ = [f"call {i}: {k}" for i, (a, b) in enumerate(zip(results["nccl"], results["nvlink"]))
                      for k in a if not (torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k])]
            out[f"transport/{impl}"] = ("ok", {"differ": differ, "nvlink calls": peer.calls})
        except Exception:  # noqa: BLE001
            out[f"transport/{impl}"] = ("error", traceback.format_exc()[-1500:])
    return out


def _gpu_rank(rank: int, world_size: int) -> dict:
    return {**pairs_on_rank(rank, world_size, torch.bfloat16), **graphs_on_rank(rank, world_size),
            **inference_on_rank(rank, world_size), **isolation_on_rank(rank, world_size),
            **deferred_check_on_rank(rank, world_size),
            **transports_on_rank(rank, world_size)}


@pytest.fixture(scope="module")
def on_ranks() -> list[dict]:
    """Every multi-rank check in one NCCL job (one start-up for all of them), each rank's outcomes."""
    return run_ranks(_gpu_rank, _ranks(), backend="nccl", timeout=130, group_timeout=100)


def _outcome(on_ranks: list[dict], key: str):
    """('ok', [value per rank]), or the first rank's skip or error."""
    for per_rank in on_ranks:
        if per_rank[key][0] != "ok":
            return per_rank[key]
    return "ok", [per_rank[key][1] for per_rank in on_ranks]


@pytest.mark.parametrize("dispatcher,runner,config", PAIRS)
def test_pair_matches_float64_reference_forward_and_backward(on_ranks, dispatcher, runner, config):
    status, value = _outcome(on_ranks, f"{dispatcher}/{runner}/{config}")
    if status == "skip":
        pytest.skip(value)
    assert status == "ok", value
    for errors in value:
        assert errors["y"] <= tolerance(torch.bfloat16), errors
        assert max(errors.values()) <= GRAD_TOLERANCE.get(config, tolerance(torch.bfloat16)), errors


@pytest.mark.parametrize("impl", list(ISOLATION))
def test_a_non_finite_token_leaves_the_other_tokens_as_they_were(on_ranks, impl):
    status, value = _outcome(on_ranks, f"isolation/{impl}")
    assert status == "ok", value
    for per_rank in value:  # the same inputs and kernels: only the two bad rows may change anything
        assert per_rank["finite"] and per_rank["err"] <= tolerance(torch.bfloat16), per_rank
    assert value[0]["bad rows finite"] == [False, False], value[0]  # rank 0's tokens 3 and 5 stay non-finite


@pytest.mark.parametrize("impl", list(TRANSPORTED))
def test_nvlink_transport_equals_nccl_bit_for_bit(on_ranks, impl):
    status, per_rank = _outcome(on_ranks, f"transport/{impl}")
    if status == "skip":
        pytest.skip(per_rank)
    assert status == "ok", per_rank
    for result in per_rank:
        assert result["differ"] == [], result
        assert result["nvlink calls"] > 0, result


def _silent_peer_on_rank(rank: int, world_size: int) -> dict:
    """Rank 1 never makes its call: rank 0's wait gives up after EP_RUNTIME_TIMEOUT_S and raises."""
    import os
    import time

    from ep_runtime.dispatchers.peer_transport import peer_transport
    from ep_runtime.distributed import device_for_rank

    os.environ["EP_RUNTIME_TIMEOUT_S"] = "3"
    device = device_for_rank()
    peer = peer_transport(torch.distributed.group.WORLD, device, world_size, "nvlink")
    x = torch.randn(2 * world_size, 64, device=device)
    assert peer.fits(x.numel() * 4)
    peer.all_to_all(x, 2 * world_size, chunk=2)  # one good call
    torch.cuda.synchronize()
    torch.distributed.barrier()
    if rank == 1:
        time.sleep(8)
        return {"silent": "slept"}
    start = time.monotonic()
    peer.all_to_all(x, 2 * world_size, chunk=2)
    torch.cuda.synchronize()
    try:
        peer.check()
        return {"silent": ("no error", time.monotonic() - start)}
    except ep.PeerFailure as err:
        return {"silent": (str(err), time.monotonic() - start)}


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nvlink_wait_on_a_silent_peer_raises_within_the_timeout():
    message, seconds = run_ranks(_silent_peer_on_rank, 2, backend="nccl", timeout=60)[0]["silent"]
    print(f"NVLink transport: silent peer reported after {seconds:.2f} s (EP_RUNTIME_TIMEOUT_S=3)")
    assert "rank 1 did not signal" in message and seconds < 3 + 5, (message, seconds)


@pytest.mark.parametrize("impl", list(INFERENCE))
def test_inference_path_matches_reference_with_no_device_sync(on_ranks, impl):
    status, value = _outcome(on_ranks, f"inference/{impl}")
    assert status == "ok", value
    for result in value:
        assert result["y"] <= tolerance(torch.bfloat16), result
        assert result["syncs"]["dispatch"] == 0 and result["syncs"]["combine"] == 0, result
        assert result["syncs"].get("reused handle", 0) == 0, result
        assert result["syncs"].get("reused handle, ids copied", 0) == 0, result
        assert result["syncs"].get("other ids refused", True) is True, result


def test_deferred_check_fails_every_rank(on_ranks):
    status, messages = _outcome(on_ranks, "deferred")
    assert status == "ok", messages
    if len(messages) < 2:
        pytest.skip("needs 2 GPUs")
    assert "rank 1 got invalid topk_ids" in messages[0] and "deferred check" in messages[0], messages
    assert f"topk_ids has id {E + 3} at [5, 2]" in messages[1], messages


@pytest.mark.parametrize("name", ["deepep_normal", "mori"])
def test_a_training_dispatch_makes_no_host_sync(name):
    """x needing gradients on CUDA takes the torch-op plan (one rank): dispatch and combine make no host
    sync (the count table is read by polling an event); the plan's few host values (whether x and the
    weights need gradients, x's dtype) reach the device from pinned memory, not by a blocking copy."""
    d = dispatchers.create(name, ep.MoeConfig(E, K, H, INTER))
    x = torch.randn(100, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    topk = ep.TopKOutput(*_routing(100, "cuda", 4))
    sent = d.dispatch(x, topk)
    d.combine(CombineInput(sent.recv_x * 0.5, sent)).float().sum().backward()
    torch.cuda.synchronize()
    again = []
    syncs = (host_syncs(lambda: again.append(d.dispatch(x, topk))),
             host_syncs(lambda: d.combine(CombineInput(again[0].recv_x * 0.5, again[0]))))
    assert syncs == ([], []), syncs


def test_standard_dispatch_and_combine_make_no_host_sync():
    """standard on CUDA: dispatch (its value check deferred) and combine run under sync debug mode
    "error", the deferred checks of earlier calls included; good input raises nothing at the end."""
    from ep_runtime.dispatchers.deferred import CHECK_LAG

    d = dispatchers.create("standard", ep.MoeConfig(E, K, H, INTER))
    x = torch.randn(100, H, device="cuda", dtype=torch.bfloat16)
    topk = ep.TopKOutput(*_routing(100, "cuda", 5))
    d.dispatch(x, topk)  # builds the placement's device tables (a host copy), once per dispatcher

    def calls():
        for _ in range(2 * CHECK_LAG + 1):
            out = d.dispatch(x, topk)
            y = d.combine(CombineInput(out.hidden_states * 2, out))
        return y

    assert _host_sync_in(calls) is None
    d.raise_deferred()
    assert torch.equal(calls(), x * 2)


def test_async_call_that_moves_nothing_orders_the_waiter_after_it():
    """standard (nothing moves) with async_op=True, issued from a side stream still busy: its work holds
    an event on that stream, and wait() on the caller's stream orders the caller after it (what
    run_overlapped relies on when it issues a dispatch from its inputs' stream)."""
    d = dispatchers.create("standard", ep.MoeConfig(E, K, H, INTER))
    x = torch.randn(100, H, device="cuda", dtype=torch.bfloat16)
    topk = ep.TopKOutput(*_routing(100, "cuda", 6))
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # once before, so no kernel compiles while the stream sleeps below
        d.dispatch(x, topk, async_op=True)[1].wait()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(1_000_000_000)  # ~0.5 s: the side stream is busy when the call returns
        out, work = d.dispatch(x, topk, async_op=True)
    assert isinstance(work.event, torch.cuda.Event) and not work.event.query()
    work.wait()
    after = torch.cuda.Event()
    after.record()
    after.synchronize()  # the caller's stream, after wait(): the side stream's call must be done
    assert work.event.query()
    assert torch.equal(d.combine(CombineInput(out.hidden_states * 2, out)), x * 2)


@pytest.mark.parametrize("via", ["a later call", "raise_deferred"])
@pytest.mark.parametrize("bad", ["id", "weight"])
def test_standard_bad_value_raises_two_calls_later_and_the_calls_between_stay_finite(bad, via):
    """A bad id (E+3) or a NaN weight at call n passes that call: ids outside [0, E) go to the runner's
    sink (never an out-of-bounds index), so call n equals the reference with that pair dropped on
    every good row and call n+1 is finite and right; call n+2 (or raise_deferred) raises the error the
    immediate check names, saying which call it was. The dispatcher then goes on."""
    runner = "triton" if "triton" in runners.available() else "torch"
    layer = ep.EPMoE(E, K, H, INTER, dispatcher="standard", runner=runner, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(40, H, device="cuda", dtype=torch.bfloat16)
    ids, w = _routing(40, "cuda", 9)
    bad_ids, bad_w = ids.clone(), w.clone()
    if bad == "id":
        bad_ids[5, 2] = E + 3
        named, bad_row = f"topk_ids has id {E + 3} at [5, 2]", None
    else:
        bad_w[9, 1] = float("nan")
        named, bad_row = "topk_weights has a non-finite value nan at [9, 1]", 9

    def reference(ids_, w_):
        return moe_reference(x.double(), ids_, w_.double(), layer.w13.detach().double(), layer.w2.detach().double(),
                             layer.config)
    dropped = torch.where(bad_ids >= E, -1, bad_ids)
    with torch.no_grad():
        layer(x, ids, w)
        y_bad = layer(x, bad_ids, bad_w)  # call n: no error yet
        y_next = layer(x, ids, w)  # call n + 1
        torch.cuda.synchronize()  # no device-side assert
        with pytest.raises(ValueError) as err:
            if via == "raise_deferred":
                layer.dispatcher.raise_deferred()
            else:
                layer(x, ids, w)  # call n + 2
        good = torch.ones(40, dtype=torch.bool, device="cuda")
        if bad_row is not None:
            good[bad_row] = False
        assert torch.isfinite(y_bad[good]).all() and torch.isfinite(y_next).all()
        assert rel_err(y_bad[good], reference(dropped, w)[good]) <= tolerance(torch.bfloat16)
        assert rel_err(y_next, reference(ids, w)) <= tolerance(torch.bfloat16)
        message = str(err.value)
        assert message.startswith(named) and "deferred check" in message and "2 calls back" in message, message
        layer(x, ids, w)
        layer.dispatcher.raise_deferred()  # nothing left over from the bad call


def test_standard_layer_forward_makes_no_host_sync():
    """EPMoE on standard with the triton runner, inference: a forward makes no host sync (the torch
    runner groups pairs by expert with a data-dependent count: it syncs by design)."""
    if "triton" not in runners.available():
        pytest.skip("runner='triton' is not available here")
    layer = ep.EPMoE(E, K, H, INTER, dispatcher="standard", runner="triton", dtype=torch.bfloat16, device="cuda")
    x = torch.randn(64, H, device="cuda", dtype=torch.bfloat16)
    ids, w = _routing(64, "cuda", 13)
    with torch.no_grad():
        want = layer(x, ids, w)  # compiles the kernels, builds the device tables
        ys = []
        assert _host_sync_in(lambda: ys.extend(layer(x, ids, w) for _ in range(4))) is None
        layer.dispatcher.raise_deferred()
    assert all(torch.equal(y, want) for y in ys)
    ref = moe_reference(x.double(), ids, w.double(), layer.w13.detach().double(), layer.w2.detach().double(),
                        layer.config)
    assert rel_err(want, ref) <= tolerance(torch.bfloat16)


def test_shared_experts_on_the_side_stream_equal_their_sum_one_after_the_other():
    """On CUDA a layer's shared experts run on its side stream beside the dispatch, in the forward and in the
    two-batch schedules: each equals the routed experts' output plus the shared MLP's, computed one after the
    other on the caller's stream, bit for bit, and the float64 reference."""
    from ep_runtime.bench.overlap import run_overlapped, run_sequential
    gen = torch.Generator(device="cuda").manual_seed(17)
    up = torch.nn.Linear(H, 48, bias=False, device="cuda", dtype=torch.bfloat16)
    down = torch.nn.Linear(48, H, bias=False, device="cuda", dtype=torch.bfloat16)
    shared = torch.nn.Sequential(up, torch.nn.SiLU(), down)
    layer = ep.EPMoE(E, K, H, INTER, dispatcher="standard", runner="torch", dtype=torch.bfloat16, device="cuda",
                     shared_experts=shared)
    plain = ep.EPMoE(E, K, H, INTER, dispatcher="standard", runner="torch", dtype=torch.bfloat16, device="cuda")
    plain.load_experts(layer.w13.detach(), layer.w2.detach())
    xs = [torch.randn(T, H, device="cuda", dtype=torch.bfloat16, generator=gen) for T in (64, 37)]
    routing = [_routing(x.shape[0], "cuda", 20 + i) for i, x in enumerate(xs)]
    batches = [(x, ep.TopKOutput(ids, w)) for x, (ids, w) in zip(xs, routing)]
    with torch.no_grad():
        want = [plain(x, ids, w) + shared(x) for x, (ids, w) in zip(xs, routing)]
        got = [layer(x, ids, w) for x, (ids, w) in zip(xs, routing)]
        schedules = run_sequential(layer, batches) + run_overlapped(layer, batches)
    assert all(map(torch.equal, got, want)) and all(map(torch.equal, schedules, want * 2))
    for x, (ids, w), y in zip(xs, routing, got):
        s64 = (down.weight.double() @ torch.nn.functional.silu(up.weight.double() @ x.double().T)).T
        ref = moe_reference(x.double(), ids, w.double(), layer.w13.detach().double(), layer.w2.detach().double(),
                            layer.config) + s64
        assert rel_err(y, ref) <= tolerance(torch.bfloat16)


@pytest.mark.parametrize("dispatcher,runner,tokens", [("standard", "triton", 65536), ("deepep_ll", "masked", 16384)])
def test_rows_past_2_31_elements_equal_the_same_rows_in_chunks(dispatcher, runner, tokens):
    """DeepSeek-V3's EP 8 shard (32 experts, K=8, H=7168, I=2048) on enough tokens that the runner's
    pair rows hold more than 2^31 elements (T*K*H = 3.8e9; deepep_ll's [L, M, H] buffer likewise): an
    offset computed in int32 wraps there. The output equals the layer's on the same tokens in four
    chunks, row by row (the same kernels on fewer rows; measured equal bit for bit on an H200)."""
    if runner not in runners.available():
        pytest.skip(f"runner={runner!r} is not available here")
    options = {"num_max_dispatch_tokens_per_rank": tokens} if dispatcher == "deepep_ll" else None
    layer = ep.EPMoE(256 // 8, 8, 7168, 2048, dispatcher=dispatcher, runner=runner, dtype=torch.bfloat16,
                     device="cuda", dispatcher_options=options)
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(tokens, 7168, device="cuda", dtype=torch.bfloat16, generator=gen)
    ids = torch.rand(tokens, 32, device="cuda", generator=gen).topk(8, dim=1).indices.to(torch.int32)
    w = torch.rand(tokens, 8, device="cuda", generator=gen)
    with torch.no_grad():
        whole = layer(x, ids, w).float()
        step = tokens // 4
        chunks = torch.cat([layer(x[i:i + step], ids[i:i + step], w[i:i + step]) for i in range(0, tokens, step)]).float()
    row_err = (whole - chunks).norm(dim=1) / chunks.norm(dim=1)
    assert torch.isfinite(whole).all() and row_err.max().item() <= tolerance(torch.bfloat16), (
        row_err.argmax().item(), row_err.max().item())
    del layer, x, whole, chunks
    torch.cuda.empty_cache()


@pytest.mark.parametrize("key", [f"dispatch/{impl}" for impl in STATIC] + [f"layer/{r}" for r in runners.registered()])
def test_graph_replay_equals_eager(on_ranks, key):
    if key not in on_ranks[0]:
        pytest.skip(f"{key.split('/')[1]} is not available here")
    status, value = _outcome(on_ranks, key)
    if status == "skip":
        pytest.skip(value)
    assert status == "ok", value
    assert max(value) == 0.0, value


@pytest.mark.parametrize("runner", runners.registered())
@pytest.mark.parametrize("dtype,tokens", [(torch.bfloat16, 1), (torch.bfloat16, 4096), (torch.bfloat16, 16384),
                                          (torch.float32, 100)])
def test_runner_on_one_gpu_matches_float64_reference(runner, dtype, tokens):
    """Rows whose ids are all -1 come out exactly zero, with no NaN anywhere."""
    if runner not in runners.available():
        pytest.skip(f"runner={runner!r} is not available here")
    dtypes = runners.get(runner).dtypes  # (only a dtype the runner declares it does not compute is skipped)
    if dtypes is not None and dtype not in dtypes:
        pytest.skip(f"runner={runner!r} computes in {dtypes}, not {dtype}")
    layer = ep.EPMoE(16, 4, 1024, 512, runner=runner, dtype=dtype, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(tokens, 1024, device="cuda", generator=gen).to(dtype)
    ids = torch.rand(tokens, 16, device="cuda", generator=gen).topk(4, dim=1).indices.to(torch.int32)
    ids[: min(3, tokens) if tokens > 1 else 0] = -1
    w = torch.rand(tokens, 4, device="cuda", generator=gen)
    with torch.no_grad():
        y = layer(x, ids, w)
    ref = moe_reference(x.double(), ids, w.double(), layer.w13.detach().double(), layer.w2.detach().double(),
                        layer.config)
    assert not y.isnan().any()
    assert rel_err(y, ref) <= tolerance(dtype), rel_err(y, ref)
    if tokens > 1:
        assert (y[:3] == 0).all()


@pytest.mark.parametrize("fp8", [False, True])
def test_split_k_gemm2_matches_float64_and_replays_in_a_graph(fp8):
    """GEMM 2's K loop split over programs (GemmTiles.split_k, the decode tile the H200 table takes for
    Mixtral fp8 at T=1) on the GPU: bf16 with biases (added once), and fp8 w8a8, each against float64, and
    a CUDA-graph replay equal to the eager call. I = 1408 is 11 K steps of 128: splits of 3, the last one short."""
    from ep_runtime.quant import QuantConfig
    from ep_runtime.runners import triton_kernels as kernels
    if "triton" not in runners.available():
        pytest.skip("runner='triton' is not available here")
    E, K, H, I, T = 4, 2, 1024, 1408, 3
    gen = torch.Generator(device="cuda").manual_seed(3)
    w13 = torch.randn(E, 2 * I, H, device="cuda", generator=gen) * H ** -0.5
    w2 = torch.randn(E, H, I, device="cuda", generator=gen) * I ** -0.5
    x = torch.randn(T, H, device="cuda", generator=gen).to(torch.bfloat16)
    ids = torch.tensor([[0, 3], [2, -1], [1, 0]], device="cuda", dtype=torch.int32)
    w = torch.rand(T, K, device="cuda", generator=gen)
    tiles = kernels.GemmTiles(128, 128, 1, 4, 3)
    config = kernels.BlockConfig(16, tiles, kernels.GemmTiles(128, 128, 1, 4, 3, split_k=3))
    cfg = ep.MoeConfig(E, K, H, I, has_bias=not fp8)
    if fp8:
        q = QuantConfig()
        (q13, s13), (q2, s2) = q.quantize_weight(w13), q.quantize_weight(w2)
        run = lambda: ep.runners.fused_experts(x, q13, q2, ids, w, w13_scale_inv=s13, w2_scale_inv=s2,  # noqa: E731
                                               block_config=config)
        ref = moe_reference(x.double(), ids, w.double(), q.dequantize_weight(q13, s13).double(),
                            q.dequantize_weight(q2, s2).double(), cfg, fp8_activations=True)
    else:
        w13, w2 = w13.bfloat16(), w2.bfloat16()
        b13 = (torch.randn(E, 2 * I, device="cuda", generator=gen) * 0.1).bfloat16()
        b2 = (torch.randn(E, H, device="cuda", generator=gen) * 0.1).bfloat16()
        run = lambda: ep.runners.fused_experts(x, w13, w2, ids, w, b13=b13, b2=b2, block_config=config)  # noqa: E731
        ref = moe_reference(x.double(), ids, w.double(), w13.double(), w2.double(), cfg, b13=b13.double(),
                            b2=b2.double())
    with torch.no_grad():
        y = run()
        assert rel_err(y, ref) <= tolerance(torch.bfloat16), rel_err(y, ref)
        graphs, outs = capture_graphs(lambda k: run(), 1, x.device)
        outs[0].zero_()
        graphs[0].replay()
        assert torch.equal(outs[0], y)


@pytest.mark.parametrize("runner", runners.registered())
def test_bf16_rows_of_unaligned_width_train_on_every_runner(runner):
    """H=100, I=50 in bf16: rows of 200 and 100 bytes, not 16-byte multiples. torch._grouped_mm refuses
    such strides ("strides should be multiple of 16 bytes"), so the torch runner (and every runner's
    backward, a torch recompute) takes its loop there; forward and gradients equal the float64 reference."""
    if runner not in runners.available():
        pytest.skip(f"runner={runner!r} is not available here")
    dispatcher = "deepep_ll" if runner == "masked" else "standard"
    options = {"num_max_dispatch_tokens_per_rank": 40} if runner == "masked" else {}
    layer = ep.EPMoE(8, 2, 100, 50, dispatcher=dispatcher, runner=runner, dtype=torch.bfloat16, device="cuda",
                     dispatcher_options=options)
    errors = check_layer(layer, make_problem(layer.config, [33], seed=7), 0)
    assert max(errors.values()) < tolerance(torch.bfloat16), errors


def _for_each_bf16_layer(device: torch.device, tokens: int, seed: int, body) -> dict:
    """{'dispatcher/runner': ('ok', body(layer, problem)) | ('skip', why) | ('error', tb)} for every dispatcher with
    the torch and triton runners: a bf16 layer (E, K, H, INTER) on this one rank and a problem of `tokens` tokens."""
    options = {"deepep_ll": dict(num_max_dispatch_tokens_per_rank=tokens),
               "mori": dict(max_dispatch_tokens_per_rank=tokens)}
    out = {}
    for dispatcher in dispatchers.registered():
        for runner in ("torch", "triton"):
            key = f"{dispatcher}/{runner}"
            if runner not in runners.available():
                out[key] = ("skip", f"runner={runner!r} is not available here")
                continue
            try:
                layer = ep.EPMoE(E, K, H, INTER, dispatcher=dispatcher, runner=runner, dtype=torch.bfloat16,
                                 device=device, dispatcher_options=options.get(dispatcher))
                out[key] = ("ok", body(layer, make_problem(layer.config, [tokens], seed=seed)))
            except Exception:  # noqa: BLE001 - report this pair, go on with the others
                out[key] = ("error", traceback.format_exc()[-1500:])
    return out


def _deterministic_mode_on_rank(rank: int, world_size: int) -> dict:
    """{'dispatcher/runner': ('ok', (errors in the mode, errors outside it, whether two runs in the mode agree
    bit for bit, rel_err of each result in the mode against outside it)) | ('skip', why) | ('error', tb)}: the
    layer's forward and backward, then an inference forward, in bf16, twice under
    torch.use_deterministic_algorithms(True) and once outside it, each on NaN-poisoned cached memory."""
    import os

    from ep_runtime.distributed import device_for_rank
    from ep_runtime.scratch import SCRATCH

    # cuBLAS is deterministic only with this workspace config (without it a GEMM under the mode raises); it must be
    # set before the process's first cuBLAS call (PyTorch versions cache the check there): this fresh rank process
    # has made none yet.
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    device = device_for_rank()

    def body(layer, problem):
        seen = []
        layer.register_forward_hook(lambda module, args, y: seen.append((args[0], y.detach())))
        runs = []
        for deterministic in (True, True, False):
            SCRATCH.clear()  # (its buffers go back to the allocator, then NaN fills them)
            _poison_cached_memory(device)
            was = torch.are_deterministic_algorithms_enabled()
            torch.use_deterministic_algorithms(deterministic)
            try:
                errors = check_layer(layer, problem, rank)
                x, y = seen[-1]
                with torch.inference_mode():
                    y_inference = layer(x.detach(), problem.topk_ids[rank].to(device),
                                        problem.topk_weights[rank].to(device))
                torch.cuda.synchronize()
            finally:
                torch.use_deterministic_algorithms(was)
            errors["y_inference"] = rel_err(y_inference.cpu(), y.cpu())
            runs.append((errors, [y, x.grad, layer.w13.grad, layer.w2.grad, y_inference]))
        (inside, first), (_, second), (outside, plain) = runs
        return (inside, outside, all(torch.equal(a, b) for a, b in zip(first, second)),
                [rel_err(a.float().cpu(), b.float().cpu()) for a, b in zip(first, plain)])
    return _for_each_bf16_layer(device, M, 5, body)


@pytest.fixture(scope="module")
def deterministic_runs() -> dict:
    """_deterministic_mode_on_rank's outcomes: one process on one GPU for every dispatcher."""
    return run_ranks(_deterministic_mode_on_rank, 1, backend="nccl", timeout=300, group_timeout=200)[0]


@pytest.mark.parametrize("dispatcher", dispatchers.registered())
def test_deterministic_mode_trains_every_dispatcher_on_one_gpu(deterministic_runs, dispatcher):
    """torch.use_deterministic_algorithms(True) with CUBLAS_WORKSPACE_CONFIG=:4096:8 (torchtitan's
    --debug.deterministic): no op of the layer raises (PyTorch raises for ops without a deterministic CUDA
    implementation), two runs agree bit for bit, and each equals the float64 reference and the run outside the
    mode within bf16 rounding (test_training_step_is_bit_reproducible_outside_deterministic_mode checks the bits
    outside it), with the torch and triton runners; the inference forward equals the training one within bf16
    rounding."""
    for runner in ("torch", "triton"):
        status, value = deterministic_runs[f"{dispatcher}/{runner}"]
        if status == "skip":
            continue
        assert status == "ok", value
        inside, outside, same, in_vs_out = value
        assert max(inside.values()) <= tolerance(torch.bfloat16), (runner, inside)
        assert max(outside.values()) <= tolerance(torch.bfloat16), (runner, outside)
        assert same, runner
        assert max(in_vs_out) <= tolerance(torch.bfloat16), (runner, in_vs_out)


def _reproducible_on_rank(rank: int, world_size: int) -> dict:
    """{'dispatcher/runner': ('ok', ({result: whether the two steps agree bit for bit}, errors of the first against
    float64)) | ('skip', why) | ('error', tb)}: training_step (forward and backward; x and topk_weights need
    gradients) twice on the same bf16 inputs, outside torch.use_deterministic_algorithms, each on NaN-poisoned
    cached memory with the scratch cache emptied."""
    from ep_runtime.distributed import device_for_rank
    from ep_runtime.scratch import SCRATCH

    assert not torch.are_deterministic_algorithms_enabled()
    device = device_for_rank()

    def body(layer, problem):
        steps = []
        for _ in range(2):
            SCRATCH.clear()  # (its buffers go back to the allocator, then NaN fills them)
            _poison_cached_memory(device)
            steps.append(training_step(layer, problem, rank))
            torch.cuda.synchronize()
        first, second = steps
        same = {k: first[k] is not None and torch.equal(first[k], second[k]) for k in first}
        return same, training_step_errors(layer, problem, rank, first)
    # 256 tokens: K = 4 rows summed per token, many sums whose order atomics would vary
    return _for_each_bf16_layer(device, 256, 9, body)


@pytest.fixture(scope="module")
def reproducible_runs() -> dict:
    """_reproducible_on_rank's outcomes: one process on one GPU for every dispatcher."""
    return run_ranks(_reproducible_on_rank, 1, backend="nccl", timeout=300, group_timeout=200)[0]


@pytest.mark.parametrize("dispatcher", dispatchers.registered())
def test_training_step_is_bit_reproducible_outside_deterministic_mode(reproducible_runs, dispatcher):
    """Without torch.use_deterministic_algorithms, two training steps on the same inputs give the same bits: the
    output and the gradients of x, topk_weights, w13 and w2, with the torch and triton runners (no op of the step
    adds float values with atomics: combine's and the pack's backward gather-sums, the runners' per-token sums over
    [N, K, H], the triton kernels' fixed-order reductions); each within bf16 rounding of the float64 reference."""
    for runner in ("torch", "triton"):
        status, value = reproducible_runs[f"{dispatcher}/{runner}"]
        if status == "skip":
            continue
        assert status == "ok", value
        same, errors = value
        assert all(same.values()), (runner, same)
        assert max(errors.values()) <= tolerance(torch.bfloat16), (runner, errors)


@pytest.mark.parametrize("dispatcher", ["standard", "deepep_ll"])
def test_auto_runner_follows_a_layer_built_on_meta_to_the_gpu(dispatcher):
    """torchtitan builds models under `with torch.device("meta"):` and then calls to_empty(device="cuda"):
    runner="auto" is chosen again there (triton / masked, not the meta device's torch), and again after
    .double() (float64: torch); each step's output equals the float64 reference."""
    options = {"num_max_dispatch_tokens_per_rank": 40} if dispatcher == "deepep_ll" else {}
    with torch.device("meta"):
        layer = ep.EPMoE(8, 2, 64, 32, dispatcher=dispatcher, dispatcher_options=options)
    assert layer.runner.backend.name == "torch"
    layer.to_empty(device="cuda")  # (check_layer loads the experts)
    want = runners.resolve("auto", "cuda", layer.dispatcher.format, torch.float32)
    assert want != "torch" and layer.runner.backend.name == want
    problem = make_problem(layer.config, [33], seed=7)
    assert max(check_layer(layer, problem, 0).values()) < tolerance(torch.float32)
    layer.double()
    assert layer.runner.backend.name == "torch"
    assert max(check_layer(layer, problem, 0).values()) < tolerance(torch.float64)


def test_auto_runner_with_gemm_hooks_skips_the_backends_that_refuse_them():
    """runner="auto" with GEMM hooks on CUDA took masked for deepep_ll (it refuses hooks: the layer could not be
    built) and triton for experts that load_experts then made fp8 (triton refuses hooks with fp8: the load
    raised). Now deepep_ll runs them on triton (its rows converted; a capture is refused by name, as the torch
    runner's), and standard on triton until its experts become fp8, then torch; the hooks are called and each
    output is right."""
    calls = []
    hooks = runners.GemmHooks(after_gemm1=lambda inputs, outputs, expert_index: calls.append(len(expert_index)))
    layer = ep.EPMoE(8, 2, 128, 128, dispatcher="deepep_ll", hooks=hooks, dtype=torch.float32, device="cuda",
                     dispatcher_options={"num_max_dispatch_tokens_per_rank": 40})
    assert layer.runner.backend.name == "triton"
    problem = make_problem(layer.config, [33], seed=4)
    assert max(check_layer(layer, problem, 0).values()) <= tolerance(torch.float32)
    assert calls
    calls.clear()
    x, ids, w = problem.xs[0].to("cuda", torch.float32), problem.topk_ids[0].cuda(), problem.topk_weights[0].cuda()
    with torch.no_grad():  # hooks take compacted pairs (a host sync)
        _capture_is_refused(layer, (x, ids, w), "runner='triton' with GEMM hooks cannot run inside a CUDA graph")
    layer = ep.EPMoE(8, 2, 128, 128, dispatcher="standard", hooks=hooks, dtype=torch.bfloat16, device="cuda")
    assert layer.runner.backend.name == "triton"
    problem = make_problem(layer.config, [33], seed=5)
    assert max(check_layer(layer, problem, 0).values()) <= tolerance(torch.bfloat16)
    assert calls
    calls.clear()
    layer.load_experts(problem.w13.to(torch.bfloat16), problem.w2.to(torch.bfloat16), quantize="fp8_block")
    assert layer.runner.backend.name == "torch" and layer.quant is not None
    x, ids, w = problem.xs[0].to("cuda", torch.bfloat16), problem.topk_ids[0].cuda(), problem.topk_weights[0].cuda()
    with torch.no_grad():
        y = layer(x, ids, w)
    want = moe_reference(x.double(), ids, w.double(), problem.w13, problem.w2, layer.config)
    assert rel_err(y, want.to(y.device)) < 0.1  # fp8 vs unquantized: the bound tests/test_fp8.py derives
    assert sum(calls) == int((ids >= 0).sum())


def _capture_is_refused(layer, args, match):
    """A CUDA graph capture of layer(*args) raises `match` (by name, not the bare CUDA error of an invalidated
    capture), and the layer still runs eagerly after it, as before."""
    eager = layer(*args)
    layer.dispatcher.raise_deferred()
    torch.cuda.synchronize()
    with pytest.raises(RuntimeError, match=match):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            layer(*args)
    assert torch.equal(layer(*args), eager)


def test_torch_runner_names_what_it_cannot_capture():
    """The torch runner groups its pairs by expert with a host sync: under a graph capture it raises naming
    the runners that capture, instead of invalidating the capture with a bare CUDA error."""
    layer = ep.EPMoE(8, 2, 64, 32, dispatcher="deepep_ll", runner="torch", dtype=torch.float32, device="cuda",
                     dispatcher_options={"num_max_dispatch_tokens_per_rank": 16})
    x = torch.randn(16, 64, device="cuda")
    ids = torch.rand(16, 8, device="cuda").topk(2, dim=1).indices.int()
    w = torch.rand(16, 2, device="cuda")
    with torch.inference_mode():
        _capture_is_refused(layer, (x, ids, w), "runner='torch' cannot run inside a CUDA graph capture")
    # the masked runner on token rows groups them with a host sync too
    masked = ep.EPMoE(8, 2, 64, 32, dispatcher="standard", runner="masked", dtype=torch.bfloat16, device="cuda")
    with torch.inference_mode():
        _capture_is_refused(masked, (x.bfloat16(), ids, w), "cannot run inside a CUDA graph capture")


def test_torch_compile_traces_the_torch_runners_grouped_mm_and_compiles_each_frame_once():
    """A bf16 torch-runner layer on a GPU under torch.compile (aot_eager), forward and backward: the runner's
    torch._grouped_mm path is traced with the rest of the runner (its alignment check read data_ptr() % 16,
    which dynamo cannot trace: it ran the runner eagerly from there, compiling its helpers as frames of their
    own), each frame compiles once in the first call (error_on_recompile) and never after, and the output and
    dx equal eager's within bf16's tolerance."""
    import torch._dynamo
    from test_matrix import frames_compiled_per_call
    from torch._dynamo.convert_frame import input_codes
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = ep.EPMoE(8, 2, 64, 32, runner="torch", dtype=torch.bfloat16, device="cuda", has_bias=True)
    x = torch.randn(24, 64, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    logits = torch.randn(24, 8, device="cuda")

    def step(module):
        x.grad = None
        y = module(x, router_logits=logits)
        y.float().sum().backward()
        return y.detach(), x.grad
    want = step(layer)
    compiled = torch.compile(layer, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        frames = frames_compiled_per_call(lambda: step(compiled))
    assert frames[0] > 0 and frames[1:] == [0, 0], frames
    names = {code().co_name for code in input_codes.seen if code() is not None}
    assert "_grouped_mm_takes" not in names, sorted(names)
    assert all(rel_err(got, ref) <= tolerance(torch.bfloat16) for got, ref in zip(step(compiled), want))


@pytest.mark.parametrize("T,E_,K_,R", [(0, 8, 2, 2), (1, 8, 8, 4), (4096, 256, 8, 4), (1000, 64, 6, 8),
                                      (333, 32, 4, 2)])
def test_exchange_kernels_on_gpu_equal_the_torch_path(T, E_, K_, R):
    """The compiled layout/flag kernel and the device plan against the torch path on CPU."""
    from ep_runtime.dispatchers import exchange_kernels as xk
    from ep_runtime.dispatchers.rank_exchange import count_row, row_plan
    from ep_runtime.testing import random_topk_ids
    from ep_runtime.validation import topk_value_flags

    ids = random_topk_ids(torch.Generator().manual_seed(T + R), T, E_, K_, R, minus_one_fraction=0.2)
    w = torch.rand(T, K_)
    rank_of = (torch.arange(E_) // (E_ // R)).int().cuda()
    layout, want = count_row(ids, E_, R)
    want = torch.cat([want, topk_value_flags(ids, w, E_, True)])
    counts = layout.is_token_in_rank.sum(0)
    me = 1 % R
    table = torch.randint(0, 50, (R, want.numel()), dtype=torch.int32, generator=torch.Generator().manual_seed(1))
    table[me, 1:1 + R] = counts.int()
    global_of = (torch.arange(E_ // R, dtype=torch.int32) + me * (E_ // R)).cuda()
    in_rank, row = xk.layout_row(ids.cuda(), w.cuda(), rank_of, R, 3)
    assert torch.equal(in_rank.cpu(), layout.is_token_in_rank) and torch.equal(row.cpu(), want)
    for base, limit, total, chunk in ((counts.cumsum(0) - counts, counts, int(counts.sum()), None),
                                      (torch.arange(R) * 50, torch.full((R,), 50), R * 50, 50)):
        got = xk.table_plan(in_rank, table.cuda(), me, global_of, total, chunk)
        send_token, send_rank, index = row_plan(layout.is_token_in_rank, base, limit, total)
        real = send_token < T
        assert torch.equal(got.send_token.cpu(), send_token) and torch.equal(got.combine_index.cpu(), index)
        assert torch.equal(got.send_rank.cpu()[real], send_rank[real])


@pytest.mark.parametrize("N,K_,L", [(256, 8, 64), (512, 8, 128), (1, 2, 4)])
def test_low_latency_kernels_on_gpu_equal_the_torch_path(N, K_, L):
    from ep_runtime.dispatchers import deepep_ll
    from ep_runtime.dispatchers import exchange_kernels as xk

    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(-1, L, (N, K_), generator=gen, dtype=torch.int32)
    slot, masked_m = xk.ll_slots(ids.cuda(), L)
    want_slot, want_m = deepep_ll._slots(ids, L)
    assert torch.equal(slot.cpu(), want_slot) and torch.equal(masked_m.cpu(), want_m)
    rows = torch.randn(N, 512, generator=gen).bfloat16()
    got = xk.ll_scatter(rows.cuda(), slot, None, L * N + 1).cpu()
    want = deepep_ll._scatter(rows, want_slot, None, L * N + 1)
    written = torch.zeros(L * N + 1, dtype=torch.bool)
    written[want_slot[want_slot < L * N]] = True
    assert torch.equal(got[written], want[written])
    w = torch.rand(N, K_, generator=gen)
    part = xk.ll_gather(want.cuda()[:L * N], slot, w.cuda()).float().cpu()
    assert torch.allclose(part, deepep_ll._gather(want[:L * N].float(), want_slot, w), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("kernel,tokens", [("persistent", 2048), ("tma", 64), ("tma", 2048), ("tma_stacked", 2048)])
def test_persistent_gemm_kernels_match_portable_and_float64_on_a_deepseek_shard(kernel, tokens):
    """DeepSeek-V3's expert shapes at EP 16 (16 local experts, K=8, H=7168, I=2048), bf16: the persistent
    kernels (the shipped tma table's tiles, the 128 x 256 tile, and that tile flattened) against the
    portable kernel and the float64 reference; CUDA-graph replays (host-side TMA descriptors are launch
    arguments) equal eager. The wide tile's dynamic schedule (work items from a counter), launched
    straight (the runner's kept scratch would hide a launch that computes nothing): every computed row
    of a NaN-filled output written, the static schedule's bits, twice on one workspace whose counter the
    last program of each launch sets back to zero."""
    from ep_runtime.config import ExpertWeights
    from ep_runtime.placement import ExpertPlacement
    from ep_runtime.runner_core import RunnerInput
    from ep_runtime.runners import triton_kernels as kernels
    from ep_runtime.runners.triton_runner import run_fused

    if kernel in kernels.TMA_KERNELS and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the TMA kernels need CUDA capability >= 9")
    L, K_, H_, I_ = 16, 8, 7168, 2048
    config = ep.MoeConfig(L, K_, H_, I_)
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    w13 = (torch.randn(L, 2 * I_, H_, device="cuda", generator=gen) * H_ ** -0.5).bfloat16()
    w2 = (torch.randn(L, H_, I_, device="cuda", generator=gen) * I_ ** -0.5).bfloat16()
    x = torch.randn(tokens, H_, device="cuda", generator=gen).bfloat16()
    ids = torch.rand(tokens, L, device="cuda", generator=gen).topk(K_, dim=1).indices.to(torch.int32)
    weights = torch.rand(tokens, K_, device="cuda", generator=gen)
    ref = moe_reference(x.double(), ids, weights.double(), w13.double(), w2.double(), config)
    inp = RunnerInput.from_local_ids(x, ids, weights, ExpertPlacement(L))

    def run(block_config):
        return run_fused(inp, ExpertWeights(w13, w2), config, None, block_config)

    def pick(name):
        return kernels.pick_config(tokens, L, K_, H_, I_, torch.bfloat16, torch.device("cuda"), False, name)
    wide = kernels.GemmTiles(256, 64, 8, 8, 3, kernel=kernel)
    flat = kernels.GemmTiles(256, 64, 8, 8, 3, kernel=kernel, flatten=True)  # pipelined across work items
    dynamic = kernels.GemmTiles(256, 64, 8, 8, 3, kernel=kernel, dynamic=True)
    with torch.inference_mode():
        portable = run(pick("portable"))
        assert rel_err(portable, ref) <= tolerance(torch.bfloat16)
        for block_config in dict.fromkeys((pick(kernel), kernels.BlockConfig(128, wide, wide),
                                           kernels.BlockConfig(128, flat, flat))):
            y = run(block_config)
            assert not y.isnan().any(), block_config
            assert rel_err(y, ref) <= tolerance(torch.bfloat16), (block_config, rel_err(y, ref))
            assert rel_err(y, portable) <= tolerance(torch.bfloat16), (block_config, rel_err(y, portable))
        # GEMM 2's shape ([pairs, I] rows times w2), straight through the kernel
        aligned = kernels.align_pairs(ids, torch.tensor([True] * L + [False], device="cuda"), 0, L, 128)
        a = torch.randn(tokens * K_, I_, device="cuda", generator=gen).bfloat16()
        outs = []
        for tiles in (wide, dynamic, dynamic):
            out = torch.full((tokens * K_, H_), float("nan"), device="cuda", dtype=torch.bfloat16)
            kernels.grouped_gemm(a, w2, out, aligned, tiles, rows_per_a_row=1)
            outs.append(out)
        assert aligned.work_queue.tolist() == [0, 0]
        assert not outs[0][aligned.computed].isnan().any()
        assert all(torch.equal(out.nan_to_num(7.0), outs[0].nan_to_num(7.0)) for out in outs[1:])
        block_config = kernels.BlockConfig(128, dynamic, dynamic)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y_graph = run(block_config)
        for _ in range(2):
            y_graph.zero_()
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(y_graph, run(block_config))


@pytest.mark.parametrize("L,K_,T", [(16, 8, 30), (16, 8, 100), (32, 8, 130), (130, 8, 40)])
def test_alignment_on_gpu_places_every_pair_once_and_maps_ids_as_reroute_to_sink(L, K_, T):
    """The compiled alignment kernels (one program at <= 256 pairs, four above; ranks by a running count
    per expert, or pair against pair at 130 experts): every computed pair once, in its expert's blocks,
    in ascending order; the same buffers whether the ids come mapped or with their table (int64 ids
    past int32 included)."""
    from ep_runtime.runner_core import reroute_to_sink
    from ep_runtime.runners import triton_kernels as kernels
    gen = torch.Generator(device="cuda").manual_seed(L + T)
    E = 2 * L
    placement = ep.ExpertPlacement(E, 2, 1)  # rank 1: experts L..2L-1
    table, mask = placement.global_to_local_table("cuda"), placement.local_mask_with_sink("cuda")
    ids = torch.randint(-2, E + 2, (T, K_), device="cuda", generator=gen)
    ids[0, 0] = 2 ** 32 + L  # wrapped to int32 it would be expert L, a local one
    mapped = reroute_to_sink(ids, table)
    for single in (True, False):
        want = kernels.align_pairs(mapped, mask, 0, L, 16, single_program=single)
        got = kernels.align_pairs(ids, mask, 0, L, 16, single_program=single, id_table=table)
        for name in ("sorted_pair_ids", "block_expert", "computed", "used_blocks"):
            assert torch.equal(getattr(got, name), getattr(want, name)), (single, name)
        flat = mapped.reshape(-1).long().cpu()
        slots = got.sorted_pair_ids.long().cpu()
        real = slots[slots < T * K_]
        assert torch.equal(real.sort().values, (flat < L).nonzero().squeeze(1))  # every computed pair once
        owner = got.block_expert.long().cpu().repeat_interleave(16)[:slots.numel()]
        assert torch.equal(flat[real], owner[slots < T * K_])  # in its expert's blocks
        for e in range(L):  # ascending within an expert
            mine = real[flat[real] == e]
            assert torch.equal(mine, mine.sort().values)


def test_runner_plans_launch_their_kernels_directly_and_equal_the_plain_path(monkeypatch):
    """The triton and masked runners' per-shape plans launch through triton_launch.bind: from the third call of a
    shape no launch of runner.run goes through FastKernel's path (binder and key), and the outputs equal, bit for
    bit, those of the same calls with the direct path turned off, for 16-byte-aligned and misaligned rows."""
    from ep_runtime import triton_launch
    E_, K_, H_, I_ = 16, 4, 128, 64
    gen = torch.Generator(device="cuda").manual_seed(11)
    w13 = (torch.randn(E_, 2 * I_, H_, device="cuda", generator=gen) / H_ ** 0.5).to(torch.bfloat16)
    w2 = (torch.randn(E_, H_, I_, device="cuda", generator=gen) / I_ ** 0.5).to(torch.bfloat16)
    flat = torch.randn(9 * H_ + 8, device="cuda", generator=gen).to(torch.bfloat16)
    ids = torch.rand(9, E_, device="cuda", generator=gen).topk(K_, dim=1).indices.to(torch.int32)
    w = torch.rand(9, K_, device="cuda", generator=gen)
    slow = []
    real_launch = triton_launch.FastKernel._launch
    monkeypatch.setattr(triton_launch.FastKernel, "_launch", lambda self, *a: slow.append(1) or real_launch(self, *a))

    def outputs(runner, dispatcher, offset):
        opts = {"num_max_dispatch_tokens_per_rank": 16} if dispatcher == "deepep_ll" else {}
        layer = ep.EPMoE(E_, K_, H_, I_, dispatcher=dispatcher, runner=runner, dtype=torch.bfloat16, device="cuda",
                         dispatcher_options=opts)
        layer.load_experts(w13, w2)
        x = flat[offset:offset + 9 * H_].view(9, H_)  # offset 1: rows 2 bytes past a 16-byte boundary
        with torch.inference_mode():
            out = layer.dispatcher.dispatch(x, ep.TopKOutput(ids, w))
            ys = []
            for call in range(5):
                slow.clear()
                rows = layer.runner.run(out, layer.weights)
                direct = not slow  # (runner.run's launches only: deepep_ll's combine launches its own kernels)
                ys.append(layer.dispatcher.combine(rows).clone())
            torch.cuda.synchronize()
        return ys, direct

    for runner, dispatcher in (("triton", "standard"), ("masked", "deepep_ll")):
        for offset in (0, 1):
            ys, direct = outputs(runner, dispatcher, offset)
            assert direct, (runner, offset)  # the last call's launches all went direct
            monkeypatch.setattr(triton_launch, "_DISABLED", ["this test: FastKernel's path"])
            plain, _ = outputs(runner, dispatcher, offset)
            monkeypatch.setattr(triton_launch, "_DISABLED", [])
            assert all(torch.equal(a, b) for a, b in zip(ys, plain)), (runner, offset)
    assert triton_launch._DISABLED == []


def test_direct_triton_launches_respect_the_kernels_specialisation():
    """ep_runtime.triton_launch keys compiled kernels by Triton's own specialisation: alternating
    16-byte-aligned and misaligned inputs, sizes that are and are not multiples of 16, weighted and
    not, eagerly and inside a CUDA graph, every launch equals the float64 sum."""
    from ep_runtime import triton_launch
    from ep_runtime.dispatchers import exchange_kernels as xk

    gen = torch.Generator(device="cuda").manual_seed(7)
    cases = []
    for H in (64, 33):
        for offset in (0, 1):  # 1 float: the rows start 4 bytes past a 16-byte boundary
            S, N, K_ = 40, 24, 3
            flat = torch.randn(S * H + 1, device="cuda", generator=gen)
            src = flat[offset:offset + S * H].view(S, H)
            index = torch.randint(0, S + 2, (N, K_), device="cuda", generator=gen)  # >= S adds nothing
            weight = torch.rand(N, K_, device="cuda", generator=gen)
            cases.append((src, index, weight))
    assert {c[0].data_ptr() % 16 == 0 for c in cases} == {True, False}

    def want(src, index, weight):
        rows = torch.cat([src.double(), torch.zeros(2, src.shape[1], dtype=torch.float64, device="cuda")])
        w = torch.ones_like(index, dtype=torch.float64) if weight is None else weight.double()
        return (rows[index] * w.unsqueeze(-1)).sum(1)

    for _ in range(3):  # the first launches of each variant go through Triton, the later ones direct
        for src, index, weight in cases:
            for wt in (weight, None):
                got = xk.gather_rows(src, index, wt)
                torch.testing.assert_close(got.double(), want(src, index, wt), rtol=1e-6, atol=1e-6)
    assert triton_launch._DISABLED == []
    assert len(xk._gather_rows_kernel._compiled) >= 4  # (aligned or not) x (H % 16 or not) x weighted
    src, index, weight = cases[1]
    graphs, outs = capture_graphs(lambda k: xk.gather_rows(src, index, weight), 1, src.device)
    src.mul_(-2.0)
    graphs[0].replay()
    torch.testing.assert_close(outs[0].double(), want(src, index, weight), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("runner,tokens", [("triton", 1), ("triton", 64), ("triton", 300), ("masked", 64)])
def test_runner_scratch_is_reused_eagerly_and_never_under_a_graph(runner, tokens):
    """The triton and masked runners keep their scratch (alignment, intermediate rows) across eager calls
    of one shape (ep_runtime.scratch.SCRATCH) and allocate their own inside a capture. Checked: a held result
    survives the next same-shape call (both against float64), eager calls make no host sync, a graph
    replay equals an eager call bit for bit, and still does after the cache is emptied and its memory
    handed to other tensors. T=1 and 64 align in one program, 300 (2400 pairs) in four kernels."""
    from ep_runtime.config import ExpertWeights
    from ep_runtime.placement import ExpertPlacement
    from ep_runtime.reference import expert_reference
    from ep_runtime.runner_core import ExpertMajorInput, RunnerInput
    from ep_runtime.scratch import SCRATCH

    if runner not in runners.available():
        pytest.skip(f"runner={runner!r} is not available here")
    L, K_, H_, I_ = 16, 8, 1024, 512
    config = ep.MoeConfig(L, K_, H_, I_)
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    weights = ExpertWeights((torch.randn(L, 2 * I_, H_, device="cuda", generator=gen) * H_ ** -0.5).bfloat16(),
                            (torch.randn(L, H_, I_, device="cuda", generator=gen) * I_ ** -0.5).bfloat16())
    backend = runners.create(runner, config)

    def problem():  # token rows (triton) or the expert-major layout with masked_m rows per expert (masked)
        if runner == "masked":
            x = torch.randn(L, tokens, H_, device="cuda", generator=gen).bfloat16()
            return ExpertMajorInput(x, torch.randint(0, tokens + 1, (L,), device="cuda", generator=gen).int())
        x = torch.randn(tokens, H_, device="cuda", generator=gen).bfloat16()
        ids = torch.rand(tokens, L, device="cuda", generator=gen).topk(K_, dim=1).indices.to(torch.int32)
        return RunnerInput.from_local_ids(x, ids, torch.rand(tokens, K_, device="cuda", generator=gen),
                                          ExpertPlacement(L))

    def check(y, inp):
        if runner == "masked":  # each expert's rows below masked_m; the rest are unwritten
            for e, rows in enumerate(inp.masked_m.tolist()):
                ref = expert_reference(inp.hidden_states[e, :rows].double(), weights.w13[e].double(),
                                       weights.w2[e].double(), config)
                assert rel_err(y[e, :rows], ref) <= tolerance(torch.bfloat16), e
            return
        ref = moe_reference(inp.hidden_states.double(), inp.topk_ids, inp.topk_weights.double(),
                            weights.w13.double(), weights.w2.double(), config)
        assert rel_err(y, ref) <= tolerance(torch.bfloat16)

    with torch.inference_mode():
        first, second = problem(), problem()
        y_first = backend.run(first, weights)
        assert host_syncs(lambda: backend.run(second, weights)) == []
        y_second = backend.run(second, weights)
        check(y_first, first)  # held while `second` ran on the same scratch
        check(y_second, second)
        static = problem()
        graphs, outs = capture_graphs(lambda k: backend.run(static, weights), 1, torch.device("cuda"))
        for name in ("hidden_states", "topk_ids", "topk_weights", "masked_m"):
            if hasattr(static, name):
                getattr(static, name).copy_(getattr(second, name))
        SCRATCH.clear()
        torch.cuda.empty_cache()
        junk = torch.full((64 << 20,), float("nan"), device="cuda")  # takes over freed scratch memory
        graphs[0].replay()
        eager = backend.run(second, weights)
        torch.cuda.synchronize()
        del junk
        if runner == "masked":  # rows past masked_m are unwritten: compare the valid ones
            valid = torch.arange(tokens, device="cuda")[None, :] < second.masked_m[:, None]
            assert torch.equal(outs[0][valid], eager[valid]) and torch.equal(eager[valid], y_second[valid])
        else:
            assert torch.equal(outs[0], eager) and torch.equal(eager, y_second)


def test_num_sms_above_the_gpus_sm_count_is_named_before_any_collective():
    """num_sms beyond the GPU's SMs (no maximum before): a dispatch on that GPU names it and the range;
    the SM count itself is accepted."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cfg = ep.MoeConfig(8, 2, 16, 8)
    x, topk = torch.randn(4, 16, device="cuda"), ep.TopKOutput(torch.zeros(4, 2, dtype=torch.int32, device="cuda"),
                                                              torch.ones(4, 2, device="cuda"))
    with pytest.raises(ValueError, match=rf"num_sms={sms + 1}; allowed: 0..{sms} \(the SMs of cuda:0"):
        dispatchers.create("deepep_normal", cfg, num_sms=sms + 1).dispatch(x, topk)
    dispatchers.create("deepep_normal", cfg, num_sms=sms).dispatch(x, topk)
