"""What a bench run is asked to do (presets, Settings) and what it yields (Results)."""
from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass(frozen=True)
class Preset:
    """One model's MoE layer shape and the default sweep of tokens per rank."""

    name: str
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    tokens_gpu: tuple[int, ...] = (1, 8, 32, 128, 512, 2048, 4096)
    tokens_cpu: tuple[int, ...] = (1, 16)
    note: str = ""


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("tiny", 16, 4, 256, 128, tokens_gpu=(1, 16, 128, 1024), tokens_cpu=(8, 32, 128),
           note="small shapes for CPU and CI"),
    Preset("mixtral-8x7b", 8, 2, 4096, 14336, note="Mixtral 8x7B: E=8, K=2, H=4096, I=14336"),
    Preset("qwen3-moe-30b-a3b", 128, 8, 2048, 768, note="Qwen3-30B-A3B: E=128, K=8, H=2048, I=768"),
    Preset("deepseek-v3", 256, 8, 7168, 2048, note="DeepSeek-V3 routed experts: E=256, K=8, H=7168, I=2048"),
)}

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}

SUITES = ("dispatch", "runner", "eplb", "overlap")
DEFAULT_SUITES = ("dispatch", "runner")  # eplb and overlap on request: they build and time whole layers
# Dispatch formats the runner suite feeds the runners, each made by that dispatcher on one rank.
RUNNER_FORMATS = ("standard", "deepep_ll")


@dataclass
class Settings:
    """Everything one bench run needs; plain values so it pickles to spawned ranks."""

    preset: str
    tokens: list[int]
    hidden_sizes: list[int]
    num_experts: list[int]
    top_ks: list[int]
    intermediate_size: int
    dtype: str
    suites: list[str]
    dispatchers: Optional[list[str]]
    runners: Optional[list[str]]
    runner_ep_size: Optional[int]
    warmup: int
    repeats: int
    rotate: int
    cuda_graph: bool
    seed: int
    progress: bool
    runner_formats: list[str] = field(default_factory=lambda: list(RUNNER_FORMATS))
    command: str = "ep-runtime bench"
    routing: str = "uniform"  # "uniform" or "zipf:S": how tokens pick experts (dispatch and eplb suites)
    redundant_experts: Optional[int] = None  # eplb suite: copies N (None: E / 8, rounded to divide over R)
    # Also fp8, in the same run: fp8 block-scaled experts in the runner suite (beside `dtype`'s), fp8
    # dispatch (use_fp8=True) beside each dispatcher that has it.
    fp8: bool = False
    # With fp8: the triton runner's fp8 rows also under these values of EP_RUNTIME_TRITON_FP8_GEMM.
    triton_fp8_gemms: list[str] = field(default_factory=list)

    def cases(self) -> list[tuple[int, int, int]]:
        """(E, K, H) of every swept layer shape."""
        return list(itertools.product(self.num_experts, self.top_ks, self.hidden_sizes))

    def timing(self, device: torch.device, group=None) -> dict:
        """Keyword arguments of timing.measure for this run."""
        return dict(repeats=self.repeats, warmup=self.warmup, device=device, group=group)


@dataclass
class Results:
    meta: dict = field(default_factory=dict)
    dispatch: list[dict] = field(default_factory=list)
    runner: list[dict] = field(default_factory=list)
    roofline: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    eplb: list[dict] = field(default_factory=list)
    overlap: list[dict] = field(default_factory=list)

    def merge(self, other: "Results") -> None:
        self.dispatch += other.dispatch
        self.eplb += other.eplb
        self.overlap += other.overlap
        self.runner += other.runner
        self.roofline += other.roofline
        self.skipped += other.skipped


class Progress:
    """tqdm on rank 0 when asked for and installed; otherwise silent."""

    def __init__(self, total: int, enabled: bool, desc: str):
        self.bar = None
        if enabled and total:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total, desc=desc, unit="bench", leave=False, file=sys.stderr)

    def step(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def reason(err: BaseException) -> str:
    """One line for the skipped table: the error's type and first line."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def int_at_least(minimum: int, most: Optional[int] = None):
    """argparse type: an int >= minimum (and <= most, when given), else an error naming the value and the range (a
    value outside it failed deep inside a layer or divided by zero, naming something other than the flag)."""
    allowed = f"allowed an int >= {minimum}" + (f" and <= {most}" if most is not None else "")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: {allowed}") from None
        if value < minimum or (most is not None and value > most):
            raise argparse.ArgumentTypeError(f"{value}: {allowed}")
        return value
    return parse
