"""What every runner backend is: a config, optional GEMM hooks, the input layouts it computes, and
run(input, weights) for any layout (its own natively, others through the runner core's conversion)."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, ClassVar, Optional, Sequence

import torch

from ep_runtime.config import ExpertWeights, MoeConfig
from ep_runtime.quant import QuantConfig
from ep_runtime.runner_core import DispatchOutput, RunnerInput, check_row_scales, convert, untraced
from ep_runtime.triton_launch import triton_interpreted
from ep_runtime.validation import check_expert_dtypes

# hook(inputs [P, in], outputs [P, out], expert_index [P]) -> replacement outputs or None.
# P counts computed (token, expert) pairs, grouped by expert; expert_index is the local weight index.
GemmHook = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Optional[torch.Tensor]]


@dataclass(frozen=True)
class GemmHooks:
    """Called after each grouped GEMM (LoRA adapters add their low-rank term here)."""

    after_gemm1: Optional[GemmHook] = None
    after_gemm2: Optional[GemmHook] = None

    def __post_init__(self) -> None:
        """Each hook is None or a callable taking (inputs, outputs, expert_index), refused here naming the field:
        a wrong one would otherwise fail inside the first forward, on a rank's runner, mid-exchange."""
        for field in fields(self):
            hook = getattr(self, field.name)
            if hook is None:
                continue
            allowed = "allowed: None or a callable hook(inputs [P, in], outputs [P, out], expert_index [P])"
            if not callable(hook):
                raise TypeError(f"hooks.{field.name}={hook!r} is not callable; {allowed}")
            try:
                signature = inspect.signature(hook)
            except (TypeError, ValueError):  # (a builtin without one: taken as it is)
                continue
            try:
                signature.bind(None, None, None)
            except TypeError:
                raise TypeError(f"hooks.{field.name}={hook!r} has the signature {signature}, which cannot take "
                                f"three positional arguments; {allowed}") from None


_NO_HOOKS = GemmHooks()  # (frozen: one shared instance; check_hooks runs per fused_experts call)


def check_hooks(hooks: Optional[GemmHooks]) -> GemmHooks:
    """`hooks` (a runner's argument) as a GemmHooks: None gives one without hooks; anything else is an error
    naming it (its hooks are checked when it is built)."""
    if hooks is None:
        return _NO_HOOKS
    if not isinstance(hooks, GemmHooks):
        raise TypeError(f"hooks={hooks!r}; allowed: None or an ep.runners.GemmHooks(after_gemm1=..., "
                        f"after_gemm2=...)")
    return hooks


def call_hook(name: str, hook: Optional[GemmHook], inputs: torch.Tensor, outputs: torch.Tensor,
              expert_index: torch.Tensor) -> torch.Tensor:
    """outputs after `hook` (hooks.<name>): its replacement, or outputs when it returns None. A replacement
    of another shape raises naming the hook (a kernel's row store would broadcast a [out] row silently)."""
    if hook is None:
        return outputs
    replaced = hook(inputs, outputs, expert_index)
    if replaced is None:
        return outputs
    if not isinstance(replaced, torch.Tensor):
        raise TypeError(f"hooks.{name} returned {type(replaced).__name__}; allowed: None or a tensor of the "
                        f"outputs' shape {list(outputs.shape)}")
    if replaced.shape != outputs.shape:
        raise ValueError(f"hooks.{name} returned a tensor of shape {list(replaced.shape)}; allowed: None or the "
                         f"outputs' shape {list(outputs.shape)} (one row per (token, expert) pair)")
    return replaced


def _check_weights_type(weights: Any) -> None:
    """A backend's `weights` argument is an ExpertWeights (a (w13, w2) tuple failed with an AttributeError naming
    neither)."""
    if not isinstance(weights, ExpertWeights):
        raise TypeError(f"weights is a {type(weights).__name__}; allowed: an ep.ExpertWeights(w13, w2, b13=None, "
                        f"b2=None)")


class RunnerBackend:
    """Subclasses set `name`, `layouts` (the input types compute() takes, preferred first: RunnerInput
    for token rows, ExpertMajorInput for [L, M*R, H] with masked_m) and implement compute()."""

    name: ClassVar[str] = ""
    layouts: ClassVar[tuple[type, ...]] = (RunnerInput,)
    # True: compute() takes a RunnerInput whose ids may still need its id_table (the kernels look them up)
    reads_id_table: ClassVar[bool] = False
    # the activation (and unquantized weight) dtypes compute() takes; None: every dtype a layer may have
    dtypes: ClassVar[Optional[tuple[torch.dtype, ...]]] = None

    def __init__(self, config: MoeConfig, hooks: Optional[GemmHooks] = None):
        self.config = config
        self.hooks = check_hooks(hooks)
        self.check_quant(None)  # (hooks a backend never takes: refused when it is built)

    @classmethod
    def is_available(cls) -> bool:
        return True

    @classmethod
    def check_dtype(cls, dtype: torch.dtype, name: str = "dtype") -> None:
        """Raise naming `name`, the dtype and the allowed ones when compute() cannot take `dtype`."""
        if cls.dtypes is not None and dtype not in cls.dtypes:
            raise ValueError(f"{name}={dtype}; runner={cls.name!r} computes in {', '.join(map(str, cls.dtypes))} "
                             f"(use runner='torch' for other dtypes)")

    @classmethod
    def unavailable_reason(cls) -> str:
        return ""

    @classmethod
    def refusal(cls, hooks: GemmHooks, quant: Optional[QuantConfig]) -> str:
        """Why this backend cannot compute with `hooks` and experts stored in `quant`'s format (None:
        unquantized); "" when it can. runner="auto" skips the backends that refuse, a named one raises it."""
        return ""

    def check_quant(self, quant: Optional[QuantConfig]) -> None:
        """Raise the refusal of experts stored in `quant`'s format with this backend's hooks, called when a
        layer is built with it or switches to it: before any exchange, not in the first forward after its
        dispatch."""
        reason = self.refusal(self.hooks, quant)
        if reason:
            raise ValueError(reason)

    def run(self, runner_input: Any, weights: ExpertWeights) -> torch.Tensor:
        """The result of `runner_input` in its own layout (see RunnerInput, ExpertMajorInput): computed
        natively when the backend declares that layout, else through the registered conversion.
        The input's shapes (its check(); quantized rows: check_row_scales) and `weights` against the input
        (check_weights) are checked first."""
        if isinstance(runner_input, DispatchOutput):  # (it has no check(): an AttributeError named neither)
            raise TypeError(f"runner {self.name!r}: run() takes the runner core's input (RunnerInput or "
                            f"ExpertMajorInput); got a {type(runner_input).__name__}, a dispatcher's output: run it "
                            f"with ep.MoeRunner(backend, config, dispatcher.placement).run(dispatch_output, weights), "
                            f"as layer.runner does")
        if not callable(getattr(runner_input, "check", None)):  # (a tensor, None: an AttributeError named neither)
            raise TypeError(f"runner {self.name!r}: run() takes the runner core's input (RunnerInput or "
                            f"ExpertMajorInput); got {type(runner_input).__name__}")
        runner_input.check(self.config.hidden_size)
        _check_weights_type(weights)  # (before check_row_scales reads weights.quant)
        check_row_scales(runner_input, weights.quant)
        # (before check_weights: tokens of a dtype it cannot compute would be told their weights must match them)
        self.check_dtype(runner_input.output_dtype, "x dtype")
        self.check_weights(weights, runner_input.num_local_experts, runner_input.output_dtype)
        return self.run_checked(runner_input, weights)

    def check_weights(self, weights: ExpertWeights, num_local_experts: int, dtype: torch.dtype) -> None:
        """Raise naming the tensor when `weights` cannot compute tokens of `dtype` over `num_local_experts`
        experts: shapes (and quantized dtypes and scales) against the config (ExpertWeights.check), and
        unquantized experts of another dtype than the tokens' (a mismatch would fail inside a matmul or a
        Triton kernel, naming neither)."""
        _check_weights_type(weights)
        weights.check(self.config, num_local_experts)
        check_expert_dtypes(weights, dtype, f"the tokens runner={self.name!r} got")

    def run_checked(self, runner_input: Any, weights: ExpertWeights) -> torch.Tensor:
        """run() for `weights` that check_weights has passed for this input (the runner core checks them
        once per call, naming this rank's shard)."""
        if isinstance(runner_input, self.layouts):
            return self.compute(self._routed(runner_input), weights)
        # (a RunnerInput converted to expert-major rows is grouped by its mapped ids: pairs_by_expert maps them)
        if (weights.quant is not None and self.config.apply_router_weight_on_input
                and isinstance(runner_input, RunnerInput) and runner_input.hidden_scale is None):
            # float rows into quantized experts: quantized first, so the conversion puts the router weight into
            # their fp32 scales, as the token-row runners apply it (weighted rows in x's dtype were rounded twice,
            # to bf16 and then to fp8: 2-4x the bf16 bound off the w8a8 reference)
            q, scale = weights.quant.quantize_activation(runner_input.hidden_states)
            runner_input = replace(runner_input, hidden_states=q, hidden_scale=scale,
                                   out_dtype=runner_input.output_dtype)
        converted, back = convert(runner_input, self.layouts[0], self.config)
        return back(self.compute(self._routed(converted), weights))

    def _routed(self, runner_input: Any) -> Any:
        """runner_input as compute() takes it: token rows' ids mapped, unless the kernels look them up."""
        if isinstance(runner_input, RunnerInput) and not self.reads_id_table:
            return runner_input.routed()
        return runner_input

    def compute(self, runner_input: Any, weights: ExpertWeights) -> torch.Tensor:
        """The result of an input in one of `layouts` (the backend's own kernels). A RunnerInput arrives
        with its ids mapped, unless the class sets reads_id_table (then id_table may be set: look the ids
        up, or call routed()). A subclass that overrides run_checked() must route the same way."""
        raise NotImplementedError(f"runner {self.name!r} declares layouts {self.layouts} but implements no compute()")


def recompute_backward(recompute: Callable[..., torch.Tensor], inputs: Sequence[Optional[torch.Tensor]],
                       needs_input_grad: Sequence[bool], grad_output: torch.Tensor,
                       into_every_leaf: bool = False) -> list[Optional[torch.Tensor]]:
    """Backward of an autograd Function whose forward ran kernels: recompute the forward with the torch
    runner's differentiable ops on detached inputs and back-propagate grad_output through it (activation
    checkpointing with a torch recompute). Returns one gradient per input (None where not needed).
    into_every_leaf: back-propagate into every leaf the recompute reaches, so parameters a hook owns
    (LoRA) accumulate .grad too, as reentrant activation checkpointing does."""
    # Grad mode is on here only under create_graph=True (double backward, a gradient penalty): then the
    # recompute runs on the inputs themselves, so the gradients keep their graph back to the inputs' history.
    double = torch.is_grad_enabled()
    if double and into_every_leaf:
        raise RuntimeError("double backward (create_graph=True) through GEMM hooks on a kernel runner is not "
                           "supported; use runner='torch' for it")
    leaves = [None if t is None else t if double and need else t.detach().requires_grad_(need)
              for t, need in zip(inputs, needs_input_grad)]
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    with torch.enable_grad():
        y = recompute(*leaves)
        if into_every_leaf:
            torch.autograd.backward(y, grad_output)
            return [t.grad if t is not None and t.requires_grad else None for t in leaves]
        grads = iter(torch.autograd.grad(y, wanted, grad_output, allow_unused=True, create_graph=double)
                     if wanted else ())
    return [next(grads) if t is not None and t.requires_grad else None for t in leaves]


_RUN_CHECKED = untraced(RunnerBackend.run_checked)


class TritonBackend(RunnerBackend):
    """A backend whose kernels are Triton: it runs on CUDA, or on CPU tensors under the interpreter.
    Subclasses set import_error to why their kernels did not import (None when they did)."""

    import_error: ClassVar[Optional[str]] = None

    def __init__(self, config: MoeConfig, hooks: Optional[GemmHooks] = None):
        super().__init__(config, hooks)
        if self.import_error is not None:
            raise RuntimeError(f"runner={self.name!r} cannot run here: {self.import_error}")

    def run_checked(self, runner_input: Any, weights: ExpertWeights) -> torch.Tensor:
        """As RunnerBackend.run_checked; torch.compile runs it as it is (untraced) rather than tracing into
        the kernels' launch code."""
        return _RUN_CHECKED(self, runner_input, weights)

    @classmethod
    def is_available(cls) -> bool:
        return cls.import_error is None and (torch.cuda.is_available() or triton_interpreted())

    @classmethod
    def unavailable_reason(cls) -> str:
        return cls.import_error or ("no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU through "
                                    "the interpreter)")
