"""The one registry of environment variables. Nothing else in ep_runtime reads os.environ.

Three kinds of entries:
- knobs (EP_RUNTIME_*): typed settings with a default and a one-line doc; an invalid value
  raises an error that names the variable, the value and what is allowed.
- launcher variables (RANK, SLURM_PROCID, OMPI_COMM_WORLD_RANK, ...): set by torchrun, Slurm
  or mpirun; read here so the bootstrap can detect the launcher.
- torch's NCCL variables (TORCH_NCCL_*): init_distributed gives them defaults on NCCL (see
  ep_runtime.distributed.nccl_watchdog_settings) unless the user set them; set and read only here.
"""
from __future__ import annotations

import math
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from .registry import did_you_mean

PREFIX = "EP_RUNTIME_"
# The most tokens or rows a size knob or dispatcher option may name: the count table carries them as int32
# (larger values failed deep inside torch: "Overflow when unpacking long long", "int too big to convert").
MAX_TOKENS = 2 ** 31 - 1
MAX_LOCAL_RANKS = 1 << 20  # the most ranks of one host: `ep-runtime demo`'s --world-size and its knob, RANKS_PER_NODE


@dataclass(frozen=True)
class Knob:
    name: str
    type: type
    default: Any
    doc: str
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    choices: Optional[tuple] = None
    # Values from a registry: returns the allowed values, called when a value is checked (not at import,
    # so the registry's modules may import this one); `allowed` describes them for the docs.
    choices_from: Optional[Callable[[], tuple]] = None
    allowed: str = ""
    # Must be equal on every rank (buffer sizes, payload format, transport, node layout): init_distributed compares
    # them, as ranks with different values would pair different collectives and wait until the timeout.
    same_on_every_rank: bool = False

    def parse(self, raw: str) -> Any:
        """Turn the raw string into a typed value, or raise naming the variable. Spaces around it do not count;
        booleans and named choices are read in any case (EP_RUNTIME_HIERARCHICAL=OFF was refused where a boolean's
        OFF was read), a choice as the registry spells it."""
        text = raw.strip()
        try:
            if self.type is bool:
                low = text.lower()
                if low not in ("0", "1", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError
                value: Any = low in ("1", "true", "yes", "on")
            else:
                if not text.isascii():  # (Python's int() and float() read other scripts' digits: '٣' was 3)
                    raise ValueError
                value = self.type(text)
                if self.type is float and not math.isfinite(value):
                    raise ValueError
        except ValueError:
            raise ValueError(
                f"environment variable {self.name}={raw!r} is not a valid {self.type.__name__}"
                f"{self._allowed()}"
            ) from None
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"environment variable {self.name}={raw!r} is below the minimum{self._allowed()}")
        if self.maximum is not None and value > self.maximum:
            raise ValueError(f"environment variable {self.name}={raw!r} is above the maximum{self._allowed()}")
        choices = self.choices if self.choices_from is None else self.choices_from()
        if choices is not None and self.type is str:
            value = next((choice for choice in choices if choice.lower() == value.lower()), value)
        if choices is not None and value not in choices:
            raise ValueError(f"environment variable {self.name}={raw!r} is not allowed; allowed: "
                             f"{', '.join(map(str, choices))}")
        return value

    def _allowed(self) -> str:
        if self.type is bool:
            return "; allowed: 0, 1, true, false, yes, no, on, off"
        if self.allowed:
            return f"; allowed: {self.allowed}"
        if self.choices is not None:
            return f"; allowed: {', '.join(map(str, self.choices))}"
        if self.minimum is not None:
            number = str if self.type is int else "{:g}".format
            most = f" and <= {number(self.maximum)}" if self.maximum is not None else ""
            return f"; allowed: {self.type.__name__} >= {number(self.minimum)}{most}"
        return ""


KNOBS: dict[str, Knob] = {}


def _knob(name: str, type_: type, default: Any, doc: str, **kw: Any) -> None:
    full = PREFIX + name
    KNOBS[full] = Knob(full, type_, default, doc, **kw)


_knob("TIMEOUT_S", float, 300.0,
      "Seconds a collective may wait for the other ranks before every rank fails with an error.",
      minimum=1.0, maximum=1e9)  # finite: a job must never wait forever
_knob("TRANSPORT", str, "auto",
      "How exchanges move rows on GPUs: auto (the fastest measured here: NVLink for deepep_ll where the GPUs map "
      "each other's memory, NCCL otherwise), nccl, or nvlink (stores into peers' symmetric memory; an error "
      "where GPUs cannot map each other's).",
      choices=("auto", "nccl", "nvlink"), same_on_every_rank=True)
_knob("NUM_SMS", int, 0,
      "SMs the NVLink transport copies rows with: 0 (default) none, the GPU's copy engines move them "
      "(cudaMemcpyAsync into the peer's memory); N > 0: a Triton copy kernel of N programs (at most the GPU's SMs).",
      minimum=0, maximum=1024)
_knob("HIERARCHICAL", str, "auto",
      "Node-aware exchange for host-plan dispatches (deepep_normal without num_worst_tokens, mori not static): a "
      "token crosses the network once per destination node, then fans out inside it. auto: when the group spans several nodes and a node holds "
      "several ranks; on: whenever the group spans several nodes (one node: flat, the same exchange in one stage); "
      "off (flat: once per destination rank).", choices=("auto", "on", "off"), same_on_every_rank=True)
_knob("RANKS_PER_NODE", int, 0,
      "Node of each rank for the node-aware exchange: > 0 puts group ranks [0, n) on node 0, [n, 2n) on node 1, "
      "... (e.g. to test 4 CPU ranks as 2 nodes); 0 takes it from the launcher (GROUP_RANK, SLURM_NODEID) or "
      "the host name.", minimum=0, maximum=MAX_LOCAL_RANKS, same_on_every_rank=True)
_knob("NCCL_DUMP_ON_TIMEOUT", bool, False,
      "On NCCL: keep torch's flight-recorder dump (TORCH_NCCL_DUMP_ON_TIMEOUT, and a dump written before a group "
      "that timed out is aborted). Off: no dump and a short watchdog grace, so nothing delays the error.")
_knob("LL_MAX_DISPATCH_TOKENS_PER_RANK", int, 128,
      "deepep_ll: M, the most tokens one rank may dispatch in one call (static buffer size).", minimum=1,
      maximum=MAX_TOKENS, same_on_every_rank=True)
_knob("NORMAL_ALIGNMENT", int, 1,
      "deepep_normal: round num_recv_tokens_per_expert up to a multiple of this.", minimum=1,
      maximum=MAX_TOKENS, same_on_every_rank=True)
_knob("MORI_NUM_MAX_DISPATCH_TOKENS_PER_RANK", int, 4096,
      "mori: most tokens one rank may dispatch; the receive buffer holds this many times R rows.", minimum=1,
      maximum=MAX_TOKENS, same_on_every_rank=True)
_knob("MORI_PREALLOC_MAX_RECV_TOKENS", int, 0,
      "mori: receive-buffer rows when > 0 (overrides max dispatch tokens x R); 0 = off.", minimum=0,
      maximum=MAX_TOKENS, same_on_every_rank=True)
_knob("MORI_MOE_MAX_INPUT_TOKENS", int, 0,
      "mori: hand the runner only this many receive rows, never truncating data (an eager dispatch widens it to the "
      "rows received; a static plan raises on every rank when a rank received more); 0 = off.",
      minimum=0, maximum=MAX_TOKENS, same_on_every_rank=True)
_knob("SYNC_CHECKS", bool, False,
      "Static-shape exchanges on CUDA (deepep_ll, deepep_normal num_worst_tokens, mori static) read the count "
      "table on the host every call, so bad ids/weights or a too-small buffer fail before the payload moves, "
      "and standard dispatch reads its id/weight flags (one host wait per call). Off: they are copied without "
      "a sync and checked two calls later.")
_knob("DISPATCH_FP8", bool, False,
      "deepep_normal, deepep_ll, mori: send tokens as fp8 (e4m3, one scale per token and 128 channels) "
      "when the dispatcher's use_fp8 argument is None; combine stays in the tokens' dtype. Inference only.",
      same_on_every_rank=True)
_knob("DISPATCH_FP8_SCALE_ENCODING", str, "fp32",
      "fp8 dispatch scales: fp32 (amax / 448) or ue8m0 (powers of two, one exponent byte each on the wire), "
      "when the dispatcher's fp8_scale_encoding argument is None.", choices=("fp32", "ue8m0"),
      same_on_every_rank=True)


def _runner_names() -> tuple:
    from ep_runtime import runners  # the registry imports this module; read it only when checking a value
    return ("auto", *runners.registered())


_knob("RUNNER", str, "auto",
      "Runner backend that EPMoE(runner='auto') uses: auto (the fastest for the dispatcher's layout), "
      "or a registered runner (torch, triton, masked, ...).",
      choices_from=_runner_names, allowed="auto or a registered runner (ep_runtime.runners.registered())")
_knob("TRITON_GEMM_KERNEL", str, "auto",
      "runner='triton': the grouped GEMM kernel when no block_config is passed: auto (the one the device's tuned "
      "table names per shape and token count; portable where none is tuned), portable (one program per tile), "
      "persistent (one program per SM looping over tiles), tma (persistent, weight tiles by TMA; Hopper or "
      "newer, an error elsewhere) or tma_stacked (tma with GEMM 1's gate and up tiles in one box and one dot).",
      choices=("auto", "portable", "persistent", "tma", "tma_stacked"))
_knob("TRITON_GEMM_SCHEDULE", str, "auto",
      "runner='triton', persistent and TMA grouped GEMM kernels, when no block_config is passed: how programs "
      "share the work items: auto (as the device's tuned table says per shape and token count; static where "
      "none is tuned), static (a fixed share each) or dynamic (each takes the next item from a counter as it "
      "frees up: no program waits for a late one, e.g. while an overlapped exchange's kernel holds some SMs "
      "at the GEMM's launch; set it when overlapping exchanges with prefill GEMMs).",
      choices=("auto", "static", "dynamic"))
_knob("TRITON_FP8_GEMM", str, "auto",
      "runner='triton' with fp8 block-scaled experts: the grouped GEMMs of its w8a8 step: auto (gluon where it can "
      "run, for bf16 results, at least 256 (token, expert) pairs per local expert as the host knows them (prefill "
      "sizes, where it was faster on an H200; not on mori's or static deepep_normal's padded receive buffers, "
      "whose real size only the device knows) and nothing chosen for triton's kernels (no block_config, "
      "EP_RUNTIME_TRITON_GEMM_KERNEL and _SCHEDULE auto); else triton), triton (the kernels of "
      "EP_RUNTIME_TRITON_GEMM_KERNEL, activation and fp8 output fused into GEMM 1) or gluon (Gluon kernels that "
      "overlap each K step's scaling with the next tensor-core step: Hopper (compute capability 9.0) only, no "
      "biases, no apply_router_weight_on_input, 128 x 128 weight blocks, contiguous weights, hidden and intermediate "
      "sizes multiples of 128; GEMM 1's rows are gathered in expert order (more scratch memory), its epilogue "
      "activates and quantizes as triton's does; GEMM 2's output is bf16 whatever x's dtype; a block_config given "
      "is not used; forced, an error where it cannot run).",
      choices=("auto", "triton", "gluon"))
_knob("SCRATCH_MB", int, 256,
      "MiB of scratch buffers kept between calls (runner='triton' and 'masked': pair alignment, intermediate "
      "rows, K-split partial sums; the exchanges' send payloads and partial sums; never an output), per shape, stream and thread, so "
      "an eager call of a shape seen before allocates only its output; the least recently used shapes beyond it "
      "are freed. 0: allocate every call.", minimum=0)
_knob("DEMO_WORLD_SIZE", int, 2, "`ep-runtime demo`: local CPU ranks to spawn when no launcher is detected.",
      minimum=1, maximum=MAX_LOCAL_RANKS)


def get(name: str) -> Any:
    """Typed value of knob `name` (with or without the EP_RUNTIME_ prefix)."""
    full = name if name.startswith(PREFIX) else PREFIX + name
    if full not in KNOBS:
        raise KeyError(f"unknown knob {full}; known: {', '.join(sorted(KNOBS))}")
    knob = KNOBS[full]
    raw = os.environ.get(full)
    if _unset(raw):
        return knob.default
    return knob.parse(raw)


def values_on_every_rank() -> dict[str, Any]:
    """The knobs that must be equal on every rank, by name: each one's value (its raw text where it is invalid,
    which init_distributed reports on its own), for init_distributed's one all_gather to compare."""
    values = {}
    for name, knob in KNOBS.items():
        if knob.same_on_every_rank:
            try:
                values[name] = get(name)  # (the default where unset)
            except ValueError:
                values[name] = os.environ[name]
    return values


def _unset(raw: Optional[str]) -> bool:
    """Whether a knob's raw value means "not set": absent, empty or only spaces (`EP_RUNTIME_X=` in a script, or
    `EP_RUNTIME_X=" "`, which was refused as "not a valid int" while the empty string read as the default)."""
    return raw is None or not raw.strip()


def is_set(name: str) -> bool:
    """Whether knob `name` (with or without the EP_RUNTIME_ prefix) has a value in the environment (an empty
    or blank one counts as unset, as get reads it): callers that pick their own value when the user chose none."""
    full = name if name.startswith(PREFIX) else PREFIX + name
    if full not in KNOBS:
        raise KeyError(f"unknown knob {full}; known: {', '.join(sorted(KNOBS))}")
    return not _unset(os.environ.get(full))


@contextmanager
def overridden(name: str, value: Any) -> Iterator[None]:
    """Knob `name` set to `value` (checked as the knob parses it) inside the block, restored after: how the bench
    times one path under each value of a knob read at every call (e.g. TRITON_FP8_GEMM)."""
    full = name if name.startswith(PREFIX) else PREFIX + name
    if full not in KNOBS:
        raise KeyError(f"unknown knob {full}; known: {', '.join(sorted(KNOBS))}")
    KNOBS[full].parse(str(value))
    before = os.environ.get(full)
    os.environ[full] = str(value)
    try:
        yield
    finally:
        if before is None:
            del os.environ[full]
        else:
            os.environ[full] = before


_WARNED: set[str] = set()  # unknown variables already warned about in this process


def validate_all(warn: bool = True) -> None:
    """Parse every knob that is set, so a bad value fails at start-up rather than mid-run (one ValueError naming
    every invalid one, a line each); warn about
    EP_RUNTIME_* variables that are no knob (a typo would otherwise be ignored without a word), once
    per process and variable, with the closest knob's name. warn=False: check only (ranks other than
    0 pass it, so a job prints the warning once)."""
    problems = [problem for problem in map(problem_of, KNOBS) if problem]
    if problems:  # every bad value at once, not one per attempt
        raise ValueError("\n".join(problems))
    new = [name for name in unknown() if name not in _WARNED]
    if warn and new:
        _WARNED.update(new)
        described = ", ".join(name + suggestion(name) for name in new)
        warnings.warn(f"ignoring unknown variable{'s' if len(new) > 1 else ''} {described}: no such ep-runtime knob "
                      f"(`ep-runtime env` lists them)", stacklevel=2)


def problem_of(name: str) -> Optional[str]:
    """Why knob `name`'s value in the environment is invalid (the error get raises), or None when it is valid or
    unset: `ep-runtime env` marks each such knob in its listing."""
    try:
        get(name)
    except ValueError as err:
        return str(err)
    return None


def suggestion(name: str) -> str:
    """' (did you mean EP_RUNTIME_X?)' for the knob closest to `name`, or ''. Compared in upper case, as every
    knob is named (EP_RUNTIME_timeout_s got no suggestion)."""
    return did_you_mean(PREFIX + name.removeprefix(PREFIX).upper(), list(KNOBS), most=1, cutoff=0.6, prefix=PREFIX)


def unknown() -> list[str]:
    """Names set in the environment with our prefix that are not registered knobs."""
    return sorted(name for name in os.environ if name.startswith(PREFIX) and name not in KNOBS)


# Variables set by launchers. Read-only for us; listed so `ep-runtime env` can show what was detected.
LAUNCHER_VARIABLES: dict[str, str] = {
    "RANK": "torchrun: global rank",
    "WORLD_SIZE": "torchrun: number of ranks",
    "LOCAL_RANK": "torchrun: rank on this node",
    "MASTER_ADDR": "torchrun: rendezvous host",
    "MASTER_PORT": "torchrun: rendezvous port",
    "GROUP_RANK": "torchrun: index of this node (the node-aware exchange's node, unless overridden)",
    "SLURM_PROCID": "Slurm: global rank of this task",
    "SLURM_NTASKS": "Slurm: number of tasks",
    "SLURM_LOCALID": "Slurm: task index on this node",
    "SLURM_NODEID": "Slurm: index of this task's node in the job (the node-aware exchange's node)",
    "SLURM_JOB_NODELIST": "Slurm: hosts of the job (first one hosts the rendezvous)",
    "SLURM_JOB_ID": "Slurm: job id (the rendezvous port is derived from it)",
    "SLURM_STEP_ID": "Slurm: step id, set by srun (its presence means srun started this task)",
    "SLURM_STEP_NUM_TASKS": "Slurm: number of tasks in this srun step",
    "SLURM_STEP_NODELIST": "Slurm: hosts of this srun step",
    "OMPI_COMM_WORLD_SIZE": "Open MPI: number of ranks (MPI launch detected)",
    "OMPI_COMM_WORLD_LOCAL_RANK": "Open MPI: rank on this node (the local rank when RANK and WORLD_SIZE are set without LOCAL_RANK)",
    "PMI_SIZE": "MPICH/PMI: number of ranks (MPI launch detected)",
    "PMI_RANK": "MPICH/PMI: rank (compared with SLURM_PROCID: MPICH's mpiexec under Slurm starts ranks from one srun task per node)",
    "CUDA_VISIBLE_DEVICES": "CUDA devices visible to this process",
    "TRITON_INTERPRET": "Triton: 1 runs Triton kernels on CPU tensors through its interpreter (runner='triton' without a GPU)",
}


# torch's NCCL variables that init_distributed gives a default on NCCL (the user's own value wins).
# Read by ProcessGroupNCCL when the group is created, so they are set before it.
TORCH_NCCL_VARIABLES: dict[str, str] = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "torch: what NCCL's watchdog does when a collective outlives the group's "
                                       "timeout; ep-runtime's default 2 aborts the communicator and leaves the "
                                       "process alive (the next call on the group raises in Python)",
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "torch: write the flight recorder on a timeout; ep-runtime's default 0 unless "
                                  "EP_RUNTIME_NCCL_DUMP_ON_TIMEOUT=1",
    "TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC": "torch: how long the watchdog waits for a dump (it sleeps 4x this before "
                                          "aborting); ep-runtime's default 500 while the dump is off",
    "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": "torch: path prefix of the flight-recorder dump (rank appended; default "
                                       "/tmp/nccl_trace_rank_); read, never set",
}


def torch_nccl(name: str) -> Optional[str]:
    """A torch NCCL variable's value, or None when it is unset."""
    if name not in TORCH_NCCL_VARIABLES:
        raise KeyError(f"{name} is not a registered torch NCCL variable")
    raw = os.environ.get(name)
    return None if _unset(raw) else raw


def set_torch_nccl_default(name: str, value: str) -> str:
    """Give torch NCCL variable `name` the value `value` unless the user set it; returns the value in force."""
    current = torch_nccl(name)
    if current is None:
        os.environ[name] = value
        return value
    return current


def launcher(name: str, cast: Callable[[str], Any] = str) -> Any:
    """A launcher variable's value, or None when it is unset."""
    if name not in LAUNCHER_VARIABLES:
        raise KeyError(f"{name} is not a registered launcher variable")
    raw = os.environ.get(name)
    if _unset(raw):
        return None
    try:
        return cast(raw)
    except ValueError:
        kind = getattr(cast, '__name__', cast)
        raise ValueError(f"launcher variable {name}={raw!r} is not a valid {kind}; allowed: "
                         f"{'an integer' if cast is int else f'a {kind}'} ({LAUNCHER_VARIABLES[name]})") from None


def describe() -> list[tuple[str, str, str, str]]:
    """(name, current value, default, doc) per knob, for `ep-runtime env`. A variable set to the empty string
    (or only spaces) shows as such (it was '(unset)', though `export EP_RUNTIME_X=` left it in the environment):
    get reads it as unset, i.e. the default."""
    rows = []
    for name, knob in KNOBS.items():
        raw = os.environ.get(name)
        shown = "(unset)" if raw is None else f"{raw!r} (empty: the default)" if _unset(raw) else raw
        rows.append((name, shown, str(knob.default), knob.doc))
    return rows


def markdown() -> str:
    """docs/environment_variables.md, generated from the registry (a test keeps them equal)."""
    lines = [
        "# Environment variables",
        "",
        "Generated by `ep-runtime env --markdown` from `ep_runtime/envs.py`; do not edit by hand.",
        "",
        "How values are read: a variable set to the empty string or to spaces only counts as unset (its default: "
        "`EP_RUNTIME_X=` in a script means unset); spaces around a value are ignored; booleans and named choices "
        "are read in any case (`True`, `yes`, `OFF`, `NCCL`); integers in decimal, underscores allowed (`1_000`; no "
        "hex, no `2.0`); floats in decimal or exponent notation (`1e3`). Any other value is an error naming the "
        "variable, its value and what is allowed: when the layer or dispatcher is built (on every rank of its "
        "group at once, whichever knob it is), by `ep.init_distributed`, by every `ep-runtime` command, and "
        "where the knob is read. An `EP_RUNTIME_*` variable that is no knob (a typo such as "
        "`EP_RUNTIME_TIMEOUT` for `EP_RUNTIME_TIMEOUT_S`) gets a warning naming the closest knob, from "
        "`ep.init_distributed` (rank 0) and every `ep-runtime` command; `ep-runtime env` lists it.",
        "",
        "When each is read: a dispatcher's and runner's knobs (transport, SMs, buffer sizes, alignment, fp8, "
        "sync checks, the node-aware exchange, `EP_RUNTIME_RUNNER`) when the layer or dispatcher is built: they "
        "become its frozen options, compared across the ranks then, and setting them later changes only layers "
        "built later. Those that must be equal on every rank (" + ", ".join(
            f"`{name}`" for name, knob in KNOBS.items() if knob.same_on_every_rank) + ") are also compared by "
        "`ep.init_distributed`, in its knob check: a value that differs fails every rank at once, naming the knob "
        "and each rank's value. `EP_RUNTIME_SCRATCH_MB`, `EP_RUNTIME_TRITON_GEMM_KERNEL`, `EP_RUNTIME_TRITON_GEMM_SCHEDULE` "
        "and `EP_RUNTIME_TRITON_FP8_GEMM` at every call. `EP_RUNTIME_TIMEOUT_S` by `ep.init_distributed` (for a process group made without it: when a "
        "wait or an NVLink transport starts); `EP_RUNTIME_NCCL_DUMP_ON_TIMEOUT` by `ep.init_distributed` and when a "
        "group is aborted.",
        "",
        "| name | type | default | allowed | doc |",
        "| --- | --- | --- | --- | --- |",
    ]
    for knob in KNOBS.values():
        allowed = knob._allowed().removeprefix("; allowed: ") or "any"
        lines.append(f"| `{knob.name}` | {knob.type.__name__} | `{knob.default}` | {allowed} | {knob.doc} |")
    lines += ["", "## torch's NCCL variables (given a default by init_distributed on NCCL; a value you set wins)", "",
              "| name | meaning |", "| --- | --- |"]
    for name, doc in TORCH_NCCL_VARIABLES.items():
        lines.append(f"| `{name}` | {doc} |")
    lines += ["", "## Launcher variables (read, never set, by ep_runtime)", "", "| name | meaning |", "| --- | --- |"]
    for name, doc in LAUNCHER_VARIABLES.items():
        lines.append(f"| `{name}` | {doc} |")
    return "\n".join(lines) + "\n"
