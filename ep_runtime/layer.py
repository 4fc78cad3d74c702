"""EPMoE: the expert-parallel MoE layer. forward reads as the data flow: route, dispatch, run, combine."""
from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping, Sized
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import parametrize
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.weak import WeakIdKeyDictionary

from . import dispatchers, runners
from .config import ExpertWeights, MoeConfig
from .dispatchers.base import agree_before_collectives, as_process_group, join_settings_check, raise_bad_input
from .dispatchers.overlap import in_call_order
from .dispatchers.peer_transport import describe as describe_transport
from .distributed import naming_peer_failures
from .placement import ExpertPlacement
from .quant import (
    FP8_DTYPES,
    INFERENCE_ONLY,
    QuantConfig,
    as_quant_config,
    check_expert_dtype,
    check_scale_tensor,
    check_scale_values,
    is_quantized_dtype,
)
from .routing import TopKConfig, TopKOutput, name_non_finite_logits, select_experts
from .runner_core import MoeRunner, grad_leaf, needs_grad
from .validation import (
    check_finite,
    check_float_tensor,
    check_hidden_states,
    check_topk,
    check_topk_values,
    float_dtype,
    is_int_at_least,
    layer_dtype_and_device,
)


class EPMoE(nn.Module):
    """Mixture-of-Experts layer whose experts are spread over the ranks of `group`.

    Owns this rank's experts only: w13 [L, 2I, H] ([gate; up]; [L, I, H] when not gated),
    w2 [L, H, I], b13/b2 when has_bias. `load_experts` takes the global [E, ...] weights of a
    checkpoint and keeps this rank's slice, or this rank's [L, ...] shard (`load_expert`: one expert's
    tensors, as an inference engine reads them); `gather_experts` hands every expert back in that
    layout. device="meta" builds it without memory: `to_empty(device=...)` then `load_experts` (or
    `load_expert` per expert) materialises it (a forward before, or with some expert tensors still on meta after a
    load_state_dict(..., assign=True) of a state_dict without them, raises naming them). dispatcher: a name from ep_runtime.dispatchers;
    runner: a name from ep_runtime.runners or "auto" (EP_RUNTIME_RUNNER, else on CUDA the backend
    native to the dispatcher's layout, masked for deepep_ll and triton otherwise, that takes the hooks and
    the experts' storage format, else torch; see runners.resolve). group: a ProcessGroup holding this rank, or a 1-D DeviceMesh (its group: torchtitan's
    mesh["ep"]); None: the default process group when one exists, else a single process (with a dispatcher
    that shards experts, an error in a process a launcher started as one rank of several: call
    ep.init_distributed() before building the layer).
    dtype None / device None: torch's default dtype and device, as torch's own modules take them
    (torch.set_default_dtype, `with torch.device("meta"):` while a model is built; float32 and cpu
    unless changed).
    Until load_experts, the experts are random and depend only on the seed and their global ids
    (see reset_parameters): an EP layer equals a one-process layer built after the same manual_seed.
    expert_to_rank: which rank holds each global expert (default contiguous: rank r holds
    [r*L, (r+1)*L)); load_experts, gather_experts and the exchange all follow it.
    num_redundant_experts N: E + N physical experts, L = (E + N) / R per rank, so hot experts can
    have copies on several ranks (expert_to_rank then names the rank of each of the E + N slots).
    The router's ids stay logical: each (token, expert) pair goes to one copy, chosen on the device
    (placement.to_physical). expert_load() counts the pairs this rank sent per expert;
    apply_placement / rebalance move experts between steps (ep_runtime.eplb).
    quant_config: store the experts quantized (ep.QuantConfig(), or a format's name such as "fp8_block":
    fp8 e4m3 with [128, 128] block scales, w13_scale_inv / w2_scale_inv beside w13 / w2); `dtype` stays the
    activations' dtype.
    load_experts can also switch a layer to fp8 (fp8 checkpoint weights, or quantize="fp8_block").
    fp8 layers are inference-only (forward raises when a gradient is needed).
    shared_experts: a module every rank holds (DeepSeek-V3's and Qwen2-MoE's shared experts),
    [T, H] -> [T, H]; forward adds its output to the routed experts'. On CUDA it runs while the dispatch
    is in flight (on a side stream), so it costs no time on the critical path; CPU ranks run it before
    the dispatch (its collectives, if any, then keep their order against the exchange's on every rank).
    The sum equals routed + shared computed one after the other.
    """

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, *,
                 dispatcher: str = "standard", runner: str = "auto", group: Optional[Any] = None,
                 dtype: Optional[torch.dtype] = None, device: Any = None,
                 activation: str = "silu", is_gated: bool = True, has_bias: bool = False,
                 gemm1_alpha: Optional[float] = None, gemm1_clamp_limit: Optional[float] = None,
                 routed_scaling_factor: float = 1.0, apply_router_weight_on_input: bool = False,
                 topk_config: Optional[TopKConfig] = None, hooks: Optional[runners.GemmHooks] = None,
                 dispatcher_options: Optional[dict] = None, runner_options: Optional[dict] = None,
                 expert_to_rank: Optional[Sequence[int]] = None, num_redundant_experts: int = 0,
                 quant_config: Optional[Union[str, QuantConfig]] = None, shared_experts: Optional[nn.Module] = None):
        super().__init__()
        from . import envs
        # This rank's own arguments, its runner built, before its dispatcher: where one rank fails here alone,
        # it joins the settings check every other rank's dispatcher ends with, so they fail there naming it
        # (else they built their layers and waited for it in the first forward).
        try:
            if shared_experts is not None and not isinstance(shared_experts, nn.Module):
                raise TypeError(f"shared_experts={type(shared_experts).__name__}; allowed: None or an nn.Module "
                                f"mapping [T, H] to [T, H]")
            quant_config = as_quant_config("quant_config", quant_config)  # (a format's name, as quantize= takes it)
            self.config = MoeConfig(num_experts, top_k, hidden_size, intermediate_size, activation=activation,
                                    is_gated=is_gated, has_bias=has_bias, gemm1_alpha=gemm1_alpha,
                                    gemm1_clamp_limit=gemm1_clamp_limit, routed_scaling_factor=routed_scaling_factor,
                                    apply_router_weight_on_input=apply_router_weight_on_input)
            self._check_topk_config(topk_config)
            group = as_process_group(group)
            if group is None and dist.is_available() and dist.is_initialized():
                group = dist.group.WORLD
            dtype, device = layer_dtype_and_device(dtype, device)
            placement = _initial_placement(dispatcher, num_experts, group, expert_to_rank, num_redundant_experts)
            knob = envs.get("RUNNER") if runner == "auto" else "auto"
            runner = knob if runner == "auto" else runner
            self._runner_args = (runner, hooks, _options("runner_options", runner_options))
            self._runner_knob = None if knob == "auto" else knob  # the runner EP_RUNTIME_RUNNER chose for "auto"
            with self._naming_the_runner_knob():
                # (with quant_config: what the backend cannot compute fp8 with, its hooks say, is refused here)
                backend = self._make_backend(self._physical_config(placement), dispatchers.get(dispatcher).format,
                                             device, dtype, quant_config)
            dispatcher_options = _options("dispatcher_options", dispatcher_options)
            if quant_config is not None:  # refused here, not after the dispatcher's settings check: see _fp8_rows
                _check_activation_group(quant_config, _fp8_rows(dispatcher, dispatcher_options), dispatcher)
        except Exception as error:
            join_settings_check(dispatcher, group, error, device)
            raise
        self.shared_experts = shared_experts
        self._side_streams: dict = {}
        self._dispatcher_args = (dispatcher, group, device, dispatcher_options)
        self._use_placement(placement)
        self.runner = MoeRunner(backend, self.dispatcher.config, self.dispatcher.placement)
        self.runner.check_format(self.dispatcher.format)

        L, H, I = self.placement.num_local_experts, hidden_size, intermediate_size
        factory = dict(dtype=dtype, device=device)
        self._activation_dtype = dtype  # the tokens' dtype once the experts are quantized
        self.quant: Optional[QuantConfig] = None
        self.w13_scale_inv = self.w2_scale_inv = None
        # normal tensors even for a layer built under torch.inference_mode (a server's model setup): an inference
        # tensor takes no load_experts / load_state_dict copy_ outside it, and a training step cannot save it
        with torch.inference_mode(False):
            self.w13 = nn.Parameter(torch.empty(L, self.config.w13_rows, H, **factory))
            self.w2 = nn.Parameter(torch.empty(L, H, I, **factory))
            self.b13 = nn.Parameter(torch.zeros(L, self.config.w13_rows, **factory)) if has_bias else None
            self.b2 = nn.Parameter(torch.zeros(L, H, **factory)) if has_bias else None
        self._new_load_counters()
        if quant_config is not None:
            self._store_quantized(quant_config, device)
        self.reset_parameters()
        # A state_dict holds this rank's slots in the placement of the moment: off the default placement
        # (rebalanced, or built with expert_to_rank) it names that placement (PLACEMENT_KEY), and loading
        # one adopts the placement its weights are in.
        self.register_state_dict_post_hook(_save_placement)
        self.register_load_state_dict_pre_hook(_load_format)  # first: the placement hook reads the format
        self.register_load_state_dict_pre_hook(_load_placement)
        self.register_load_state_dict_post_hook(_follow_assigned_weights)

    def _check_topk_config(self, topk_config: Optional[TopKConfig]) -> None:
        """self.topk_config: `topk_config` checked against the config (None: top_k softmax routing)."""
        top_k = self.config.top_k
        if topk_config is not None and not isinstance(topk_config, TopKConfig):
            raise TypeError(f"topk_config={topk_config!r}; expected None or an ep.TopKConfig")
        self.topk_config = topk_config or TopKConfig(top_k=top_k)
        if self.topk_config.top_k != top_k:
            raise ValueError(f"topk_config.top_k={self.topk_config.top_k} differs from top_k={top_k}")
        self.topk_config.check(self.config.num_experts)
        if self.topk_config.routed_scaling_factor != 1.0 and self.config.routed_scaling_factor != 1.0:
            both = self.topk_config.routed_scaling_factor * self.config.routed_scaling_factor
            raise ValueError(f"routed_scaling_factor={self.config.routed_scaling_factor} and "
                             f"topk_config.routed_scaling_factor={self.topk_config.routed_scaling_factor} would both "
                             f"scale the output (by {both}); allowed: one of them != 1 (DeepSeek scales once)")

    def _use_placement(self, placement: ExpertPlacement) -> None:
        """Build the dispatcher over `placement`'s physical view (it sees P physical experts and their
        ranks) and take the placement as the dispatcher holds it: a dispatcher may place its slots
        itself (a plugin dealing experts round-robin, say), and the weights must follow it. When only
        the logical map changes (ep.eplb plans keep slots contiguous over the ranks) the dispatcher,
        its buffers and its transport stay as they are."""
        current = getattr(self, "dispatcher", None)
        if current is None or current.placement != placement.physical():
            self.dispatcher = self._make_dispatcher(placement)
        physical = self.dispatcher.placement
        self.placement = physical if placement.physical_to_logical is None else ExpertPlacement(
            placement.num_experts, physical.ep_size, physical.rank, physical.expert_to_rank,
            placement.physical_to_logical)

    def __deepcopy__(self, memo: dict) -> "EPMoE":
        """copy.deepcopy (torch.optim.swa_utils.AveragedModel, an EMA or a frozen reference copy): the
        copy owns copies of the weights, load counters and submodules; it shares the dispatcher and the
        runner, which hold no weights but the process group (not copyable), the exchange's buffers and
        transport, as one layer called twice shares them."""
        for shared in (self.dispatcher, self.runner, self._dispatcher_args):
            memo.setdefault(id(shared), shared)
        memo.setdefault(id(self._side_streams), {})  # CUDA streams: the copy makes its own
        twin = self.__class__.__new__(self.__class__)
        memo[id(self)] = twin
        twin.__setstate__(copy.deepcopy(self.__dict__, memo))
        return twin

    def __copy__(self) -> "EPMoE":
        """copy.copy: a shallow copy, as before __getstate__ refused pickling (copy.copy goes through it)."""
        twin = self.__class__.__new__(self.__class__)
        twin.__dict__.update(self.__dict__)
        return twin

    def __getstate__(self):
        """pickle (torch.save(model), pickle.dumps, sending the module to another process) is refused by name:
        the dispatcher is bound to this process's group, exchange buffers and transport, which no other process
        can use (it was a bare "cannot pickle 'WeakMethod' object", or the process group's own error)."""
        raise TypeError(f"EPMoE(num_experts={self.config.num_experts}, dispatcher={self.dispatcher.name!r}) cannot be "
                        f"pickled (torch.save(model), pickle.dumps, or a module sent to another process): its "
                        f"dispatcher is bound to this process's group and exchange buffers. Save the weights instead: "
                        f"torch.save(model.state_dict()) (this rank's experts; load_state_dict into a model built the "
                        f"same way), layer.gather_experts() or, for a Hugging Face model, ep.hf.export_state_dict(model) "
                        f"and save_pretrained; copy.deepcopy(model) copies it within the process")

    def _make_dispatcher(self, placement: ExpertPlacement):
        name, group, device, options = self._dispatcher_args
        if hasattr(self, "w13") and not self.w13.is_meta:  # built on meta, then materialised: the real device
            device = self.w13.device
        physical = placement.physical()
        if physical.expert_to_rank is not None:
            options = {**options, "expert_to_rank": physical.expert_to_rank}
        return dispatchers.create(name, self._physical_config(placement), group=group, device=device, **options)

    def _physical_config(self, placement: ExpertPlacement) -> MoeConfig:
        """The config as the dispatcher and the runner see it: num_experts = the placement's physical experts."""
        P = placement.physical().num_experts
        return self.config if P == self.config.num_experts else replace(self.config, num_experts=P)

    def _new_load_counters(self) -> None:
        """Per-expert load since the last reset: pairs per physical slot of the current placement
        ([P] int64, one add per forward) and per logical expert from earlier placements ([E])."""
        self._set_load_counters(torch.zeros(self.config.num_experts, dtype=torch.int64, device=self.w13.device))

    def _set_load_counters(self, logical: torch.Tensor) -> None:
        """Fresh physical counters and these logical ones, as normal tensors even when made under
        torch.inference_mode (a later training step adds to them)."""
        with torch.inference_mode(False):
            self._load_logical = logical.clone()
            self._load_physical = torch.zeros(self.placement.num_physical_experts, dtype=torch.int64,
                                              device=logical.device)

    def _make_backend(self, config: MoeConfig, format: str, device, dtype,
                      quant: Optional[QuantConfig]) -> runners.RunnerBackend:
        name, hooks, options = self._runner_args
        return runners.create(name, config, hooks=hooks, device=device, format=format, dtype=dtype, quant=quant,
                              **options)

    def _make_runner(self, device, dtype) -> MoeRunner:
        backend = self._make_backend(self.dispatcher.config, self.dispatcher.format, device, dtype, self.quant)
        return MoeRunner(backend, self.dispatcher.config, self.dispatcher.placement)

    @contextmanager
    def _naming_the_runner_knob(self):
        """Around building or checking a runner EP_RUNTIME_RUNNER chose for runner="auto": its error names
        runner='<knob>', a name the caller never wrote; say where it came from."""
        try:
            yield
        except (RuntimeError, ValueError) as err:
            if self._runner_knob is None or type(err) not in (RuntimeError, ValueError):  # (a subclass: other args)
                raise
            raise type(err)(f"{err} (runner='auto' took EP_RUNTIME_RUNNER={self._runner_knob!r}: unset it, or pass "
                            f"runner=...)") from None

    def _check_runner_quant(self, quant: QuantConfig) -> None:
        """Before the layer switches to `quant`'s format: a named runner that cannot compute it is refused;
        for runner="auto" the backend _choose_runner will take is built (and dropped) here, so a load it would
        fail refuses before the layer changes."""
        with self._naming_the_runner_knob():
            if self._runner_args[0] != "auto":
                self.runner.backend.check_quant(quant)
            elif not self.w13.is_meta:
                self._make_backend(self.dispatcher.config, self.dispatcher.format, self.w13.device, self.dtype, quant)

    def _choose_runner(self) -> None:
        """runner="auto" chosen again for the experts' device, the dtype, the hooks and the storage format."""
        if self._runner_args[0] == "auto" and not self.w13.is_meta:
            wanted = runners.resolve("auto", self.w13.device, self.dispatcher.format, self.dtype,
                                     self._runner_args[1], self.quant)
            if wanted != self.runner.backend.name:
                self.runner = self._make_runner(self.w13.device, self.dtype)

    def _apply(self, fn, *args, **kwargs):
        """.to(), .cuda(), to_empty() ...: see _follow_weights. A dtype the runners do not take (.to(torch.complex64),
        .to(torch.float8_e4m3fn)) is refused before any tensor moves, naming it (else the move succeeded and the next
        forward blamed x's dtype).
        Quantized experts keep their format: a dtype cast (.to(torch.float32), .half(), a model-wide .to(dtype))
        changes the dtype the layer computes in (and its biases'), while w13 / w2 stay fp8 and their scales fp32,
        moved to the new device only (the cast turned the fp8 values into plain numbers beside their scales, the
        scales into bf16, or under .to(torch.float8_e4m3fn) into zeros)."""
        probe = fn(torch.empty(0, dtype=self.dtype, device=self.w13.device))
        if probe.dtype != self.dtype:
            try:
                float_dtype(probe.dtype)
            except ValueError as err:
                raise ValueError(f"EPMoE.to(...): {err}") from None
        if self.quant is not None:
            stored = {id(t) for t in (self.w13, self.w2, self.w13_scale_inv, self.w2_scale_inv)}
            applied = fn

            def fn(t):  # noqa: F811 - the stored format's tensors move without a cast
                if id(t) not in stored:
                    return applied(t)
                moved = applied(torch.empty(0, dtype=t.dtype, device=t.device))
                return applied(t) if moved.dtype == t.dtype else t.to(device=moved.device)
        with torch.inference_mode(False):  # (.to() under torch.inference_mode: the experts stay normal tensors)
            out = super()._apply(fn, *args, **kwargs)
        if self.quant is not None:
            self._activation_dtype = probe.dtype
        self._follow_weights()
        return out

    def _follow_weights(self) -> None:
        """The experts are new tensors (.to(), .cuda(), to_empty(), load_state_dict(assign=True)): the load
        counters follow them (and restart at 0), and runner="auto" is chosen again for their device and
        dtype (a layer built on the meta device, as torchtitan builds models, then materialised on CUDA,
        gets the CUDA backend)."""
        self._new_load_counters()
        self._choose_runner()

    def _store_quantized(self, quant: QuantConfig, device) -> None:
        """Switch the expert storage to `quant`'s format: w13/w2 in its dtype plus their block scales,
        none of them (nor the biases) trainable (fp8 is inference-only)."""
        # the fp8 dispatch's activation format, if any
        _check_activation_group(quant, getattr(self.dispatcher, "fp8", None), self.dispatcher.name)
        L, H, I = self.placement.num_local_experts, self.config.hidden_size, self.config.intermediate_size
        frozen = lambda t: nn.Parameter(t, requires_grad=False)  # noqa: E731
        if self.quant is None:
            self._activation_dtype = self.w13.dtype
        self.quant = quant
        # (normal tensors even under torch.inference_mode, as load_experts or load_state_dict may run there: an
        # inference tensor takes no later load's copy_ outside it, nor apply_placement's moves)
        with torch.inference_mode(False):
            self.w13 = frozen(torch.empty(L, self.config.w13_rows, H, dtype=quant.dtype, device=device))
            self.w2 = frozen(torch.empty(L, H, I, dtype=quant.dtype, device=device))
            self.w13_scale_inv = frozen(torch.ones(quant.weight_scale_shape(L, self.config.w13_rows, H), device=device))
            self.w2_scale_inv = frozen(torch.ones(quant.weight_scale_shape(L, H, I), device=device))
        for bias in (self.b13, self.b2):
            if bias is not None:
                bias.requires_grad_(False)
        self._choose_runner()  # (runner="auto" with hooks: triton takes them unquantized only)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random initial experts that depend only on torch's seed and each expert's global id, so a
        layer spread over R ranks holds exactly the experts a one-process layer built after the same
        torch.manual_seed holds (and two ranks never start with copies of each other's experts).
        One base seed is drawn from torch's global generator (the same draw on every rank), then
        expert e gets its own generator seeded base + e: w13 ~ N(0, 1/H), w2 ~ N(0, 1/I), drawn in
        float32 on the CPU and cast to the layer's dtype; biases start at 0. Nothing is drawn on the
        meta device (materialise with to_empty, then load_experts)."""
        # On the CPU whatever the default device (`with torch.device("meta"):` while a model is built)
        self._refuse_parametrized("reset_parameters")
        base = int(torch.randint(0, 2 ** 62, (), dtype=torch.int64, device="cpu"))
        if self.w13.is_meta:
            return
        H, I = self.config.hidden_size, self.config.intermediate_size
        global_ids = self.placement.local_expert_ids().tolist()  # copies of an expert start equal
        # A "standard" layer's experts under FSDP2's fully_shard are DTensors (torchtitan's meta-device init:
        # fully_shard, to_empty, then this): every expert drawn into whole tensors, of which each rank keeps its piece.
        whole = self.quant is None and _is_dtensor(self.w13)
        w13_rows, w2_rows = ([torch.empty(t.shape, dtype=t.dtype) for t in (self.w13, self.w2)] if whole
                             else (self.w13, self.w2))
        for local, expert in enumerate(global_ids):
            gen = torch.Generator().manual_seed(base + expert)
            w13 = torch.randn(self.w13.shape[1:], generator=gen, device="cpu") * H ** -0.5
            w2 = torch.randn(self.w2.shape[1:], generator=gen, device="cpu") * I ** -0.5
            if self.quant is None:
                w13_rows[local].copy_(w13)
                w2_rows[local].copy_(w2)
                continue
            for name, w in (("w13", w13), ("w2", w2)):  # quantized per expert: the same draws, then rounded
                q, scale = self.quant.quantize_weight(w.unsqueeze(0))
                getattr(self, name)[local].copy_(q[0])
                getattr(self, f"{name}_scale_inv")[local].copy_(scale[0])
        if whole:
            _copy_values(self.w13, w13_rows)
            _copy_values(self.w2, w2_rows)
        for bias in (self.b13, self.b2):
            if bias is not None:
                bias.zero_()

    @property
    def dtype(self) -> torch.dtype:
        """The tokens' dtype: the experts' (it follows .to(dtype)), or for quantized experts the dtype
        the layer computes in and returns."""
        return self.w13.dtype if self.quant is None else self._activation_dtype

    @property
    def weights(self) -> ExpertWeights:
        return ExpertWeights(self.w13, self.w2, self.b13, self.b2, self.w13_scale_inv, self.w2_scale_inv, self.quant)

    @torch.no_grad()
    def load_experts(self, w13: torch.Tensor, w2: torch.Tensor, b13: Optional[torch.Tensor] = None,
                     b2: Optional[torch.Tensor] = None, *, w13_scale_inv: Optional[torch.Tensor] = None,
                     w2_scale_inv: Optional[torch.Tensor] = None,
                     quantize: Optional[Union[str, QuantConfig]] = None) -> None:
        """Load this rank's experts from either the global weights (w13 [E, 2I, H], gate rows then up
        rows, [E, I, H] when not gated; w2 [E, H, I]; b13 [E, 2I]; b2 [E, H]), of which it keeps its
        shard, or this rank's shard itself ([L, ...], experts in the order of its global ids: what
        gather_experts' inverse and a sharded checkpoint hold), so no rank needs every expert in
        memory. Dim 0 tells them apart: E means global, L means shard. Where L == E too (one rank, or
        redundant copies filling every rank with one copy of each expert, in an order a placement may
        change) E rows are always the global weights: a shard in its slots' order loads through
        load_state_dict or load_expert. Works after building on the meta device and `to_empty(device=...)`.

        fp8 (DeepSeek-V3 checkpoints as they are): w13/w2 float8_e4m3fn with w13_scale_inv
        [E, ceil(2I/128), ceil(H/128)] and w2_scale_inv [E, ceil(H/128), ceil(I/128)] fp32 (or their
        [L, ...] shards); the layer then stores fp8. quantize="fp8_block" (or a QuantConfig) quantizes
        float weights on load; a layer built with quant_config quantizes float weights with it. fp8
        weights without their scales, and other fp8 flavours (e5m2, e4m3fnuz), are refused naming the tensor.

        Where the experts are sharded over ranks, every rank calls it together: the ranks share their checks'
        results in one small all_gather before any layer changes, so a bad tensor on one rank (a shape, dtype,
        NaN or inf) fails every rank, naming that rank, instead of leaving the others to wait for it in the next
        forward."""
        error = None
        try:
            self._refuse_parametrized("load_experts")
            quant, staged = self._staged_experts(w13, w2, b13, b2, w13_scale_inv, w2_scale_inv, quantize)
        except Exception as err:  # noqa: BLE001 - whatever stops this rank stops every rank (raised below)
            error = err
        if self.dispatcher.shards_experts and self.placement.ep_size > 1:
            agree_before_collectives(self.dispatcher.group, self.placement.ep_size, error,
                                     "load_experts: every rank stops before loading", self.w13.device)
        elif error is not None:
            raise error
        # (stored anew also where the fp8 storage was replaced by tensors of another dtype: cast again otherwise)
        if quant is not None and (quant is not self.quant or self.w13.dtype != quant.dtype):
            self._store_quantized(quant, self.w13.device)
        for name, piece in staged.items():
            _copy_values(getattr(self, name), piece)

    def _staged_experts(self, w13, w2, b13, b2, w13_scale_inv, w2_scale_inv, quantize) -> tuple:
        """load_experts' checks, touching nothing: (the QuantConfig the layer will store, or None;
        {name: this rank's tensor as stored})."""
        E, L = self.config.num_experts, self.placement.num_local_experts
        if not isinstance(w13, torch.Tensor):  # (its repr, a whole nested list, would be the message)
            raise TypeError(f"w13 has type {type(w13).__name__}; expected a floating torch.Tensor")
        given = w13.shape[0] if w13.dim() == 3 else None
        if given not in (E, L):
            raise ValueError(f"w13 has shape {list(w13.shape)}; dim 0 must be num_experts={E} (global weights) or "
                             f"this rank's num_local_experts={L} (its shard)")
        given_tensors = dict(w13=w13, w2=w2, b13=b13, b2=b2, w13_scale_inv=w13_scale_inv, w2_scale_inv=w2_scale_inv)
        for name, t in given_tensors.items():
            if isinstance(t, torch.Tensor) and t.is_meta and not self.w13.is_meta:
                self._refuse_meta(name)
            if isinstance(t, torch.Tensor) and not t.is_meta and self.w13.is_meta:  # (its copy would do nothing)
                raise RuntimeError(f"{name} holds values but {_META_LAYER}")
        shard = given != E  # E rows are global, also where L == E (see above)
        experts = self.placement.local_expert_ids()  # this rank's global ids, in local order
        take = lambda t: None if t is None else (t if shard else t[experts.to(t.device)])  # noqa: E731
        local_experts = self.placement.describe_local_experts()
        quant = self._load_quant(w13, w2, w13_scale_inv, w2_scale_inv, quantize)
        if quant is not None and quant is not self.quant:  # before the ranks agree, not after (_store_quantized)
            _check_activation_group(quant, getattr(self.dispatcher, "fp8", None), self.dispatcher.name)
            self._check_runner_quant(quant)
        if quant is None:
            full = ExpertWeights(w13, w2, b13, b2)
            full.check(self.config, L if shard else E)
        elif is_quantized_dtype(w13.dtype):  # the checkpoint's fp8 and scales, as they are
            full = ExpertWeights(w13, w2, b13, b2, w13_scale_inv, w2_scale_inv, quant)
            # every scale given, not this rank's slice: global scales fail on every rank alike (they are small)
            full.check(self.config, L if shard else E, values=True)  # (w13/w2's values: staged below)
        else:  # float weights, quantized here (this rank's slice only)
            ExpertWeights(w13, w2, b13, b2).check(self.config, L if shard else E)
            # checked in fp32, as quantize_weight reads them (a NaN weight would show as a NaN scale); one at a time
            q13, s13 = quant.quantize_weight(_expert_values(f"w13 (experts {local_experts})", take(w13), torch.float32,
                                                            w13.device))
            q2, s2 = quant.quantize_weight(_expert_values(f"w2 (experts {local_experts})", take(w2), torch.float32,
                                                          w2.device))
            full, shard = ExpertWeights(q13, q2, take(b13), take(b2), s13, s2, quant), True
        # Every check passes before the layer changes: a refused load leaves it as it was (its format too).
        staged = {}
        for name in ("w13", "w2", "b13", "b2", "w13_scale_inv", "w2_scale_inv"):
            src = getattr(full, name)
            if src is None:
                continue
            stored = (quant.dtype if quant is not None and name in ("w13", "w2") else
                      torch.float32 if name.endswith("_scale_inv") else getattr(self, name).dtype)
            staged[name] = _expert_values(f"{name} (experts {local_experts})", src if shard else take(src), stored,
                                          self.w13.device)
        return quant, staged

    @torch.no_grad()
    def load_expert(self, expert_id: int, *, w13: Optional[torch.Tensor] = None, w2: Optional[torch.Tensor] = None,
                    gate: Optional[torch.Tensor] = None, up: Optional[torch.Tensor] = None,
                    b13: Optional[torch.Tensor] = None, b2: Optional[torch.Tensor] = None,
                    w13_scale_inv: Optional[torch.Tensor] = None, w2_scale_inv: Optional[torch.Tensor] = None,
                    gate_scale_inv: Optional[torch.Tensor] = None, up_scale_inv: Optional[torch.Tensor] = None) -> int:
        """Load pieces of one expert, as an inference engine's weight loader reads a checkpoint tensor by
        tensor (vLLM's weight_loader(param, weight, name, shard_id in w1/w2/w3, expert_id)): no rank builds
        the [E, ...] or [L, ...] tensors load_experts takes. expert_id: the global (logical) id, 0..E-1.
        Each piece in nn.Linear's [out, in] layout, as a per-expert checkpoint stores it: w13 [2I, H]
        ([gate; up]; [I, H] when not gated), or gate [I, H] (w1, gate_proj) and up [I, H] (w3, up_proj)
        apart, in one call or several; w2 [H, I] (down_proj); b13 [2I] ([I] when not gated), b2 [H]. A
        checkpoint storing a matrix transposed passes its .t() (a view: no copy). The pieces go into every
        slot of this rank that holds the expert (each copy, with redundant experts) and nowhere else:
        call it on every rank with every expert; it returns how many of this rank's slots it wrote (0:
        another rank holds the expert; its pieces' shapes and dtypes are still checked, their values
        only where they are stored). Works after building on the meta device and `to_empty(device=...)`
        (until every expert is loaded, the others hold what to_empty left).
        Quantized layers (built with quant_config, or switched to fp8 by load_experts): float pieces are
        quantized as load_experts does; fp8 pieces come with their block scales ({piece}_scale_inv fp32
        [ceil(rows/block), ceil(cols/block)], DeepSeek-V3's weight_scale_inv). gate and up apart need
        intermediate_size to be a multiple of the scale block's rows (else their blocks overlap: give w13)."""
        E, H, I = self.config.num_experts, self.config.hidden_size, self.config.intermediate_size
        if not is_int_at_least(expert_id, 0) or expert_id >= E:
            raise ValueError(f"expert_id={expert_id!r}; allowed: an int 0..{E - 1} (a global expert id, "
                             f"num_experts={E})")
        if self.w13.is_meta:
            raise RuntimeError(_META_LAYER)
        self._refuse_parametrized("load_expert")
        if _is_dtensor(self.w13):  # (its rows written into a DTensor's index went to a copy: nothing loaded)
            raise RuntimeError("this layer's experts are DTensors (FSDP2's fully_shard sharded them), whose rows this "
                               "rank may not hold; load them whole: load_experts with the [E, ...] weights on every "
                               "rank, or load_state_dict")
        rows = self.config.w13_rows
        pieces = {"w13": ("w13", 0, (rows, H)), "w2": ("w2", 0, (H, I))}  # piece -> (tensor, first row, shape)
        if self.config.is_gated:
            pieces.update(gate=("w13", 0, (I, H)), up=("w13", I, (I, H)))
        if self.config.has_bias:
            pieces.update(b13=("b13", 0, (rows,)), b2=("b2", 0, (H,)))
        given = {name: t for name, t in dict(w13=w13, gate=gate, up=up, w2=w2, b13=b13, b2=b2).items() if t is not None}
        scales = dict(w13=w13_scale_inv, gate=gate_scale_inv, up=up_scale_inv, w2=w2_scale_inv)
        unknown = [name for name in given if name not in pieces]
        if unknown:
            raise ValueError(f"{unknown[0]} was given but this layer has " + (
                "is_gated=False (w13 is [I, H]: give w13)" if unknown[0] in ("gate", "up") else "has_bias=False"))
        if "w13" in given and ("gate" in given or "up" in given):
            raise ValueError("w13 was given with gate / up; allowed: w13 ([gate; up] rows), or gate and / or up")
        for name, scale in scales.items():
            if scale is not None and name not in given:
                raise ValueError(f"{name}_scale_inv was given without {name}; scales come with their fp8 weight")
        if not given:
            raise ValueError(f"nothing to load for expert {expert_id}; give at least one of {', '.join(pieces)}")
        for name, t in given.items():
            self._check_expert_piece(name, t, pieces[name], scales.get(name))
        slots = [j for rank, j in self.placement.replicas_of(expert_id) if rank == self.placement.rank]
        if not slots:
            return 0
        # Every value is checked before the first write: a refused call leaves the layer as it was.
        staged = [(pieces[name], *self._expert_piece_values(name, t, scales.get(name), expert_id))
                  for name, t in given.items()]
        for (param, start, shape), value, scale in staged:
            dst = getattr(self, param)
            for j in slots:
                _copy_values(dst[j, start:start + shape[0]], value)
                if scale is not None:
                    first = start // self.quant.weight_block[0]
                    getattr(self, f"{param}_scale_inv")[j, first:first + scale.shape[0]].copy_(scale)
        return len(slots)

    def _refuse_meta(self, name: str) -> None:
        """load_experts' and load_expert's error for a checkpoint tensor on the meta device."""
        raise ValueError(f"{name} is on the meta device (it has no values); allowed: a tensor holding the "
                         f"checkpoint's values, on any device (this layer's is {self.w13.device})")

    def _refuse_parametrized(self, verb: str) -> None:
        """The verbs that write or move the expert tensors in place refuse one that is not the layer's own parameter
        but computed from others at each access (torch.nn.utils.parametrize, parametrizations.weight_norm; the hook
        based prune, weight_norm and spectral_norm): a write into it went into that access's copy and was lost, no
        error (forward, backward, state_dict and gather_experts read it as any module does, and work)."""
        names = [name for name in _EXPERT_TENSORS if name not in self._parameters and getattr(self, name) is not None]
        if not names:
            return
        first = names[0]
        undo = (f"torch.nn.utils.parametrize.remove_parametrizations(layer, {first!r})"
                if parametrize.is_parametrized(self, first) else
                f"torch.nn.utils.prune.remove(layer, {first!r}), torch.nn.utils.remove_weight_norm(layer, {first!r}) "
                f"or remove_spectral_norm")
        raise RuntimeError(f"{verb}: this layer's {', '.join(names)} {'is' if len(names) == 1 else 'are'} computed from "
                           f"other tensors at each access (a reparametrization: torch.nn.utils.parametrize, weight_norm, "
                           f"spectral_norm or prune), so {verb} cannot write or move {'it' if len(names) == 1 else 'them'} "
                           f"in place (the write went into that access's copy); call it before the reparametrization, "
                           f"or remove it first, keeping the current values: {undo}")

    def _check_expert_piece(self, name: str, t, where: tuple, scale) -> None:
        """load_expert's checks of one piece that read no values: type, shape, dtype, scale shape, block fit."""
        param, start, shape = where
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape {list(shape)}; got {type(t).__name__}")
        if t.is_meta:
            self._refuse_meta(name)
        if not t.is_floating_point():
            raise TypeError(f"{name} has dtype {t.dtype}; expected a floating dtype")
        check_expert_dtype(name, t)  # (e5m2, e4m3fnuz: no format of ours reads them)
        if tuple(t.shape) != shape:
            hint = f"; a checkpoint storing it transposed passes {name}.t()" if tuple(t.shape) == shape[::-1] else ""
            raise ValueError(f"{name} has shape {list(t.shape)}; expected {list(shape)} (one expert, [out, in] as "
                             f"nn.Linear stores it{hint})")
        fp8 = is_quantized_dtype(t.dtype)
        if fp8 and (self.quant is None or param not in ("w13", "w2") or t.dtype != self.quant.dtype):
            stores = getattr(self, param).dtype
            raise ValueError(f"{name} has dtype {t.dtype}; this layer stores {param} as {stores} (fp8 experts one at a "
                             f"time need a layer built with quant_config=ep.QuantConfig(); load_experts switches a "
                             f"whole layer)")
        if scale is not None and not fp8:
            raise ValueError(f"{name}_scale_inv was given but {name} has dtype {t.dtype}; scales come with float8 "
                             f"weights ({', '.join(map(str, FP8_DTYPES))})")
        if self.quant is None or param not in ("w13", "w2"):
            return
        block_rows = self.quant.weight_block[0]
        end = start + shape[0]
        if start % block_rows or (end % block_rows and end != getattr(self, param).shape[1]):
            raise ValueError(f"{name} fills rows {start}..{end - 1} of {param}, whose [{block_rows}, "
                             f"{self.quant.weight_block[1]}] scale blocks it shares with the other half "
                             f"(intermediate_size={shape[0]} is not a multiple of weight_block[0]={block_rows}); "
                             f"give w13 whole ([gate; up])")
        if fp8:
            if scale is None:
                raise ValueError(f"{name}_scale_inv is missing: fp8 weights need their block scales (fp32 "
                                 f"{list(self.quant.weight_scale_shape(1, *shape)[1:])})")
            check_scale_tensor(f"{name}_scale_inv", scale, self.quant.weight_scale_shape(1, *shape)[1:], values=False)

    def _expert_piece_values(self, name: str, t: torch.Tensor, scale, expert_id: int) -> tuple:
        """(the piece as stored, its block scales or None), on the layer's device, values checked."""
        param = "w13" if name in ("gate", "up") else name
        if is_quantized_dtype(t.dtype):
            value = _expert_values(f"{name} (expert {expert_id})", t, t.dtype, self.w13.device)
            check_scale_tensor(f"{name}_scale_inv", scale, tuple(scale.shape))
            return value, scale.to(self.w13.device)
        stored = torch.float32 if self.quant is not None and param in ("w13", "w2") else getattr(self, param).dtype
        value = _expert_values(f"{name} (expert {expert_id})", t, stored, self.w13.device)
        if stored != getattr(self, param).dtype:  # float into fp8 experts: quantized as load_experts does
            q, scale_inv = self.quant.quantize_weight(value.unsqueeze(0))
            return q[0], scale_inv[0]
        return value, None

    def _load_quant(self, w13, w2, w13_scale_inv, w2_scale_inv, quantize) -> Optional[QuantConfig]:
        """The format load_experts stores: the layer's, the one asked for, or fp8_block for fp8 input."""
        quantize = as_quant_config("quantize", quantize)
        fp8_in = isinstance(w13, torch.Tensor) and is_quantized_dtype(w13.dtype)
        for name, t in (("w13", w13), ("w2", w2)):
            check_expert_dtype(name, t)  # (e5m2, e4m3fnuz: no format of ours reads them)
        for name, t in (("w2", w2),):
            if isinstance(t, torch.Tensor) and is_quantized_dtype(t.dtype) != fp8_in:
                raise ValueError(f"{name} has dtype {t.dtype} but w13 has {w13.dtype}; give both quantized or neither")
        if fp8_in and w13_scale_inv is None and w2_scale_inv is None and quantize is None and self.quant is None:
            check_expert_dtype("w13", w13, scaled=False)  # (cast as numbers, they were off by their scales, silently)
        for name, scale in (("w13_scale_inv", w13_scale_inv), ("w2_scale_inv", w2_scale_inv)):
            if fp8_in and scale is None:
                raise ValueError(f"{name} is missing: fp8 weights need their block scales (DeepSeek-V3's "
                                 f"*_scale_inv, fp32 [E, ceil(rows/128), ceil(cols/128)])")
            if not fp8_in and scale is not None:
                raise ValueError(f"{name} was given but w13 has dtype {w13.dtype}; scales come with float8 weights "
                                 f"({', '.join(map(str, FP8_DTYPES))})")
        if fp8_in and quantize is not None and quantize.dtype != w13.dtype:
            raise ValueError(f"quantize={quantize.format!r} stores {quantize.dtype} but w13 is already {w13.dtype}")
        if quantize is not None:
            return quantize if self.quant is None or quantize != self.quant else self.quant
        if fp8_in:
            return self.quant or QuantConfig()
        return self.quant

    @torch.no_grad()
    def gather_experts(self, dst: Optional[int] = None) -> Optional[ExpertWeights]:
        """Every expert back in checkpoint layout: ExpertWeights with w13 [E, 2I, H] ([gate; up]),
        w2 [E, H, I] (and b13 [E, 2I], b2 [E, H] with biases), the inverse of load_experts. dst None:
        on every rank (one all_gather per tensor); dst r (a rank of the layer's group): only there
        (one gather per tensor), the other ranks get None. Every rank of the group must call it, with the
        same dst: one small all_gather first shares it, so a bad or different dst on any rank fails every rank."""
        shards = [self.w13, self.w2, self.b13, self.b2, self.w13_scale_inv, self.w2_scale_inv]
        group, R = self.dispatcher.group, self.dispatcher.world_size
        collective = self._experts_split()
        error = None
        if dst is not None and not (is_int_at_least(dst, 0) and dst < R):
            error = ValueError(f"dst={dst!r}; allowed: None (every rank) or a rank 0..{R - 1} of the layer's group")
        if collective:  # a bad or different dst on one rank fails every rank here, not in the gathers below
            # (and experts of another dtype on some rank, a layer cast with .to(dtype) there only: the gathers
            # below move raw bytes, which gloo answered by aborting a process)
            agree_before_collectives(group, R, error, "gather_experts: every rank stops before gathering",
                                     self.w13.device, dst=None if error is not None or dst is None else int(dst),
                                     **{"expert dtype": _expert_dtypes(self)})
        elif error is not None:
            raise error
        dst = None if dst is None else int(dst)  # (a numpy integer becomes Python's, as torch's gather takes it)
        me = self.dispatcher.rank
        # row of each expert's first copy among the gathered [R * L] rows (all of them without copies)
        first = [rank * self.placement.num_local_experts + local
                 for rank, local in (self.placement.replicas_of(e)[0] for e in range(self.config.num_experts))]
        if not collective:  # every rank already holds every expert (in its slots)
            # (a "standard" layer's experts under FSDP2's fully_shard are DTensors: whole again by fully_shard's
            # all-gather, which every rank calling this joins)
            shards = [t.full_tensor() if _is_dtensor(t) else t for t in shards]
            if dst is not None and me != dst:
                return None
            return ExpertWeights(*[_first_copies(t.detach(), first) if t is not None else None for t in shards],
                                 self.quant)
        out = []
        for t in shards:
            raw = t.detach().contiguous().view(torch.uint8) if t is not None and t.dtype in FP8_DTYPES else t
            parts = None if t is None else self._collect(raw.detach().contiguous(), group, R, dst)  # fp8 as bytes
            if parts is None or (dst is not None and me != dst):
                out.append(None)
                continue
            out.append(_first_copies(parts.reshape((-1,) + tuple(parts.shape[2:])), first).view(t.dtype))
        if dst is not None and me != dst:
            return None
        return ExpertWeights(*out, self.quant)

    def _experts_split(self) -> bool:
        """Whether this rank holds only its share of the experts (they are split over the group's ranks)."""
        return self.dispatcher.shards_experts and self.dispatcher.world_size > 1

    def gathers_collectively(self) -> bool:
        """Whether gather_experts needs every rank of the group: its experts are split over the ranks, or they are
        DTensors (FSDP2's fully_shard), whole again only through a collective."""
        return self._experts_split() or any(_is_dtensor(t) for t in (self.w13, self.w2, self.b13, self.b2))

    @staticmethod
    def _collect(t: torch.Tensor, group, world_size: int, dst: Optional[int]) -> Optional[torch.Tensor]:
        """[R, *t.shape]: every rank's t in group-rank order, on every rank (dst None) or on dst only."""
        parts = [torch.empty_like(t) for _ in range(world_size)]
        if dst is None:
            in_call_order(group, lambda: dist.all_gather(parts, t, group=group))
        elif dist.get_rank(group) == dst:
            in_call_order(group, lambda: dist.gather(t, parts, group=group, group_dst=dst))
        else:
            in_call_order(group, lambda: dist.gather(t, None, group=group, group_dst=dst))
            return None
        return torch.stack(parts)

    def forward(self, x: torch.Tensor, topk_ids: Optional[torch.Tensor] = None,
                topk_weights: Optional[torch.Tensor] = None, *, router_logits: Optional[torch.Tensor] = None,
                correction_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [T, H] -> y [T, H]. Give topk_ids [T, K] (global, -1 allowed) with topk_weights [T, K] (or
        both as one ep.TopKOutput, select_experts' result), or router_logits [T, E] (routed with
        self.topk_config). x may also be [..., H] (e.g. a Hugging Face block's [batch, seq, H]) with
        ids/weights/logits [..., K or E] or already flat [T, K or E] (as a Hugging Face router's logits come): tokens
        are flattened and y comes back in x's shape. x's dtype must be the layer's (self.dtype), except under
        torch.autocast, where x of any float dtype is cast to it (and y is in it)."""
        # A check failing here, on one rank only, fails the other ranks' dispatch at once too
        # (Dispatcher.join_with_bad_input), as the dispatcher's own checks do.
        if isinstance(topk_ids, tuple) and len(topk_ids) == 2 and topk_weights is None:
            topk_ids, topk_weights = topk_ids  # layer(x, ep.select_experts(...)), as SGLang's layers take it
        if isinstance(x, torch.Tensor) and x.dim() > 2:
            lead, H = tuple(x.shape[:-1]), self.config.hidden_size
            K, E = self.config.top_k, self.config.num_experts
            bad_input = None
            try:
                if x.shape[-1] != H:  # named as given: the [T, H] check would name the flattened shape
                    raise ValueError(f"x has shape {list(x.shape)}; expected [..., {H}] (hidden_size={H}: [T, H], or "
                                     f"leading dims such as [batch, seq, H])")
                flat = (_flatten("topk_ids", topk_ids, lead, K), _flatten("topk_weights", topk_weights, lead, K),
                        _flatten("router_logits", router_logits, lead, E))
            except Exception as error:
                bad_input = error
            if bad_input is not None:
                raise_bad_input(self.dispatcher, bad_input)
            y = self.forward(x.reshape(-1, x.shape[-1]), flat[0], flat[1], router_logits=flat[2],
                             correction_bias=correction_bias)
            return y.view(*lead, y.shape[-1])
        bad_input = None
        try:
            x = self._checked_tokens(x)
            topk = self.route(x, topk_ids, topk_weights, router_logits, correction_bias)
        except Exception as error:
            bad_input = error
        if bad_input is not None:  # (raised outside the handler: see raise_bad_input)
            raise_bad_input(self.dispatcher, bad_input)
        try:
            if self.shared_experts is None:
                return self._routed(x, topk)
            routed, shared = self._routed_and_shared(x, topk, self.shared_experts)
            return routed + shared
        except ValueError as err:
            if router_logits is not None:  # the weights the dispatcher found non-finite came from these
                name_non_finite_logits(router_logits, self.topk_config, err)
            raise

    def _routed(self, x: torch.Tensor, topk: TopKOutput) -> torch.Tensor:
        """The routed experts on checked tokens (_checked_tokens): dispatch (the pairs counted in
        expert_load), the experts, combine: [T, H]."""
        dispatch_output, physical = self._dispatch(x, topk)
        self._count_load(dispatch_output, physical)
        return self.experts_and_combine(dispatch_output)

    def _checked_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """x as forward and routed_and_shared compute it (cast under torch.autocast), checked against the
        layer before anything runs: [T, H], the layer's dtype (self.dtype: for fp8 experts the activations'
        dtype, not the weights') and device; fp8 experts still fp8 (a step needing a gradient: _dispatch)."""
        transform = None if torch.compiler.is_compiling() else torch._C._functorch.peek_interpreter_stack()
        if transform is not None:  # (it failed in the load counter's add_, or the exchange's requires_grad_)
            raise RuntimeError(f"this layer runs inside a torch.func transform ({str(transform.key()).rpartition('.')[2]}"
                               f": torch.func.grad, vjp, vmap, jacrev, jacfwd, hessian), which it does not support: "
                               f"its exchange, autograd functions and load counters take no functorch tensors. Take "
                               f"gradients with autograd instead (loss.backward(), torch.autograd.grad); "
                               f"torch.func.functional_call outside a transform works")
        if self.w13.is_meta:  # (nothing could be read: the first value check failed inside torch)
            raise RuntimeError("this layer's experts are on the meta device (built with device='meta' or under "
                               "`with torch.device('meta'):`), so they have no values to compute with; materialise "
                               "them first: layer.to_empty(device=...), then layer.load_experts(...)")
        # (a meta expert beside real ones gave numbers from uninitialised memory, no error.) Read from the module's
        # dicts, not getattr: 3 -> 0.7 us a call, and a torch.nn.utils.parametrize property is not run twice a
        # forward (its originals live in self.parametrizations; functional_call and prune put plain attributes)
        params, attributes = self._parameters, self.__dict__
        meta = [name for name in _EXPERT_TENSORS
                if (t := params[name] if name in params else attributes.get(name)) is not None and t.is_meta]
        if meta:
            raise RuntimeError(f"this layer's {', '.join(meta)} {'is' if len(meta) == 1 else 'are'} on the meta device "
                               f"while w13 holds values (a meta tensor put in place: load_state_dict(..., assign=True) "
                               f"of a state_dict without it, or torch.func.functional_call), so there are no values "
                               f"to compute with; give them values: load_state_dict({{...}}, assign=True) with them, "
                               f"or layer.to_empty(device=...) then layer.load_experts(...)")
        if self.quant is not None and (self.w13.dtype, self.w2.dtype) != (self.quant.dtype, self.quant.dtype):
            raise RuntimeError(f"this layer's experts are {self.quant.format} but w13/w2 now have dtype "
                               f"{self.w13.dtype}/{self.w2.dtype} (tensors of another dtype were put in their place); "
                               f"load the experts again with load_experts(...)")
        x = self._autocast_tokens(x)
        check_hidden_states(x, self.config.hidden_size, self.dtype, self.w13.device)
        return x

    def _autocast_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """x in the layer's dtype under torch.autocast (as it is otherwise): there an op takes inputs of
        any float dtype (a Linear's bf16, a LayerNorm's float32) and picks its own compute dtype; the
        tokens travel and compute in the layer's dtype (autocast still runs the runner's GEMMs in its
        own), and the output comes back in it."""
        # (autocast has no meta device: asking raises; such an x is named by the device check after this)
        if (isinstance(x, torch.Tensor) and x.is_floating_point() and not x.is_meta
                and torch.is_autocast_enabled(x.device.type)):
            return x.to(self.dtype)
        return x

    def _dispatch(self, x: torch.Tensor, topk: TopKOutput, async_op: bool = False):
        """(dispatch's result, the physical ids sent): the router's logical ids mapped to physical
        ones, and an error about ids naming this rank's logical id. fp8 (quantized experts or an fp8
        dispatch) refuses a step that needs a gradient here, before any exchange, whatever the runner."""
        # (topk's form is the dispatcher's to check and name: a malformed one reaches it)
        weights = topk[1] if isinstance(topk, (tuple, list)) and len(topk) == 2 and isinstance(topk[1], torch.Tensor) else None
        bad_input = None
        try:  # (on one rank only: the others' dispatch fails at once too, see forward)
            fp8 = self.quant is not None or getattr(self.dispatcher, "fp8", None) is not None
            if fp8 and needs_grad(x, weights, self.w13, self.w2, self.b13, self.b2):
                fp8 = (f"this layer's experts are {self.quant.format} ({self.quant.dtype})" if self.quant is not None
                       else "this layer's dispatcher has use_fp8=True (from dispatcher_options, or "
                            "EP_RUNTIME_DISPATCH_FP8=1 where they leave it None)")
                raise RuntimeError(f"{fp8} and x, topk_weights (router_logits) or the experts need a gradient: "
                                   f"{INFERENCE_ONLY}")
            physical = self._to_physical(x, topk)
        except Exception as error:
            bad_input = error
        if bad_input is not None:
            raise_bad_input(self.dispatcher, bad_input)
        if self.dispatcher._moves_rows() and not needs_grad(x) and needs_grad(self.w13, self.w2, self.b13, self.b2):
            # This rank's experts compute rows that other ranks' tokens sent: their gradient comes back through
            # each rank's combine, which runs a reverse exchange only where the rows need a gradient. A rank whose
            # experts are frozen (and whose x and weights need none) would skip the exchanges this rank's backward
            # waits in. x needing a gradient rides in the dispatch's count table, so every rank's rows need one.
            x = grad_leaf(x)
        try:  # (a plain try on this per-call path: a context manager costs ~2.6 us a call; the dispatcher raises
            # ep.PeerFailure for a peer that does not answer)
            return self.dispatcher.dispatch(x, physical, async_op=async_op), physical
        except ValueError as err:
            self._name_logical_ids(topk, physical, err)
            raise

    def experts_and_combine(self, dispatch_output) -> torch.Tensor:
        """The routed experts on a (waited) dispatch output, then combine: [T, H]."""
        return self.dispatcher.combine(self.runner.run(dispatch_output, self.weights))

    def synchronize(self) -> None:
        """Wait, at most EP_RUNTIME_TIMEOUT_S, until the work queued on the current CUDA stream has
        finished: what to call instead of torch.cuda.synchronize() after replaying a CUDA graph that
        holds this layer (nothing on the host runs inside a replay, so this is where a stalled or
        dead peer is noticed). Raises ep.PeerFailure, with the group aborted, when a peer does not
        answer; see Dispatcher.synchronize."""
        self.dispatcher.synchronize()

    def _to_physical(self, x: torch.Tensor, topk: TopKOutput) -> TopKOutput:
        """The router's logical ids as the dispatcher's physical ids (the same object without copies)."""
        if not self.placement.maps_ids:
            return topk
        ids, weights = topk
        check_topk(ids, weights, x.shape[0], self.config.num_experts, self.config.top_k, x.device, values=False)
        return TopKOutput(self.placement.to_physical(ids), weights)

    @contextmanager
    def _naming_logical_ids(self, topk: TopKOutput, physical: TopKOutput):
        """Around a dispatch of `physical` (the ids `topk` mapped to physical ones), or an async
        dispatch's wait(): an error about its ids names this rank's logical ids instead."""
        try:
            yield
        except ValueError as err:
            self._name_logical_ids(topk, physical, err)
            raise

    def _name_logical_ids(self, topk: TopKOutput, physical: TopKOutput, err: ValueError) -> None:
        """A dispatcher error about the ids of `physical` (`topk`'s mapped to physical ids, or `topk` itself
        without copies) names physical ids: name this rank's logical id instead."""
        if physical is topk or "topk_ids" not in str(err):
            return
        check_topk_values(topk[0], topk[1], self.config.num_experts)
        P = self.placement.num_physical_experts
        raise ValueError(f"{err} [this layer has {P - self.config.num_experts} redundant experts: the exchange "
                         f"sees physical ids -1..{P - 1}, topk_ids are logical, -1..{self.config.num_experts - 1}]"
                         ) from None

    def _count_load(self, dispatch_output, topk: TopKOutput) -> None:
        """Add this step's pairs per physical expert to the load counter: the dispatch layout's
        per-expert counts when the format has one (no extra kernel), else one scatter-add of the ids.
        A forward run again inside backward (activation checkpointing's recompute; FSDP tells backward
        apart the same way) adds nothing: its pairs were counted when the step ran it (_add_load)."""
        sent = _SENT_PER_EXPERT.get(dispatch_output.format)
        counts = sent(dispatch_output) if sent is not None else None
        if counts is None:
            ids = topk[0].reshape(-1).long()
            P = self.placement.num_physical_experts
            valid = (ids >= 0) & (ids < P)
            counts = torch.zeros(P + 1, dtype=torch.int64, device=ids.device).scatter_add_(
                0, torch.where(valid, ids, P), torch.ones_like(ids))[:P]
        (_ADD_LOAD_OP if torch.compiler.is_compiling() else _add_load)(self._load_physical, counts)

    def expert_load(self, reset: bool = False) -> torch.Tensor:
        """[E] int64 on the layer's device: (token, expert) pairs this rank sent to each logical
        expert since the last reset (pairs with id -1 are not counted; a token listing an expert twice
        counts twice). Summed over ranks (dist.all_reduce) it is the global load ep.eplb.plan takes.
        No host sync: the counts are added on the device at every forward (once: activation
        checkpointing's recompute in backward adds nothing). reset (True or False): zero the counts once read."""
        if not isinstance(reset, bool):  # ("yes" or a tensor read as true reset the counts without a word)
            raise TypeError(f"reset={reset!r}; allowed: True or False")
        logical = self.placement.logical_of(torch.arange(self.placement.num_physical_experts,
                                                         device=self._load_physical.device))
        load = self._load_logical.clone().index_add_(0, logical, self._load_physical)
        if reset:
            self._load_physical.zero_()
            self._load_logical.zero_()
        return load

    def rebalance(self, num_nodes: Optional[int] = None, optimizer: Optional[torch.optim.Optimizer] = None,
                  reset: bool = True, dp_group: Optional[Any] = None):
        """Plan a placement from the global load since the last reset (one all_reduce) and apply it;
        every rank calls it together, between steps. Returns the ep.eplb.Plan. num_nodes: as
        ep.eplb.plan's (balance per node first), on the nodes the ranks are really on where the group
        spans num_nodes nodes (whichever ranks each holds: ep.eplb.on_nodes), else on consecutive
        ranks; optimizer: as apply_placement's; reset: restart the load counts
        (expert_load(reset=True)) once the plan is applied, the default (a refused plan keeps them).
        dp_group: where the layer's group is one of several data-parallel replicas that
        hold the same experts (a dp x ep DeviceMesh), the group of this rank's replicas (mesh["dp"] or
        mesh["dp"].get_group()); the load is summed over it too (one more all_reduce), so every replica
        applies the same plan. Without it each replica plans from its own tokens, and replicas that saw different
        data hold different experts in the same slots (their gradients then average different experts).
        The arguments are checked first and shared in one small all_gather, so a refused one on one rank, or a
        num_nodes or dp_group size that differs between ranks, fails every rank there, naming the rank(s)."""
        from . import eplb
        error = dp_size = None
        try:  # every argument before the first collective: a rank that fails tells the others below
            _check_optimizer(optimizer, optional=True)
            self._refuse_parametrized("rebalance")
            eplb.check_num_nodes(num_nodes, self.placement.ep_size, self.config.num_experts,
                                 self.placement.num_physical_experts)
            if not isinstance(reset, bool):
                raise TypeError(f"reset={reset!r}; allowed: True or False")
            if dp_group is not None:
                dp_group = as_process_group(dp_group, "dp_group", "dp")
                dp_size = dist.get_world_size(dp_group)
        except Exception as err:  # noqa: BLE001 - whatever stops this rank stops every rank (raised below)
            error = err
        sharded = self.dispatcher.shards_experts and self.placement.ep_size > 1
        if sharded:  # one all_gather: num_nodes or dp_group on one rank only would pair different collectives
            agree_before_collectives(self.dispatcher.group, self.placement.ep_size, error,
                                     "rebalance: every rank stops before its first collective", self.w13.device,
                                     num_nodes=num_nodes if error is None else None,
                                     **{"dp_group size": dp_size})
        elif error is not None:
            raise error
        load = self.expert_load()
        if sharded:
            in_call_order(self.dispatcher.group, lambda: dist.all_reduce(load, group=self.dispatcher.group))
        if dp_group is not None:
            dist.all_reduce(load, group=dp_group)
        if not bool(load.any()):  # (the plan reads the load on the host anyway) same on every rank: summed
            warnings.warn("rebalance: no load was counted since the last reset (no forward ran, or expert_load(reset="
                          "True) was called before rebalance: read it with expert_load() instead, rebalance resets "
                          "it), so the plan places the experts as if every one were equally loaded", stacklevel=2)
        plan = eplb.plan(load, self.placement.ep_size, self.placement.num_physical_experts, num_nodes=num_nodes)
        if plan.num_ranks > 1 and num_nodes is not None and num_nodes > 1:
            plan = self._on_real_nodes(plan, num_nodes, load.device)
        self.apply_placement(plan, optimizer=optimizer)
        if reset:  # once applied: a refused plan (a bad num_nodes) keeps the counts
            self.expert_load(reset=True)
        return plan

    def _on_real_nodes(self, plan, num_nodes: int, device: torch.device):
        """rebalance's plan for num_nodes nodes of consecutive ranks, on the nodes the group's ranks are
        really on where those are num_nodes nodes (the node-aware exchange's layout: the dispatcher's
        ranks_per_node, else the launcher's node index or the host name; one small all_gather the first
        time); a group on another number of nodes (one host pretending) keeps consecutive ranks."""
        from . import eplb
        from .dispatchers.hierarchical import resolve_nodes
        d = self.dispatcher
        exchange = getattr(d, "exchange", None)  # (a registered dispatcher of one's own may have none)
        nodes = in_call_order(d.group, lambda: exchange.node_layout(device) if exchange is not None else
                              resolve_nodes(d.group, d.world_size, 0, device))
        if nodes.num_nodes != num_nodes:
            return plan
        sizes = [len(nodes.ranks_on(b)) for b in range(nodes.num_nodes)]
        if len(set(sizes)) > 1:
            raise ValueError(f"num_nodes={num_nodes}: this layer's group has {sizes} ranks on its nodes (node of "
                             f"each rank: {list(nodes.node_of)}); allowed: None (balancing per node needs the same "
                             f"number of ranks on every node)")
        return eplb.on_nodes(plan, nodes.node_of)

    @torch.no_grad()
    def apply_placement(self, plan, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Switch to `plan` (an ep.eplb.Plan or an ExpertPlacement with the layer's E, R and P), between
        steps, on every rank together. Only experts that a rank does not already hold travel (one
        exchange per weight tensor); the rest are copied in place, bit for bit. Parameters keep their
        identity, and their .grad moves with them. optimizer: its per-parameter state tensors shaped
        like a weight (Adam's moments, momentum buffers) move the same way; without it such state
        stays where it was and no longer matches its expert, so the next optimizer.step() holding it raises
        until remap_optimizer_state(optimizer) moves it (or the state is dropped). One small
        all_gather first shares every rank's argument check and plan: a refused argument on one rank, a
        different plan, or .grad / optimizer state on some ranks only fails every rank, naming the rank(s)."""
        error = new = None
        try:  # checked before any collective; a rank that fails tells the others in the agreement below
            _check_optimizer(optimizer, optional=True)
            self._refuse_parametrized("apply_placement")
            new = self._check_plan(plan)
            if optimizer is not None:  # its state left in older slots by a move without it: moved on, lost for good
                _refuse_stale_state(optimizer, (), {}, "apply_placement(optimizer=...)")
        except Exception as err:  # noqa: BLE001 - whatever stops this rank stops every rank (raised below)
            error = err
        params = [t for t in (getattr(self, name) for name in _EXPERT_TENSORS) if t is not None]
        if self.dispatcher.shards_experts and self.placement.ep_size > 1:
            # One all_gather: a bad argument on one rank, another plan, or another set of tensors to move (a
            # .grad or optimizer state on some ranks only: one exchange per tensor) fails every rank here,
            # naming the rank, instead of leaving the others in the moves' exchanges until the timeout
            moves = None if new is None else _ExpertMoves(self.placement, new)
            agree_before_collectives(
                self.dispatcher.group, self.placement.ep_size, error,
                "apply_placement: every rank stops before moving its slots", self.w13.device,
                plan=None if new is None else _placement_tables(new),
                **{"expert dtype": _expert_dtypes(self)},  # (the moves send raw bytes, as gather_experts' gathers)
                **{"set of .grad and optimizer state tensors to move": None if moves is None or not moves.num_exchanged
                   else [[kind for kind, _ in _slot_tensors(param, optimizer)] for param in params]})
        elif error is not None:
            raise error
        if optimizer is None and self.quant is None and _placement_tables(new) != _placement_tables(self.placement):
            _mark_state_stale(self.placement, params)  # any optimizer's state of these now sits in the old slots
        self._move_slots(new, params, optimizer)
        self._adopt_placement(new)

    def remap_optimizer_state(self, optimizer: torch.optim.Optimizer, from_placement=None) -> None:
        """Move `optimizer`'s state tensors laid out by the slots (Adam's moments, momentum buffers, Adafactor's)
        from the slots of `from_placement` (an ep.eplb.Plan or ep.ExpertPlacement; None: the placement before
        the first apply_placement / rebalance made without optimizer=, or the current one if there was none)
        to the slots of the current placement, so each expert's state follows its expert; every rank together
        (one exchange per tensor where experts crossed ranks). After an apply_placement / rebalance without
        optimizer=, optimizer.step() raises until this is called (or the state is dropped); give
        from_placement=layer.placement for state already laid out in the current placement (loaded since)."""
        error = old = None
        params = [t for t in (getattr(self, name) for name in _EXPERT_TENSORS) if t is not None]
        try:
            _check_optimizer(optimizer, optional=False)
            old = self._check_plan(from_placement) if from_placement is not None else _STALE.get(self.w13, self.placement)
        except Exception as err:  # noqa: BLE001 - whatever stops this rank stops every rank (raised below)
            error = err
        if self.dispatcher.shards_experts and self.placement.ep_size > 1:
            agree_before_collectives(
                self.dispatcher.group, self.placement.ep_size, error,
                "remap_optimizer_state: every rank stops before moving the optimizer's state", self.w13.device,
                **{"placement to remap from": None if old is None else _placement_tables(old),
                   "set of optimizer state tensors to move": None if error is not None else
                   [[kind for kind, _ in _slot_tensors(param, optimizer, weights=False)] for param in params]})
        elif error is not None:
            raise error
        if _placement_tables(old) != _placement_tables(self.placement):
            moves = _ExpertMoves(old, self.placement)
            with torch.no_grad():
                for param in params:
                    for _, t in _slot_tensors(param, optimizer, weights=False):
                        raw = t.view(torch.uint8) if t.dtype in FP8_DTYPES else t
                        raw.copy_(moves.apply(raw, self.dispatcher.group))
        for param in (getattr(self, name) for name in _EXPERT_TENSORS):
            if param is not None:
                _STALE.pop(param, None)

    @torch.no_grad()
    def _move_slots(self, new: ExpertPlacement, params: list, optimizer: Optional[torch.optim.Optimizer] = None
                    ) -> None:
        """Lay `params` (each with its .grad and the optimizer's state tensors laid out like it) out by `new`
        instead of the current placement; every rank together (one exchange per tensor, none when no
        expert crosses ranks)."""
        moves = _ExpertMoves(self.placement, new)
        for param in params:
            for _, t in _slot_tensors(param, optimizer):
                raw = t.view(torch.uint8) if t.dtype in FP8_DTYPES else t  # fp8 travels as bytes
                raw.copy_(moves.apply(raw, self.dispatcher.group))

    def _adopt_placement(self, new: ExpertPlacement) -> None:
        """Run on `new` from now on (the weights already sit in its slots)."""
        load = self.expert_load()  # kept per logical expert: the physical counts refer to the old slots
        self._use_placement(new)
        self._set_load_counters(load)
        self.runner = MoeRunner(self.runner.backend, self.dispatcher.config, self.dispatcher.placement)

    def _check_plan(self, plan) -> ExpertPlacement:
        """The plan as this rank's placement, checked against the layer before any collective. Its sizes come
        first: a plan of another size failed the table checks on a consequence instead (a Plan with too many
        slots as "no slot for expert 3", an ExpertPlacement of fewer ranks as "rank=2" on the ranks it lacks)."""
        current = self.placement
        if isinstance(plan, ExpertPlacement):
            sizes = plan.num_experts, plan.ep_size, plan.num_physical_experts
        elif hasattr(plan, "placement") and callable(plan.placement):
            table = getattr(plan, "physical_to_logical", None)
            sizes = (getattr(plan, "num_experts", None), getattr(plan, "num_ranks", None),
                     len(table) if isinstance(table, Sized) and getattr(table, "ndim", 1) > 0 else None)
        else:
            raise TypeError(f"plan must be an ep.eplb.Plan or an ep.ExpertPlacement; got {type(plan).__name__}")
        for name, have, want in zip(("num_experts", "ep_size (num_ranks)", "num_physical_experts"), sizes,
                                    (current.num_experts, current.ep_size, current.num_physical_experts)):
            if have is not None and have != want and name.startswith("ep_size"):
                raise ValueError(f"plan is for num_ranks={have!r}; this layer's placement has ep_size={want} "
                                 f"(allowed: {want})")
            if have is not None and have != want:
                raise ValueError(f"plan has {name}={have!r}; this layer has {want} (allowed: {want}; the weights' "
                                 f"shapes are fixed)")
        new = (plan if isinstance(plan, ExpertPlacement) else plan.placement(0)).at_rank(current.rank)
        # One spelling per placement (expert_to_rank None or its contiguous table, say): the ranks compare
        # them, and each decides from it whether to rebuild its dispatcher (a collective)
        return _canonical_placement(new.num_experts, new.ep_size, new.rank, *_placement_tables(new))

    @torch.no_grad()
    def reduce_replica_grads(self) -> None:
        """Training with redundant experts: make every copy's gradient the sum over all copies of its
        expert (one all_reduce per weight tensor, over the replicated experts only), so copies that
        start equal stay equal under any optimizer. Call it after backward, before optimizer.step(),
        on every rank; with gradient accumulation once per step, after the last micro-batch's backward (it
        sums the gradients accumulated so far: a call per micro-batch would add the earlier ones again).
        Nothing to do without copies."""
        replicated = [e for e in range(self.config.num_experts) if len(self.placement.replicas_of(e)) > 1]
        if not replicated or self.quant is not None:  # (quantized experts are inference-only: no gradients)
            return
        try:
            self._refuse_parametrized("reduce_replica_grads")
            refused = None
        except RuntimeError as error:  # raised after joining the all_reduces (adding zeros): no other rank waits
            refused = error  # in them (an agreement first would cost an object gather per training step)
        row = {e: i for i, e in enumerate(replicated)}
        local = self.placement.local_expert_ids().tolist()
        slots = [(j, row[e]) for j, e in enumerate(local) if e in row and refused is None]
        for param in (self.w13, self.w2, self.b13, self.b2):
            if param is None:
                continue
            # Every rank joins each all_reduce: a rank whose experts are frozen (no .grad; experts trained on some
            # ranks only) adds zeros and keeps no gradient. Skipping it left the others in the all_reduce.
            grad = param.grad
            total = param.new_zeros((len(replicated),) + tuple(param.shape[1:]))
            if slots and grad is not None:
                mine = torch.tensor([j for j, _ in slots], device=grad.device)
                where = torch.tensor([i for _, i in slots], device=grad.device)
                total.index_add_(0, where, grad[mine])
            if self.dispatcher.shards_experts and self.placement.ep_size > 1:
                in_call_order(self.dispatcher.group, lambda: dist.all_reduce(total, group=self.dispatcher.group))
            if slots and grad is not None:
                grad[mine] = total[where]
        if refused is not None:
            raise refused

    def routed_and_shared(self, x: torch.Tensor, topk: TopKOutput, shared_experts: Optional[nn.Module] = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """(routed experts' output, shared(x)), both [T, H], shared = shared_experts or the layer's own;
        on CUDA the shared experts run while the dispatch is in flight, on a side stream forked before the dispatch is issued (so they also
        overlap a host-planned dispatch's count read) and joined before this returns."""
        shared_module = shared_experts if shared_experts is not None else self.shared_experts
        bad_input = None
        try:  # (on one rank only: the others' dispatch fails at once too, see forward)
            if shared_module is None:  # before the dispatch: an error after it would leave the exchange pending
                raise ValueError("shared_experts=None and this layer has none (built without shared_experts); pass "
                                 "a module [T, H] -> [T, H], or call the layer itself for the routed experts alone")
            x = self._checked_tokens(x)
        except Exception as error:
            bad_input = error
        if bad_input is not None:
            raise_bad_input(self.dispatcher, bad_input)
        return self._routed_and_shared(x, topk, shared_module)

    def _routed_and_shared(self, x: torch.Tensor, topk: TopKOutput, shared_module: nn.Module
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """routed_and_shared on checked tokens (_checked_tokens)."""
        started = self._start_shared(shared_module, [x])
        (dispatch_output, work), physical = self._dispatch(x, topk, async_op=True)
        with self._naming_logical_ids(topk, physical), naming_peer_failures(self.dispatcher, "dispatch"):
            work.wait()  # (CPU ranks: the count table's errors are raised here)
        self._count_load(dispatch_output, physical)
        routed = self.experts_and_combine(dispatch_output)
        return routed, self._finish_shared(started, [routed])[0]

    def _start_shared(self, shared_module: nn.Module, xs: list) -> tuple:
        """shared_module on each checked x of xs, before any of their dispatches is issued: on CUDA on the
        layer's side stream (forked from the caller's: they run beside the exchanges, a host-planned dispatch's
        count read included), on CPU ranks right away (run while the exchange thread moved rows, a collective of
        theirs on the layer's group, an FSDP2-sharded shared expert's all-gather, paired with the exchange's in
        another order on each rank: gloo aborted the process, or the ranks hung). Hand the result to
        _finish_shared."""
        side = caller = None
        if xs and xs[0].is_cuda:
            caller = torch.cuda.current_stream(xs[0].device)
            side = self._side_streams.setdefault(xs[0].device, torch.cuda.Stream(xs[0].device))
            side.wait_stream(caller)
            with torch.cuda.stream(side):
                shared = [shared_module(x) for x in xs]
            for x in xs:
                x.record_stream(side)
        else:
            shared = [shared_module(x) for x in xs]
        return shared, side, caller, [tuple(x.shape) for x in xs]

    @staticmethod
    def _finish_shared(started: tuple, routed: list) -> list:
        """_start_shared's outputs, joined to the caller's stream and checked against the routed outputs'
        shapes; call it once the exchanges are complete on every rank, so a module of the wrong shape fails
        each rank alike."""
        shared, side, caller, shapes = started
        if side is not None:
            caller.wait_stream(side)
            for t in shared:
                if isinstance(t, torch.Tensor):
                    t.record_stream(caller)
        for out, y, shape in zip(shared, routed, shapes):
            if not isinstance(out, torch.Tensor) or out.shape != y.shape:
                got = f"shape {list(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"shared_experts returned {got} for x of shape {list(shape)}; allowed: a tensor of "
                                 f"x's shape (a module mapping [T, H] to [T, H]; another shape would broadcast "
                                 f"against the routed experts' output)")
        return shared

    def route(self, x, topk_ids, topk_weights, router_logits, correction_bias) -> TopKOutput:
        if router_logits is not None:
            if topk_ids is not None or topk_weights is not None:
                raise ValueError("give either topk_ids/topk_weights or router_logits, not both")
            check_float_tensor("router_logits", router_logits, x.device)
            if router_logits.dim() != 2 or tuple(router_logits.shape) != (x.shape[0], self.config.num_experts):
                raise ValueError(f"router_logits has shape {list(router_logits.shape)}; expected "
                                 f"[{x.shape[0]}, {self.config.num_experts}] (T, num_experts)")
            return select_experts(router_logits, self.topk_config, correction_bias)
        if isinstance(topk_ids, tuple):  # (one of two items: forward unpacked it)
            raise TypeError(f"topk_ids is a {type(topk_ids).__name__} of {len(topk_ids)} items; allowed: the ids "
                            f"tensor [T, K] with topk_weights [T, K] as the next argument, or an ep.TopKOutput "
                            f"(ids, weights) alone")
        if topk_ids is None or topk_weights is None:
            raise ValueError("forward needs topk_ids and topk_weights, or router_logits")
        if correction_bias is not None:
            raise ValueError("correction_bias is given with topk_ids / topk_weights; it shifts the choice the layer "
                             "makes from router_logits, so pass router_logits instead (or leave it out)")
        return TopKOutput(topk_ids, topk_weights)  # checked by the dispatcher before any exchange

    def extra_repr(self) -> str:
        c = self.config
        transport = getattr(self.dispatcher, "transport_options", None)
        moved_by = "" if transport is None else ", " + describe_transport(self.dispatcher.group, transport.transport,
                                                                     self.dispatcher.puts_rows, self.w13.device)
        copies = self.placement.num_redundant_experts
        return (f"E={c.num_experts}, K={c.top_k}, H={c.hidden_size}, I={c.intermediate_size}, "
                f"L={self.placement.num_local_experts}{f', redundant={copies}' if copies else ''}, "
                f"dispatcher={self.dispatcher.name}, runner={self.runner.backend.name}{moved_by}"
                + (", shared_experts" if self.shared_experts is not None else ""))


def _options(name: str, options: Optional[Mapping]) -> dict:
    """A copy of EPMoE's `dispatcher_options` / `runner_options` (None: none), refused naming the argument when
    it is no mapping (dict() of a list or a string failed with "dictionary update sequence element #0 ...")."""
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(f"{name}={options!r}; allowed: None or a dict of option names to values")
    return dict(options or {})


def _check_activation_group(quant: QuantConfig, rows: Optional[QuantConfig], dispatcher: str) -> None:
    """Quantized experts take an fp8 dispatch's rows (format `rows`) only with its channels per scale."""
    if rows is not None and quant.activation_group != rows.activation_group:
        raise ValueError(f"experts quantized with activation_group={quant.activation_group} (weight_block="
                         f"{list(quant.weight_block)}) cannot take the rows of dispatcher {dispatcher!r} "
                         f"with use_fp8=True (one scale per {rows.activation_group} channels); allowed: "
                         f"activation_group={rows.activation_group}, or use_fp8=False")


def _fp8_rows(dispatcher: str, options: dict) -> Optional[QuantConfig]:
    """The rows' format that dispatcher `dispatcher` built with `options` will send (its `fp8`), read before it
    is built: a quant_config refused on one rank then joins the settings check its construction ends with, so
    the other ranks fail there naming it (refused after it, they went on to wait in the first collective)."""
    from .dispatchers import fp8_payload
    from .registry import named_options
    if "use_fp8" not in named_options(dispatchers.get(dispatcher), ("config", "group")):
        return None
    use, encoding = fp8_payload.resolve(options.get("use_fp8"), options.get("fp8_scale_encoding"))
    return QuantConfig(scale_encoding=encoding) if use else None


def _slot_tensors(param: torch.Tensor, optimizer: Optional[torch.optim.Optimizer], weights: bool = True) -> list:
    """[(what, tensor)] laid out by the slots like `param`: its data, its .grad (weights=False: not those), the
    optimizer's state tensors with one row per slot, each dim after it param's or 1 (Adam's moments, a momentum
    buffer, Adafactor's factored row_var [L, 2I, 1] and col_var [L, 1, H]: those stayed in their old slots, no error),
    in the order they move."""
    states = optimizer.state.get(param, {}) if optimizer is not None else {}
    own = [("data", param.data), ("grad", param.grad)] if weights else []
    return [(what, t) for what, t in own + list(states.items()) if isinstance(t, torch.Tensor) and _per_slot(t, param)]


def _per_slot(t: torch.Tensor, param: torch.Tensor) -> bool:
    """t holds one row per slot of param: param's rank and dim 0, each later dim param's or 1."""
    return (t.dim() == param.dim() and t.shape[0] == param.shape[0]
            and all(n in (1, m) for n, m in zip(t.shape[1:], param.shape[1:])))


# Expert parameters moved to other slots by apply_placement / rebalance without optimizer= (param -> the placement
# an optimizer's state of it made before is laid out in), until that state is remapped or found dropped. A hook on
# every optimizer.step() refuses state still laid out in the old slots.
_STALE: "WeakIdKeyDictionary" = WeakIdKeyDictionary()  # (by identity: tensors compare elementwise)
_STEP_HOOK: list = []


def _mark_state_stale(old: ExpertPlacement, params: list) -> None:
    for param in params:
        _STALE.setdefault(param, old)  # (moved twice without an optimizer: its state is still in the first slots)
    if not _STEP_HOOK:
        _STEP_HOOK.append(register_optimizer_step_pre_hook(_refuse_stale_state))


def _check_optimizer(optimizer, optional: bool) -> None:
    """rebalance's, apply_placement's (optional: None allowed) and remap_optimizer_state's optimizer argument."""
    if optimizer is None and optional:
        return
    if not isinstance(getattr(optimizer, "state", None), Mapping):
        raise TypeError(f"optimizer={type(optimizer).__name__}; allowed: {'None or ' if optional else ''}the optimizer "
                        f"of this layer's parameters (a torch.optim.Optimizer: its per-parameter .state moves with the "
                        f"slots)")


def _refuse_stale_state(optimizer, args, kwargs, where: str = "") -> None:
    """optimizer.step() pre-hook (and apply_placement's check of its optimizer): state of an expert parameter laid
    out in the slots before a move made without this optimizer would update other experts' weights (Adam's
    moments of expert a applied to expert b) or, moved again, be lost for good."""
    if not _STALE:
        return
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param not in _STALE:
                continue
            kinds = [kind for kind, _ in _slot_tensors(param, optimizer, weights=False)]
            if not kinds:  # no state (dropped, or a new optimizer): what it makes now is laid out in the new slots
                del _STALE[param]
                continue
            raise RuntimeError(f"{where or type(optimizer).__name__ + '.step()'}: the optimizer's state "
                               f"{', '.join(kinds)} of an EPMoE expert parameter of shape {list(param.shape)} is "
                               f"laid out in the expert slots before apply_placement / rebalance moved the experts "
                               f"without optimizer=, so it would update other experts' weights. Call "
                               f"layer.remap_optimizer_state(optimizer) on every rank (next time pass optimizer= to "
                               f"apply_placement / rebalance), or drop that state (optimizer.state.pop(param)) to "
                               f"restart it")


def _expert_dtypes(layer: "EPMoE") -> str:
    """The dtypes of the layer's expert tensors ("w13 torch.float32, w2 torch.float32"): what every rank must have
    alike where they exchange the experts' bytes (gather_experts, apply_placement)."""
    return ", ".join(f"{name} {t.dtype}" for name in _EXPERT_TENSORS if (t := getattr(layer, name)) is not None)


def _first_copies(rows: torch.Tensor, first: list[int]) -> torch.Tensor:
    """rows[first] (a copy): each expert's first copy among the slots' rows; fp8 indexed as bytes."""
    raw = rows.view(torch.uint8) if rows.dtype in FP8_DTYPES else rows
    return raw[torch.tensor(first, device=rows.device)].view(rows.dtype)


def _flatten(name: str, t: Optional[torch.Tensor], lead: tuple, last: int) -> Optional[torch.Tensor]:
    """[*lead, last] -> [prod(lead), last]. Given flat already ([prod(lead), last]: a Hugging Face router's logits
    come so, computed on the flattened tokens) it is taken as it is; any other shape is an error."""
    if not isinstance(t, torch.Tensor):
        return t
    flat = (math.prod(lead), last)
    if tuple(t.shape) not in (lead + (last,), flat):
        raise ValueError(f"{name} has shape {list(t.shape)}; expected {list(lead) + [last]} (x's leading dims, "
                         f"then {'num_experts' if name == 'router_logits' else 'top_k'}) or {list(flat)} (flattened)")
    return t.reshape(-1, last)


# Formats whose dispatch output already holds this rank's pairs per (physical) expert: the layout the
# exchange computed, [P] int32 on the device. Other formats count with one scatter-add.
_SENT_PER_EXPERT = {
    "standard": lambda out: out.num_tokens_per_expert,  # None where no flag kernel ran
    "deepep_normal": lambda out: out.handle.layout.num_tokens_per_expert,
    "mori": lambda out: out.handle.layout.num_tokens_per_expert,
    "deepep_ll": lambda out: out.handle.exchange.layout.num_tokens_per_expert,
}


_META_LAYER = "this layer's experts are on the meta device (no memory to load into); layer.to_empty(device=...) first"
PLACEMENT_KEY = "expert_placement"
_EXPERT_TENSORS = ("w13", "w2", "b13", "b2", "w13_scale_inv", "w2_scale_inv")  # laid out by the placement's slots
# The running backward's graph task (-1 outside backward): a private torch call FSDP uses too; without it
# (another torch) a checkpointed forward's recompute counts its pairs again.
_GRAPH_TASK_ID = getattr(torch._C, "_current_graph_task_id", None)


def _add_load(counter: torch.Tensor, counts: torch.Tensor) -> None:
    """counter += counts, except in a forward run again inside backward (activation checkpointing's recompute):
    its pairs were counted when the step ran it."""
    if _GRAPH_TASK_ID is None or _GRAPH_TASK_ID() == -1:
        counter.add_(counts)


# _add_load as a custom op, which torch.compile keeps in the graph as it is: the recompute check then runs each time
# the compiled code runs. Traced, the check ran once, while tracing, so a compiled layer called inside activation
# checkpointing (checkpoint around the compiled block) counted its pairs again in the recompute.
_ADD_LOAD_OP = torch.library.custom_op("ep_runtime::add_load", mutates_args=("counter",))(_add_load)


def _placement_tables(placement: ExpertPlacement) -> tuple:
    """(owner rank of each physical slot, logical expert of each slot): the placement as every rank sees it."""
    return placement._owners(), placement._logical()


def _default_placement(placement: ExpertPlacement) -> ExpertPlacement:
    """What a state_dict without PLACEMENT_KEY is in: E + N slots contiguous over the ranks, slot p holding
    expert p % E (a layer built without expert_to_rank, before any rebalance), whatever layer loads it."""
    return ExpertPlacement.with_redundant_experts(placement.num_experts, placement.num_redundant_experts,
                                                  placement.ep_size, placement.rank)


def _canonical_placement(num_experts: int, ep_size: int, rank: int, owners: Sequence[int], logical: Sequence[int]
                         ) -> ExpertPlacement:
    """The placement with these tables (each slot's rank, its logical expert), spelled one way: None for a
    contiguous expert_to_rank and for slot e holding expert e."""
    P = len(owners)
    return ExpertPlacement(num_experts, ep_size, rank, None if tuple(owners) == ExpertPlacement(P, ep_size)._owners()
                           else owners, None if tuple(logical) == tuple(range(P)) else logical)


def _save_placement(layer: "EPMoE", state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict post-hook: a layer off the default placement (rebalanced, or built with expert_to_rank)
    adds PLACEMENT_KEY, int64 [2, P] (row 0: each physical slot's rank, row 1: its logical expert; the same
    on every rank), so the slots' weights can be loaded back into the placement they were saved in."""
    if _placement_tables(layer.placement) != _placement_tables(_default_placement(layer.placement)):
        state_dict[prefix + PLACEMENT_KEY] = torch.tensor(_placement_tables(layer.placement), dtype=torch.int64)


def _load_format(layer: "EPMoE", state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                 missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    """load_state_dict pre-hook: the experts load in the format `state_dict` holds them in, as
    load_experts takes them: fp8 w13/w2 with their scales switch an unquantized layer to fp8 (a layer
    quantized on load saves them so), and float w13/w2 without their scales into an fp8 layer are quantized
    with its config, each on its own (torch's copy would cast them, or the fp8 values, as numbers under other
    scales; a float w2 beside an fp8 w13 with its scales was cast with scale 1).
    An expert matrix the state_dict does not hold (strict=False) keeps its values, quantized. Expert weights
    that are not finite (in the layer's dtype: a float64 value may overflow float32; fp8: NaN) and scales that
    are not finite and > 0 are refused before the layer changes, naming the key, as load_experts refuses them;
    where the load then moves the layer to the state_dict's placement (collectives every rank runs), on every
    rank, naming the rank whose values they are."""
    saved = None
    try:
        # first: a table from another EP size explains the shapes (_join_load_errors reads it; no second pass)
        saved = _placement_to_move_to(layer, state_dict, prefix)
        _check_expert_shapes(layer, state_dict, prefix)
        for name in ("w13", "w2"):  # (e5m2 was cast as numbers, no error; e4m3fnuz's finite check raised torch's own)
            check_expert_dtype(f"state_dict[{prefix + name!r}]", state_dict.get(prefix + name))
        _check_finite_experts(layer, state_dict, prefix)
        for name in ("w13_scale_inv", "w2_scale_inv"):
            if isinstance(state_dict.get(prefix + name), torch.Tensor):
                check_scale_values(f"state_dict[{prefix + name!r}]", state_dict[prefix + name])
        _check_fp8_scales_present(state_dict, prefix)
        switch = layer.quant is None and any(isinstance(state_dict.get(prefix + name), torch.Tensor)
                                             and is_quantized_dtype(state_dict[prefix + name].dtype)
                                             for name in ("w13", "w2"))
        if switch:
            layer._check_runner_quant(QuantConfig())  # (the layer switches to fp8 below)
        if saved is not None or switch:  # (a move or a switch of a parametrized tensor went into a copy of it)
            layer._refuse_parametrized("load_state_dict")
        error = None
    except (TypeError, ValueError, RuntimeError) as err:
        error = err
    _join_load_errors(layer, state_dict, prefix, error, saved)
    fp8 = [name for name in ("w13", "w2") if isinstance(state_dict.get(prefix + name), torch.Tensor)
           and is_quantized_dtype(state_dict[prefix + name].dtype)]
    if layer.quant is None and fp8 and all(prefix + name + "_scale_inv" in state_dict for name in fp8):
        kept = {name: getattr(layer, name).detach() for name in ("w13", "w2")
                if prefix + name not in state_dict and not layer.w13.is_meta}
        layer._store_quantized(QuantConfig(), layer.w13.device)
        for name, values in kept.items():
            q, scale_inv = layer.quant.quantize_weight(values)
            _copy_values(getattr(layer, name), q)
            getattr(layer, name + "_scale_inv").copy_(scale_inv)
    if layer.quant is not None:  # each float matrix without its scales, also beside an fp8 one with them
        for name in ("w13", "w2"):
            t = state_dict.get(prefix + name)
            if (isinstance(t, torch.Tensor) and t.is_floating_point() and not is_quantized_dtype(t.dtype)
                    and prefix + name + "_scale_inv" not in state_dict
                    and not t.is_meta and t.shape == getattr(layer, name).shape):
                state_dict[prefix + name], state_dict[prefix + name + "_scale_inv"] = layer.quant.quantize_weight(t)


def _check_fp8_scales_present(state_dict: dict, prefix: str) -> None:
    """fp8 expert values and their block scales load together, as load_experts takes them: fp8 values without their
    scales (strict or not) were cast as numbers into a float layer, or left under an fp8 layer's old scales; float
    values beside scales were cast as numbers into an fp8 layer under those scales (a dequantized checkpoint that
    kept its scale keys: every weight off by its scale), or into a float layer with the scales dropped (strict=False);
    scales without their values went under the layer's old values. All silently."""
    for name in ("w13", "w2"):
        key, scale_key = prefix + name, prefix + name + "_scale_inv"
        t, has_scale = state_dict.get(key), scale_key in state_dict
        fp8 = isinstance(t, torch.Tensor) and is_quantized_dtype(t.dtype)
        if fp8 and not has_scale:
            raise ValueError(f"state_dict[{key!r}] holds {t.dtype} values but no {scale_key}: fp8 experts load with "
                             f"their block scales; allowed: both keys, or {name} in a float dtype (an fp8 layer "
                             f"quantizes it)")
        if has_scale and not fp8:
            held = f"holds {t.dtype} values" if isinstance(t, torch.Tensor) else "has no values"
            raise ValueError(f"state_dict[{scale_key!r}] is given but state_dict[{key!r}] {held}: block scales load "
                             f"with the {', '.join(map(str, FP8_DTYPES))} values they scale; allowed: both keys with "
                             f"{name} fp8, or {name} in a float dtype without {scale_key} (an fp8 layer quantizes it)")


def _check_expert_shapes(layer: "EPMoE", state_dict: dict, prefix: str) -> None:
    """Raise naming the key when an expert tensor of `state_dict` is not a floating tensor of this rank's shape
    (torch's own check raised on that rank alone, after the others had loaded, and cast integer weights silently);
    a DTensor (ep.distributed_state_dict's, global shape) is refused naming load_distributed_state_dict, which makes
    it local first."""
    L, E, R = layer.placement.num_local_experts, layer.config.num_experts, layer.placement.ep_size
    for name in _EXPERT_TENSORS:
        key, held = prefix + name, getattr(layer, name)
        if key not in state_dict:
            continue
        t = state_dict[key]
        if name.endswith("_scale_inv") and held is None:  # a float layer that fp8 weights with scales switch to fp8
            weight = state_dict.get(prefix + name[:-len("_scale_inv")])
            if not (isinstance(weight, torch.Tensor) and is_quantized_dtype(weight.dtype)):
                continue  # (no fp8 weight beside it: torch names the unexpected key)
            held = torch.empty(QuantConfig().weight_scale_shape(L, *getattr(layer, name[:-len("_scale_inv")]).shape[1:]),
                               device="meta")
        if held is None:
            continue  # (no biases here: torch names the unexpected keys)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state_dict[{key!r}] has type {type(t).__name__}; expected a floating torch.Tensor of "
                            f"shape {list(held.shape)}")
        if type(held).__name__ == "DTensor":  # experts FSDP2 sharded further: torch checks its DTensors
            continue
        if type(t).__name__ == "DTensor":  # ep.distributed_state_dict's rows of every rank, [P, ...]
            raise ValueError(f"state_dict[{key!r}] is a DTensor of shape {list(t.shape)} (the rows of every rank, as "
                             f"ep.distributed_state_dict gives them); allowed here: this rank's {list(held.shape)}. "
                             f"Load a distributed state with ep.load_distributed_state_dict(model, state)")
        if not t.is_floating_point():
            raise TypeError(f"state_dict[{key!r}] has dtype {t.dtype}; expected a floating dtype (this layer stores "
                            f"{name} as {held.dtype})")
        if tuple(t.shape) != tuple(held.shape):
            hint = ""
            if t.dim() == held.dim() and tuple(t.shape[1:]) == tuple(held.shape[1:]):
                hint = (f" (this rank's {L} expert slots: num_experts={E} + num_redundant_experts="
                        f"{layer.placement.num_physical_experts - E} over ep_size={R}; a per-rank state_dict loads at "
                        f"the num_experts and EP size it was saved at; to change the EP size, gather_experts() then "
                        f"load_experts())")
            raise ValueError(f"state_dict[{key!r}] has shape {list(t.shape)}; expected {list(held.shape)}" + (hint or (
                f" (num_experts={E}, hidden_size={layer.config.hidden_size}, intermediate_size="
                f"{layer.config.intermediate_size}, {L} expert slots on this rank)")))
        if name.endswith("_scale_inv"):  # fp32, as load_experts takes them (torch's copy rounded bf16 scales silently)
            check_scale_tensor(f"state_dict[{key!r}]", t, tuple(held.shape), values=False)


def _check_finite_experts(layer: "EPMoE", state_dict: dict, prefix: str) -> None:
    """Raise naming the key when an expert tensor of `state_dict` holds a NaN or an infinity as the layer would
    store it (_expert_values); a DTensor (still sharded over ranks: a check would be a collective) is left to
    whoever made it local."""
    for name in ("w13", "w2", "b13", "b2"):
        t, held = state_dict.get(prefix + name), getattr(layer, name)
        if not isinstance(t, torch.Tensor) or t.is_meta or type(t).__name__ == "DTensor" or not t.is_floating_point():
            continue
        # float values as a float layer stores them; into an fp8 layer (quantized as they are) and fp8 ones as given
        as_held = held is not None and not is_quantized_dtype(held.dtype) and not is_quantized_dtype(t.dtype)
        _expert_values(f"state_dict[{prefix + name!r}]", t, held.dtype if as_held else t.dtype, t.device)


def _is_dtensor(t: Optional[torch.Tensor]) -> bool:
    return type(t).__name__ == "DTensor"


def _copy_values(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src) into an expert parameter (or a slice of one); fp8 (src of dst's dtype) as raw bytes.
    A DTensor dst (a "standard" layer's experts, which FSDP2's fully_shard shards like any replicated weight)
    takes this rank's piece of the whole `src` every rank holds, with no communication (a plain copy_ raised
    "got mixed torch.Tensor and DTensor")."""
    if _is_dtensor(dst):
        from torch.distributed.tensor import distribute_tensor
        src = distribute_tensor(src.to(dst.device), dst.device_mesh, dst.placements, src_data_rank=None)
    if dst.dtype in FP8_DTYPES:
        dst.view(torch.uint8).copy_(src.view(torch.uint8))
    else:
        dst.copy_(src)


def _expert_values(name: str, t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An expert tensor being loaded (by load_experts, load_expert or load_state_dict) as the layer stores it, in
    `dtype` on `device`, refused naming `name` when it holds a NaN or an infinity: it would load silently and make
    every token routed to that expert NaN, on whichever rank sent it. Floats are checked after the cast (a float64
    value past float32's range is inf in a float32 layer); fp8 (no infinities, no isfinite) by its NaN patterns,
    before any cast. One pass per tensor per load, none per forward; meta tensors pass."""
    if is_quantized_dtype(t.dtype):
        _check_fp8_not_nan(name, t)
        return t.to(device=device, dtype=dtype)
    t = t.to(device=device, dtype=dtype)
    check_finite(name, t)
    return t


def _load_placement(layer: "EPMoE", state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                    missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    """load_state_dict pre-hook: the weights in `state_dict` sit in the placement it names (none named: the
    default one, whatever placement the loading layer was built with); the layer takes that placement (every
    rank loads together when it differs), so a checkpoint saved after a rebalance computes the same experts
    in a fresh layer, and a fresh checkpoint loaded into a rebalanced layer (or one built with
    expert_to_rank) does too."""
    saved = _placement_to_move_to(layer, state_dict, prefix)
    state_dict.pop(prefix + PLACEMENT_KEY, None)
    if saved is not None:
        # what this state_dict does not hold (strict=False: biases, say) keeps its experts: it moves to their slots
        held = [name for name in _EXPERT_TENSORS if getattr(layer, name) is not None]
        layer._move_slots(saved, [getattr(layer, name) for name in held if prefix + name not in state_dict])
        layer._adopt_placement(saved)


def _placement_to_move_to(layer: "EPMoE", state_dict: dict, prefix: str) -> Optional[ExpertPlacement]:
    """The placement `state_dict`'s expert weights sit in (the default one where it names none) where it is not the
    layer's, else None (no expert weights there, or the layer's own placement: the layer stays)."""
    table = state_dict.get(prefix + PLACEMENT_KEY)
    held = [name for name in _EXPERT_TENSORS if getattr(layer, name) is not None]
    if not any(prefix + name in state_dict for name in held):
        return None
    current = layer.placement
    saved = _default_placement(current)
    if table is not None:
        P = current.num_physical_experts
        if not isinstance(table, torch.Tensor) or tuple(table.shape) != (2, P):
            shape = list(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
            raise ValueError(f"state_dict[{prefix + PLACEMENT_KEY!r}] has shape {shape}; expected [2, {P}] (each "
                             f"physical slot's rank and logical expert)")
        owners, logical = (tuple(int(v) for v in row) for row in table.tolist())
        try:
            saved = _canonical_placement(current.num_experts, current.ep_size, current.rank, owners, logical)
        except ValueError as err:  # e.g. saved at another EP size: the slots' ranks do not fit this group
            raise ValueError(f"state_dict[{prefix + PLACEMENT_KEY!r}] places the {P} slots on ranks {min(owners)}.."
                             f"{max(owners)}; this layer has ep_size={current.ep_size}, num_experts="
                             f"{current.num_experts} ({err}). A per-rank state_dict loads at the EP size it was "
                             f"saved at; to change it, gather_experts() then load_experts()") from None
    return saved if _placement_tables(saved) != _placement_tables(current) else None


def _join_load_errors(layer: "EPMoE", state_dict: dict, prefix: str, error: Optional[Exception],
                      saved: Optional[ExpertPlacement]) -> None:
    """Raise `error` (this rank's bad values in `state_dict`, a placement table this layer cannot take, or None).
    saved: _placement_to_move_to's result where it raised nothing.
    Where the experts are sharded over ranks and `state_dict` holds some (each rank loads its own, together), every
    rank first shares its errors in one all_gather, so a bad value or table on one rank fails every rank, naming
    that rank: else the others went on, into the collectives of a move to the state_dict's placement (waiting there
    until the timeout), or into their next forward with the bad rank's experts left unloaded. The placement each
    rank's state_dict puts its experts in, and (where the load moves the slots) which expert tensors it holds,
    must be the same on every rank too:
    they decide whether the load moves the slots and how many tensors it exchanges (another placement on one rank
    paired that rank's next collective with the others' move)."""
    held = [name for name in _EXPERT_TENSORS if getattr(layer, name) is not None]
    if not layer.dispatcher.shards_experts or layer.placement.ep_size == 1 or not any(
            prefix + name in state_dict for name in held):
        if error is not None:
            raise error
        return
    same = {} if error is not None else {
        f"placement (state_dict[{prefix + PLACEMENT_KEY!r}], the default one where absent)":
            _placement_tables(saved if saved is not None else layer.placement),
        # (only a move exchanges the tensors the state_dict does not hold: strict=False loads may differ otherwise)
        "set of expert tensors in the state_dict": None if saved is None else [name for name in held
                                                                             if prefix + name in state_dict]}
    agree_before_collectives(layer.dispatcher.group, layer.placement.ep_size, error,
                             "each rank's state_dict; every rank stops before loading it", layer.w13.device, **same)


def _follow_assigned_weights(layer: "EPMoE", incompatible_keys) -> None:
    """load_state_dict post-hook: with assign=True the layer takes the state_dict's tensors (a layer built on
    the meta device gets real ones); the load counters and the runner follow them, as after to_empty()."""
    if layer._load_physical.device != layer.w13.device:
        layer._follow_weights()


def _initial_placement(dispatcher: str, num_experts: int, group, expert_to_rank, num_redundant_experts
                       ) -> ExpertPlacement:
    """The layer's starting placement: this rank's view of E experts (plus N copies) over the group,
    or over one rank for dispatchers where every rank holds every expert."""
    from .dispatchers.base import group_rank_and_size, refuse_placement_unless_sharded
    shards = dispatchers.get(dispatcher).shards_experts
    rank, size = group_rank_and_size(group) if shards else (0, 1)
    if num_redundant_experts != 0 and not shards:
        raise ValueError(f"num_redundant_experts={num_redundant_experts!r}; allowed: 0 with dispatcher="
                         f"{dispatcher!r} (every rank holds every expert: there is no load to spread)")
    refuse_placement_unless_sharded(dispatcher, shards, expert_to_rank)
    placement = ExpertPlacement.with_redundant_experts(num_experts, num_redundant_experts, size, rank)
    if expert_to_rank is not None:
        placement = ExpertPlacement(num_experts, size, rank, expert_to_rank, placement.physical_to_logical)
    return placement


class _ExpertMoves:
    """Where every slot of a new placement comes from: a slot of the same rank (copied in place) or
    one of another rank (exchanged). Every rank builds the same list from the two placements."""

    def __init__(self, old: ExpertPlacement, new: ExpertPlacement):
        me, R = new.rank, new.ep_size
        self.local_src, self.local_dst = [], []
        self.send: list[list[int]] = [[] for _ in range(R)]  # my old slots, per destination rank
        self.recv: list[list[int]] = [[] for _ in range(R)]  # my new slots, per source rank
        self.num_exchanged = 0  # experts crossing ranks, over all ranks (the same number everywhere)
        for dst in range(R):
            held = {e: j for j, e in enumerate(old.logical_experts_of_rank(dst))}
            for j, e in enumerate(new.logical_experts_of_rank(dst)):
                if e in held:
                    if dst == me:
                        self.local_src.append(held[e])
                        self.local_dst.append(j)
                    continue
                copies = old.replicas_of(e)
                src, src_slot = copies[dst % len(copies)]  # spread the sends over the old copies
                self.num_exchanged += 1
                if src == me:
                    self.send[dst].append(src_slot)
                if dst == me:
                    self.recv[src].append(j)

    def apply(self, t: torch.Tensor, group) -> torch.Tensor:
        """t [L, ...] laid out by the old placement -> a new tensor laid out by the new one."""
        from .dispatchers.transport import all_to_all
        out = torch.empty_like(t)
        if self.local_dst:
            out[torch.tensor(self.local_dst, device=t.device)] = t[torch.tensor(self.local_src, device=t.device)]
        R = len(self.send)
        if self.num_exchanged:
            # Every rank takes part even when it sends and receives nothing (the exchange is collective).
            send = [i for rows in self.send for i in rows]
            rows = t[torch.tensor(send, dtype=torch.long, device=t.device)]
            received = in_call_order(group, lambda: all_to_all(rows, [len(r) for r in self.recv],
                                                               [len(s) for s in self.send], group, R))
            dst = [j for rows in self.recv for j in rows]
            if dst:
                out[torch.tensor(dst, device=t.device)] = received
        return out


def _check_fp8_not_nan(name: str, q: torch.Tensor) -> None:
    """float8_e4m3fn has one NaN pattern per sign (0x7F / 0xFF) and no infinities."""
    if q.is_meta:
        return
    bad = (q.view(torch.uint8) & 0x7F) == 0x7F
    if bool(bad.any()):
        where = [int(i) for i in bad.nonzero()[0]]
        raise ValueError(f"{name} has NaN at {where}; allowed: finite fp8 values")
