"""The shared runner core: dispatch output -> runner input -> backend -> combine input.

Two input layouts exist: token rows (RunnerInput) and expert-major rows (ExpertMajorInput, deepep_ll's
[L, M*R, H] with masked_m counts). Each dispatch format registers once how its output becomes the
layout it produces natively (register_format); each backend declares the layouts it computes
(RunnerBackend.layouts). A backend computes its own layouts natively and any other through a
registered layout conversion (register_conversion), so every backend runs under every format and
neither names the other. A (format, backend) pair may also register one function for the whole
step (register_fused, as SGLang's register_fused_func); none is needed.

-1 ids (and any id outside the table) are rerouted to a sink slot, once, for every backend: by
RunnerInput's constructors, or (the formats' path, defer=True) by RunnerBackend.run_checked just before
compute(), unless the backend's kernels do the lookup themselves (reads_id_table).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Any, Callable, ClassVar, Iterable, Optional

import torch

from .config import ExpertWeights, MoeConfig
from .placement import ExpertPlacement
from .quant import QuantConfig, decode_scales, is_quantized_dtype
from .registry import add_once, check_config
from .validation import assert_on_device, capturing, check_local_ids, check_topk, check_type, weights_dtype


def needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether autograd must see this step (grad mode on and some input requires a gradient): the
    exchange and the runners take their differentiable path then, their direct kernels otherwise."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def grad_leaf(t: torch.Tensor) -> torch.Tensor:
    """t's values as a new leaf that requires a gradient: detached, or copied where t is an inference tensor (made
    under torch.inference_mode: it takes no requires_grad_, and raising there on one rank alone, mid-exchange,
    left the other ranks in the exchange)."""
    return (t.clone() if t.is_inference() else t.detach()).requires_grad_()


def untraced(fn: Callable[..., Any], name: Optional[str] = None,
             dynamic_rows: Optional[Callable[[Any], Iterable[Optional[torch.Tensor]]]] = None) -> Callable[..., Any]:
    """fn, which torch.compile runs as it is (a graph break) instead of tracing it; eager calls call fn itself
    (no dynamo frame hook per call). The disabled wrapper is made here, at import, not inside a traced call
    (dynamo would guard on the cache such a call fills, and a compiled layer's second call would compile
    again); torch builds it at its first call, importing torch._dynamo only then (about 2 s of
    `import ep_runtime`'s 6 s, which an eager process never needs). Each call makes a wrapper dynamo compiles
    apart (a frame of its own): wrap fn once per call site that takes other shapes. name: the wrapper's name
    in dynamo's logs (untraced_<name>; default fn's name).
    dynamic_rows(result): the tensors (None skipped) of fn's result whose row count (dim 0) depends on the
    routing (received rows, computed pairs); under torch.compile they enter the traced code marked dynamic
    (maybe_mark_dynamic, a 0 or 1 row count still specializes). Unmarked, dynamo compiles each frame they
    reach for the sizes of the first call and makes a size dynamic only once it changed: a frame holding two
    such sizes (received rows and pairs) compiled again at every call where one of them first changed."""
    opaque = torch._disable_dynamo(fn if dynamic_rows is None else _marking(fn, dynamic_rows))

    def call(*args: Any, **kwargs: Any) -> Any:
        return opaque(*args, **kwargs) if torch.compiler.is_compiling() else fn(*args, **kwargs)
    # Its own code object per wrapped function: dynamo compiles `call`'s frame (the graph break is inside it)
    # and keeps its compiled frames per code object, at most torch._dynamo.config.recompile_limit (8). One
    # code object shared by every wrapper filled that within a compiled layer's first call (the exchange's
    # plan, dispatch and combine, the runner: each its own fn and arity), and dynamo warned and stopped.
    call.__code__ = call.__code__.replace(co_name=f"untraced_{name or getattr(fn, '__name__', 'fn')}")
    return call


def _marking(fn: Callable[..., Any], dynamic_rows: Callable[[Any], Iterable[Optional[torch.Tensor]]]):
    """fn, marking dim 0 of dynamic_rows(its result) dynamic for torch.compile (see untraced); not under
    torch.compile(dynamic=False), which turns automatic dynamic shapes off (static shapes asked: a mark would
    override it)."""
    def marked(*args: Any, **kwargs: Any) -> Any:
        result = fn(*args, **kwargs)
        if torch._dynamo.config.automatic_dynamic_shapes:
            for t in dynamic_rows(result):
                if t is not None:
                    torch._dynamo.maybe_mark_dynamic(t, 0)
        return result
    return marked


class DispatchOutput:
    """Base of every dispatcher's output dataclass; `format` keys the format registry."""

    format: ClassVar[str] = ""

    def data_dependent_rows(self) -> tuple[Optional[torch.Tensor], ...]:
        """The tensors whose row count depends on the routing (untraced's dynamic_rows); none here: a fixed
        layout."""
        return ()


@dataclass
class CombineInput:
    """What a dispatcher's combine takes: the runner's rows in that format's layout, plus the dispatch
    output (its handle says where each row goes home)."""

    hidden_states: torch.Tensor
    dispatch_output: Any


@dataclass
class RunnerInput:
    """Token rows, the layout of every token-major format.

    hidden_states [N, H]; topk_ids [N, K] int32 local weight indices in [0, L], where L is the sink
    that -1 ids and other ranks' experts were rerouted to (-1, no expert, is taken too; with id_table set:
    the format's int32 or int64 ids, not mapped yet); topk_weights [N, K] fp32 (float64 for float64 rows);
    expert_mask [L+1] bool: an id whose entry is 0 (the sink, at least) is skipped: no FLOPs, adds zero.
    Quantized rows (an fp8 dispatch): hidden_states float8_e4m3fn, hidden_scale [N, ceil(H/128)] fp32
    (or uint8 UE8M0 exponents), out_dtype the tokens' dtype before quantization.
    A backend returns [N, H] in output_dtype: per row, routed_scaling_factor * sum_k w_k * expert_k(x).
    Build it with from_local_ids / from_global_ids: they own the id mapping and the mask.
    capacity_rows: the rows are an expert-major buffer's capacity slots taken as top-1 tokens, mostly
    padding whose real count is on the device (a speed hint: kernels pick decode-sized tiles).
    padded_rows: the rows are a fixed-size receive buffer's (mori; deepep_normal's static mode): N is its
    capacity and the real count is on the device (a speed hint: choices that pay per row or need real
    prefill sizes keep to the kernels that do not).
    local_pairs: the (token, local expert) pairs, or a bound on them, where the host knows it without a
    sync (deepep_normal's count table); None: N*K bounds them (a speed hint).
    id_table: None, or the ids are not mapped yet: topk_ids hold the format's ids as received and
    id_table [n + 1] int32 maps them (reroute_to_sink's rule; routed() applies it). A backend sees a
    mapped input unless its kernels do the lookup themselves (RunnerBackend.reads_id_table): two torch
    ops fewer per step on the formats' path.
    """

    hidden_states: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    expert_mask: torch.Tensor
    hidden_scale: Optional[torch.Tensor] = None
    out_dtype: Optional[torch.dtype] = None
    capacity_rows: bool = False
    id_table: Optional[torch.Tensor] = None
    padded_rows: bool = False
    local_pairs: Optional[int] = None

    def check(self, hidden_size: int) -> None:
        """Raise naming the tensor whose shape or dtype does not fit: rows [N, hidden_size], ids (an integer dtype)
        and weights [N, K], the mask [L+1], mapped ids in -1..L (RunnerBackend.run's check of an input made by hand;
        the ids' one host read on CPU, a device-side assert on CUDA, as ExpertMajorInput.check's counts).
        Backends read rows, ids and weights by pair n*K + k: of other shapes the triton runner's kernels read past x
        or the weights, or rows of another width, and returned a wrong result with no error."""
        x = self.hidden_states
        for name in ("hidden_states", "expert_mask"):  # (a list: an AttributeError named neither)
            if not isinstance(getattr(self, name), torch.Tensor):
                raise TypeError(f"{name} is a {type(getattr(self, name)).__name__}; expected a tensor (hidden_states "
                                f"[N, {hidden_size}], expert_mask [L+1])")
        if x.dim() != 2 or x.shape[1] != hidden_size:
            raise ValueError(f"hidden_states has shape {list(x.shape)}; expected [N, {hidden_size}] (token rows, "
                             f"hidden_size={hidden_size})")
        check_topk(self.topk_ids, self.topk_weights, x.shape[0], 0, None, x.device, values=False)
        if self.expert_mask.dim() != 1:
            raise ValueError(f"expert_mask has shape {list(self.expert_mask.shape)}; expected [L+1] (L local experts, "
                             f"then the sink)")
        if self.id_table is None:  # (with one, reroute_to_sink sends every id outside the table to the sink)
            check_local_ids(self.topk_ids, self.num_local_experts)

    @property
    def output_dtype(self) -> torch.dtype:
        return self.out_dtype or self.hidden_states.dtype

    @property
    def num_local_experts(self) -> int:
        return self.expert_mask.numel() - 1

    def routed(self) -> "RunnerInput":
        """This input with its ids mapped through id_table (itself when they already are)."""
        if self.id_table is None:
            return self
        return replace(self, topk_ids=reroute_to_sink(self.topk_ids, self.id_table), id_table=None)

    def pairs_by_expert(self, user: str) -> "ExpertPairs":
        """The computed (token, slot) pairs grouped by expert (host sync: the count is data-dependent).
        user: who needs them, named in the error raised inside a CUDA graph capture (where the sync would
        invalidate the capture with a bare CUDA error)."""
        if capturing():
            raise RuntimeError(f"{user} cannot run inside a CUDA graph capture: it groups the (token, expert) pairs "
                               f"by expert with a host sync (their count is data-dependent); capture runner='triton', "
                               f"or the masked runner under deepep_ll")
        if self.id_table is not None:
            return self.routed().pairs_by_expert(user)
        N, K = self.topk_ids.shape
        ids = self.topk_ids.long()
        # [N, K] by value (an entry 0 is skipped, whatever the mask's dtype), never the sink L (whatever its entry):
        # as the triton runner's alignment kernels read them
        computed = (self.expert_mask[ids] != 0) & (ids >= 0) & (ids < self.num_local_experts)
        pair = _computed_pairs(computed.reshape(-1))
        expert = ids.reshape(-1)[pair]
        order = torch.argsort(expert, stable=True)  # stable: a deterministic order within an expert
        pair, expert = pair[order], expert[order]
        counts = torch.bincount(expert, minlength=self.num_local_experts)
        # Where each pair comes among its token's pairs in this order: the computed slots k' of its row that sort
        # before it (a smaller expert, or the same one at an earlier slot).
        a, b = ids.unsqueeze(2), ids.unsqueeze(1)  # [N, K (k), 1], [N, 1, K (k')]
        before = (b < a) | ((b == a) & earlier_slots(K, ids.device))
        place = (before & computed.unsqueeze(1)).sum(2).reshape(-1)
        token = pair // K
        return ExpertPairs(token, expert, self.topk_weights.reshape(-1)[pair], counts, token * K + place[pair])

    @classmethod
    def from_local_ids(cls, hidden_states: torch.Tensor, local_ids: torch.Tensor, weights: torch.Tensor,
                       placement: ExpertPlacement, hidden_scale: Optional[torch.Tensor] = None,
                       out_dtype: Optional[torch.dtype] = None, defer: bool = False) -> "RunnerInput":
        """Formats carrying this rank's local ids (-1 = elsewhere or nowhere): -1 -> sink L.
        defer: leave the mapping to the backend (id_table; see the class docstring)."""
        return cls._mapped(hidden_states, local_ids, weights, placement.local_to_local_table(hidden_states.device),
                           placement, hidden_scale, out_dtype, defer)

    @classmethod
    def from_global_ids(cls, hidden_states: torch.Tensor, global_ids: torch.Tensor, weights: torch.Tensor,
                        placement: ExpertPlacement, hidden_scale: Optional[torch.Tensor] = None,
                        out_dtype: Optional[torch.dtype] = None, defer: bool = False) -> "RunnerInput":
        """Formats carrying global ids (-1 = nowhere): each id becomes this rank's local index through
        the placement's table, or the sink L when the expert lives elsewhere (any placement).
        defer: leave the mapping to the backend (id_table; see the class docstring)."""
        return cls._mapped(hidden_states, global_ids, weights, placement.global_to_local_table(hidden_states.device),
                           placement, hidden_scale, out_dtype, defer)

    @classmethod
    def _mapped(cls, hidden_states, ids, weights, table, placement, hidden_scale, out_dtype, defer) -> "RunnerInput":
        mask = placement.local_mask_with_sink(hidden_states.device)
        weights = weights.to(weights_dtype(out_dtype or hidden_states.dtype))
        if defer:
            if ids.dtype not in (torch.int32, torch.int64):  # as reroute_to_sink reads them
                ids = ids.to(torch.int32)
            return cls(hidden_states, ids, weights, mask, hidden_scale, out_dtype, id_table=table)
        return cls(hidden_states, reroute_to_sink(ids, table), weights, mask, hidden_scale, out_dtype)


def _nonzero(computed: torch.Tensor) -> torch.Tensor:
    return computed.nonzero().squeeze(1)


# [N*K] bool -> [P] indices of the computed pairs: P is data-dependent (a graph break either way)
_computed_pairs = untraced(_nonzero, "computed_pairs", dynamic_rows=lambda pair: (pair,))


@dataclass(frozen=True)
class ExpertPairs:
    """RunnerInput's computed pairs, grouped by expert: token [P], expert [P] (local index), weight [P]
    fp32 (P pairs, expert-ascending, slot order within an expert); counts [L] pairs per expert;
    place [P]: n*K + j for the j-th of token n's pairs in this order (sum_per_token's layout)."""

    token: torch.Tensor
    expert: torch.Tensor
    weight: torch.Tensor
    counts: torch.Tensor
    place: torch.Tensor

    def sum_per_token(self, rows: torch.Tensor, num_tokens: int, top_k: int) -> torch.Tensor:
        """[N, H] in rows' dtype: token n sums rows [P, H] (one per pair, in this order) of its pairs, in this
        order from zero, as K gathers of [N, H] (place j: the row of n's j-th pair, or a zero row) each added in
        turn. No atomics, so the same bits on every run (an index_add into N rows adds a token's rows with CUDA
        atomics in a varying order; on CPU it adds them in this order from zero, as this does), no [N, K, H]
        copy, and the gradient is a gather (each pair's row gets its token's; the gathers' backward is
        index_put_(accumulate=True), which sorts the indices on CUDA)."""
        P, H = rows.shape
        index = torch.full((num_tokens * top_k,), P, dtype=torch.long, device=rows.device)
        index = index.index_put((self.place,), torch.arange(P, device=rows.device)).view(num_tokens, top_k)
        padded = torch.cat([rows, rows.new_zeros(1, H)])  # row P: no pair
        y = rows.new_zeros(num_tokens, H)
        for j in range(top_k):
            y = y + padded[index[:, j]]
        return y


@dataclass
class ExpertMajorInput:
    """Expert-major rows, deepep_ll's layout: hidden_states [L, N, H] (N = M*R), where rows
    p < masked_m[l] of expert l are tokens and the rest padding that is never read (may be NaN);
    masked_m [L] int32 on the same device. Quantized rows: hidden_states float8_e4m3fn with
    hidden_scale [L, N, ceil(H/128)] (fp32 or uint8 UE8M0 exponents), out_dtype as in RunnerInput.
    A backend returns [L, N, H] in output_dtype: routed_scaling_factor * expert_l(row), without topk
    weights (the format applies them at combine); rows past masked_m are undefined."""

    hidden_states: torch.Tensor
    masked_m: torch.Tensor
    hidden_scale: Optional[torch.Tensor] = None
    out_dtype: Optional[torch.dtype] = None

    def check(self, hidden_size: int, counts: bool = True) -> None:
        """Raise naming the tensor whose shape or dtype does not fit: rows [L, M*R, hidden_size], masked_m [L] int
        (RunnerBackend.run's check of an input made by hand), and a count outside 0..M*R: on the host for CPU
        tensors, a device-side assert on CUDA (no host sync). Every backend reads masked_m[l] per expert: one of
        another length failed inside a broadcast, float counts were compared as they were, and a count above the
        buffer's rows was clamped to them (the kernels' bound, the conversion's row < masked_m[l]).
        counts=False: shapes and dtypes only, for a format's own masked_m (deepep_ll's is in range by
        construction), which the assert's kernel launches would cost host time at every call."""
        for name in ("hidden_states", "masked_m"):  # (a list: an AttributeError named neither)
            if not isinstance(getattr(self, name), torch.Tensor):
                raise TypeError(f"{name} is a {type(getattr(self, name)).__name__}; expected a tensor (hidden_states "
                                f"[L, M*R, H], masked_m [L] int32)")
        L, N, H = self.num_local_experts, self.hidden_states.shape[1], self.hidden_states.shape[2]
        if H != hidden_size:
            raise ValueError(f"hidden_states has shape {list(self.hidden_states.shape)}; expected [L, M*R, "
                             f"{hidden_size}] (hidden_size={hidden_size})")
        masked_m = self.masked_m
        if tuple(masked_m.shape) != (L,) or masked_m.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"masked_m has shape {list(masked_m.shape)} and dtype {masked_m.dtype}; "
                             f"expected [{L}] (L local experts) int32")
        if not counts or masked_m.is_meta:
            return
        rows = f"hidden_states has M*R={N} rows per expert"
        outside = (masked_m < 0) | (masked_m > N)
        if masked_m.is_cuda:
            assert_on_device(~outside.any(), f"masked_m has a count outside the allowed 0..{N} ({rows})")
        elif bool(outside.any()):
            expert = int(outside.nonzero()[0])
            raise ValueError(f"masked_m has {int(masked_m[expert])} at [{expert}]; allowed 0..{N} ({rows})")

    @property
    def output_dtype(self) -> torch.dtype:
        return self.out_dtype or self.hidden_states.dtype

    @property
    def num_local_experts(self) -> int:
        if self.hidden_states.dim() != 3:
            raise ValueError(f"hidden_states has shape {list(self.hidden_states.shape)}; expected [L, M*R, H] "
                             f"(expert-major rows)")
        return self.hidden_states.shape[0]


def check_row_scales(inp: Any, quant: Optional[QuantConfig]) -> None:
    """RunnerBackend.run's check of quantized rows made by hand (RunnerInput or ExpertMajorInput): fp8 rows
    come with hidden_scale [..., ceil(H / group)] (one per row and `group` channels: the experts' activation
    group, the default QuantConfig's for unquantized ones) fp32 or uint8 UE8M0 exponent bytes, and out_dtype
    a float dtype; float rows take none, and return their own dtype (out_dtype None or theirs: another one was
    refused naming the experts' dtype, or failed inside a matmul or a kernel). The kernels read the scales by row
    and group with no bound: fp8 rows without scales were computed as numbers (scale 1), float rows beside scales
    had them applied, and scales of another shape were read past their end or misread, all with no error."""
    x, scale = inp.hidden_states, inp.hidden_scale
    fp8 = is_quantized_dtype(x.dtype)
    if scale is None and not fp8:
        if inp.out_dtype not in (None, x.dtype):
            raise ValueError(f"out_dtype={inp.out_dtype} but hidden_states has dtype {x.dtype}; allowed: None or "
                             f"{x.dtype} (float rows return their own dtype; out_dtype is fp8 rows' tokens' dtype)")
        return
    group = (quant or QuantConfig).activation_group  # (no QuantConfig built on the common path: float rows)
    if scale is None:
        raise ValueError(f"hidden_states has dtype {x.dtype} but hidden_scale is None; fp8 rows come with their "
                         f"scales [..., ceil(H/{group})] fp32 (or uint8 UE8M0 exponents)")
    if not fp8:
        raise ValueError(f"hidden_scale was given but hidden_states has dtype {x.dtype}; scales come with fp8 rows "
                         f"(torch.float8_e4m3fn)")
    want = (*x.shape[:-1], -(-x.shape[-1] // group))
    if not isinstance(scale, torch.Tensor) or tuple(scale.shape) != want or scale.dtype not in (torch.float32,
                                                                                               torch.uint8):
        got = f"shape {list(scale.shape)} and dtype {scale.dtype}" if isinstance(scale, torch.Tensor) else \
            f"type {type(scale).__name__}"
        raise ValueError(f"hidden_scale has {got}; expected {list(want)} (one scale per row and {group} channels) "
                         f"float32, or uint8 UE8M0 exponent bytes")
    if inp.out_dtype is None or not inp.out_dtype.is_floating_point or is_quantized_dtype(inp.out_dtype):
        raise ValueError(f"out_dtype={inp.out_dtype}; fp8 rows need the tokens' dtype to return (e.g. "
                         f"torch.bfloat16)")


def weighted_rows(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """rows * weight (weight broadcastable to rows: apply_router_weight_on_input's scaling of an expert's
    input), computed in fp32 (fp64 kept) and rounded once to rows' dtype, the same on every path (the
    Triton GEMM scales its fp32 product). A weight rounded to fp16 first is subnormal below 6.1e-5 (a
    router weight of 1e-7 then lands up to 30% off) and inf above 65504."""
    acc = torch.promote_types(rows.dtype, torch.float32)
    return (rows.to(acc) * weight.to(acc)).to(rows.dtype)


def earlier_slots(top_k: int, device: torch.device) -> torch.Tensor:
    """[K, K] bool, [k, k'] True where slot k' comes before slot k (k' < k). From two aranges, not a bool
    tril: on CPU torch splits a bool tril over its intra-op threads, and on a loaded 2-core host an 8 x 8
    one then took 5-12 ms (1 us on one thread)."""
    slots = torch.arange(top_k, device=device)
    return slots.unsqueeze(1) > slots


def reroute_to_sink(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """table [n + 1] int32: what each id in [0, n) becomes, then the sink. Returns table[id] as int32,
    the sink for every id outside [0, n): -1, and bad ids that reach the runner before their
    deferred check reports them (standard, mori static on CUDA), which must never index out of
    bounds (a device-side assert ends the process). Two ops: ids clamped to [-1, n], and -1 indexes
    the table's last entry."""
    if ids.dtype not in (torch.int32, torch.int64):  # index tensors must be int32/int64 (uint8 is a mask)
        ids = ids.to(torch.int32)
    return table[ids.clamp(-1, table.shape[0] - 1)]


# ---------------------------------------------------------------- layout conversions

# fn(input, config) -> (input in the target layout, back: target layout's result -> source layout's)
Conversion = Callable[[Any, MoeConfig], tuple[Any, Callable[[torch.Tensor], torch.Tensor]]]
_CONVERSIONS: dict[tuple[type, type], Conversion] = {}


def register_conversion(source: type, target: type, fn: Conversion) -> None:
    """Register how an input in layout `source` is computed by a backend of layout `target`."""
    add_once(_CONVERSIONS, (source, target), fn, f"layout conversion {source.__name__} -> {target.__name__}")


def convert(inp: Any, target: type, config: MoeConfig) -> tuple[Any, Callable[[torch.Tensor], torch.Tensor]]:
    """`inp` in layout `target`, and the function taking the result back to `inp`'s layout."""
    key = (type(inp), target)
    if key not in _CONVERSIONS:
        known = ", ".join(f"{s.__name__} -> {t.__name__}" for s, t in _CONVERSIONS)
        raise ValueError(f"no layout conversion {key[0].__name__} -> {target.__name__}; registered: {known}")
    return _CONVERSIONS[key](inp, config)


def _expert_major_to_token_rows(inp: ExpertMajorInput, config: MoeConfig):
    """Each row becomes a token with one slot: expert l below masked_m[l], else -1 (the sink: never
    read). Weight 1 is exact, so the rows come back unweighted, as the expert-major contract says.
    Two torch ops a call (the comparison with masked_m and the where): the rest is kept per shape
    (_capacity_rows), and the ids are left to the backend's lookup (defer)."""
    L, N, H = inp.hidden_states.shape
    device = inp.hidden_states.device
    slot, expert, ones, placement = _capacity_rows(L, N, device)
    ids = torch.where(slot < inp.masked_m.to(device).unsqueeze(1), expert, -1).view(L * N, 1)
    scale = inp.hidden_scale.reshape(L * N, -1) if inp.hidden_scale is not None else None
    rows = RunnerInput.from_local_ids(inp.hidden_states.reshape(L * N, H), ids, ones, placement, scale,
                                      inp.out_dtype, defer=True)
    rows.capacity_rows = True
    return rows, lambda y: y.view(L, N, H)


_CAPACITY_ROWS: dict = {}  # (L, N, device) -> _capacity_rows' tensors; read only, like the placement's tables


def _capacity_rows(L: int, N: int, device: torch.device) -> tuple:
    """(slot [1, N] int32 0..N-1, expert [L, 1] int32 0..L-1, ones [L*N, 1] fp32, ExpertPlacement(L)): what an
    expert-major input of L x N rows becomes as token rows, apart from masked_m. Kept per shape and device,
    except while torch.compile traces or a CUDA graph captures (made there by ops the graph holds, never kept
    for eager calls)."""
    key, keep = (L, N, device), not (torch.compiler.is_compiling() or capturing())
    kept = _CAPACITY_ROWS.get(key) if keep else None
    if kept is not None:
        return kept
    # (made outside inference mode when kept: a kept tensor serves later training calls too, where an inference
    # tensor cannot be saved for backward)
    with torch.inference_mode(False) if keep else contextlib.nullcontext():
        made = (torch.arange(N, dtype=torch.int32, device=device).unsqueeze(0),
                torch.arange(L, dtype=torch.int32, device=device).unsqueeze(1),
                torch.ones(L * N, 1, dtype=torch.float32, device=device), ExpertPlacement(L))
    if keep:
        if len(_CAPACITY_ROWS) >= 64:  # (a bound, not an LRU: shapes beyond it are rare)
            _CAPACITY_ROWS.clear()
        _CAPACITY_ROWS[key] = made
    return made


def _token_rows_to_expert_major(inp: RunnerInput, config: MoeConfig):
    """Computed (token, slot) pairs grouped by expert into [L, C, H], C = the most pairs of one
    expert; the result is weighted and summed per token. Reads the counts on the host (one sync):
    a token-major format is not graph-captured through this path."""
    x = inp.hidden_states
    N, L, H = x.shape[0], inp.num_local_experts, x.shape[1]
    pairs = inp.pairs_by_expert("an expert-major runner (masked) on a token-major format")
    token, expert, weight, counts = pairs.token, pairs.expert, pairs.weight, pairs.counts
    slot = torch.arange(token.numel(), device=x.device) - (counts.cumsum(0) - counts)[expert]
    capacity = int(counts.max()) if token.numel() else 0
    out_dtype = inp.output_dtype
    acc = torch.promote_types(out_dtype, torch.float32)
    rows = x[token]
    scale = buffer_scale = None
    if inp.hidden_scale is not None:  # quantized rows: the router weight goes into their scales
        scale = decode_scales(inp.hidden_scale)[token]
        if config.apply_router_weight_on_input:
            scale = scale * weight.unsqueeze(1)
        buffer_scale = scale.new_ones(L, capacity, scale.shape[1]).index_put((expert, slot), scale)
    elif config.apply_router_weight_on_input:
        rows = weighted_rows(rows, weight.unsqueeze(1))
    buffer = x.new_zeros(L, capacity, H).index_put((expert, slot), rows)

    def back(out: torch.Tensor) -> torch.Tensor:
        o = out[expert, slot].to(acc)
        if not config.apply_router_weight_on_input:
            o = o * weight.unsqueeze(1).to(acc)
        return pairs.sum_per_token(o, N, inp.topk_ids.shape[1]).to(out_dtype)

    return ExpertMajorInput(buffer, counts.to(torch.int32), buffer_scale, inp.out_dtype), back


register_conversion(ExpertMajorInput, RunnerInput, _expert_major_to_token_rows)
register_conversion(RunnerInput, ExpertMajorInput, _token_rows_to_expert_major)


# ---------------------------------------------------------------- dispatch formats

@dataclass(frozen=True)
class FormatPath:
    """How a format's dispatch output reaches a backend and comes back: `layout` is the input type
    to_runner_input returns; to_combine_input takes the runner's result (in that layout)."""

    layout: type
    to_runner_input: Callable[[Any, ExpertPlacement, MoeConfig], Any]
    to_combine_input: Callable[[torch.Tensor, Any], CombineInput]


Fused = Callable[["MoeRunner", Any, ExpertWeights], CombineInput]
_FORMATS: dict[str, FormatPath] = {}
_FUSED: dict[tuple[str, str], Fused] = {}


def register_format(format: str, layout: type, to_runner_input: Callable[[Any, ExpertPlacement, MoeConfig], Any],
                    to_combine_input: Callable[[torch.Tensor, Any], CombineInput] = CombineInput) -> None:
    """Register dispatch format `format`: to_runner_input(dispatch_output, placement, config) returns a
    `layout` input (RunnerInput or ExpertMajorInput); to_combine_input(result, dispatch_output)
    makes the combine input (default: the rows as they are)."""
    add_once(_FORMATS, format, FormatPath(layout, to_runner_input, to_combine_input), f"dispatch format {format!r}")


def register_fused(format: str, backend: str, fn: Fused) -> None:
    """Optional: one function doing conversion, compute and post step for (format, backend). Its
    to_runner_input may leave the ids unmapped (RunnerInput.id_table): call routed() unless the backend
    reads the table."""
    add_once(_FUSED, (format, backend), fn, f"fused function for ({format!r}, {backend!r})")


def _ensure_registrations() -> None:
    # Dispatcher and runner modules register on import.
    from . import dispatchers, runners  # noqa: F401


def format_path(format: str) -> FormatPath:
    """The registration of `format`; raises naming the registered formats."""
    if format not in _FORMATS:
        _ensure_registrations()
    if format not in _FORMATS:
        raise ValueError(f"no runner path for dispatch format {format!r}: no module registered it "
                         f"(runner_core.register_format); registered formats: {', '.join(sorted(_FORMATS))}")
    return _FORMATS[format]


def registered_pairs() -> list[tuple[str, str]]:
    """Every (format, backend) pair the core can run: all of them (natively or through a conversion)."""
    _ensure_registrations()
    from . import runners
    return [(fmt, backend) for fmt in sorted(_FORMATS) for backend in sorted(runners.registered())]


def supported_formats(backend: str) -> list[str]:
    return sorted({fmt for fmt, be in registered_pairs() if be == backend})


class MoeRunner:
    """Runs one backend on any registered dispatch format (the layer never branches on backend)."""

    def __init__(self, backend: Any, config: MoeConfig, placement: ExpertPlacement):
        from .runners.base import RunnerBackend  # (runners import this module)
        # (a wrong one failed in the first run() as "'NoneType' object has no attribute ...", or, config=None,
        # was taken silently)
        check_type("backend", backend, RunnerBackend, "a runner backend (ep.runners.create(name, config))")
        check_config(config)
        check_type("placement", placement, ExpertPlacement, "an ep.ExpertPlacement (e.g. dispatcher.placement)")
        self.backend = backend
        self.config = config
        self.placement = placement

    def check_format(self, format: str) -> None:
        format_path(format)

    def run(self, dispatch_output: DispatchOutput, weights: ExpertWeights) -> CombineInput:
        """The backend on this rank's dispatch output (or the pair's registered fused function). weights:
        this rank's local experts only, [L, ...] in the placement's local order, never the global
        [E, ...] tensors (the format's local ids would index them as if they were the shard)."""
        if not isinstance(getattr(dispatch_output, "format", None), str):  # (else AttributeError 'format')
            raise TypeError(f"dispatch_output must be a dispatcher's dispatch output (d.dispatch(x, topk)); got "
                            f"{type(dispatch_output).__name__}")
        fused = _FUSED.get((dispatch_output.format, self.backend.name))
        if fused is not None:
            return fused(self, dispatch_output, weights)
        path = format_path(dispatch_output.format)
        runner_input = path.to_runner_input(dispatch_output, self.placement, self.config)
        L = self.placement.num_local_experts
        try:  # the weights' one check per call (run_checked, unlike run(), does not check them again)
            self.backend.check_weights(weights, L, runner_input.output_dtype)
        except ValueError as err:
            raise ValueError(f"{err} (MoeRunner.run takes this rank's shard: its {L} local experts, global "
                             f"experts {self.placement.describe_local_experts()}, as [{L}, ...] tensors)") from None
        return path.to_combine_input(self.backend.run_checked(runner_input, weights), dispatch_output)
