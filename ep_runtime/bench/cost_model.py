"""Cost model of one exchange: bytes per link class x link speed, plus latency (docs/multinode.md).

Each all_to_all stage costs  alpha + max over link classes of (bytes_c / bandwidth_c + latency_c):
alpha is the fixed cost of one collective call (launch, handshakes), the classes (NVLink inside a
node, the network between nodes) move their bytes at the same time, and a class's per-message
latency is paid once per stage (a rank's messages to its peers travel concurrently). The flat
exchange is one stage of one collective (the GPU kernel path sends each row with its weights and
ids); the node-aware one is two stages (network, then NVLink), run one after the other as
dispatchers/hierarchical.py does, where each dispatch stage is two collectives (the rows, then their
weights and ids: AWARE_COLLECTIVES), or overlapped chunk by chunk as DeepEP's internode kernels do
(`pipelined`: alpha + the slower stage).

Expected rows for uniform routing (every token picks K distinct experts of E uniformly, contiguous
placement, L = E / R experts per rank, G ranks per node): a given rank owns one of a token's experts
with probability p_rank = 1 - C(E - L, K) / C(E, K), a given node with p_node = 1 - C(E - G L, K) /
C(E, K). Per routed token a rank then sends, flat: (G - 1) p_rank rows inside its node and (R - G)
p_rank rows to other nodes; node-aware: (N - 1) p_node rows to other nodes and N (G - 1) p_rank rows
inside nodes (its own node's, plus the forwarding its relays do for it elsewhere). Combine sends
the same rows back (H values of the tokens' dtype each).

    python -m ep_runtime.bench.cost_model        # the 2 x 8 H200 table of docs/performance.md
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from math import comb

from .settings import int_at_least


@dataclass(frozen=True)
class Link:
    """bandwidth_gbs: GB/s (1e9 bytes) one GPU sends over this class of link; latency_us: one message."""

    bandwidth_gbs: float
    latency_us: float = 0.0

    def time_us(self, nbytes: float) -> float:
        return nbytes / (self.bandwidth_gbs * 1e3) + (self.latency_us if nbytes else 0.0)


# Fitted on 2x H200 (docs/performance.md, all_to_all_single, DeepSeek-V3 shape): 14.6 MB in 94 us and
# 58.5 MB in 245-258 us (midpoint 251.5) give 279 GB/s and 42 us per call (eager).
NVLINK_2XH200 = Link(bandwidth_gbs=(58.5 - 14.6) * 1e3 / (251.5 - 94.0))
ALPHA_US = 94.0 - 14.6e6 / (NVLINK_2XH200.bandwidth_gbs * 1e9) * 1e6
# 400 Gb/s per NIC, one NIC per GPU: 50 GB/s nominal; an RDMA message costs a few us.
NETWORK_400G = Link(bandwidth_gbs=50.0, latency_us=5.0)
# all_to_all calls of one node-aware (dispatch, combine) in dispatchers/hierarchical.py: dispatch sends each
# stage's rows and then their weights and ids, combine one stage of sums each way back (each pays alpha)
AWARE_COLLECTIVES = (4, 2)


@dataclass(frozen=True)
class RowsPerToken:
    """Expected rows one rank sends per token it routes (dispatch; combine sends them back)."""

    flat_same_node: float
    flat_other_node: float
    aware_same_node: float
    aware_other_node: float


def hit_probability(num_experts: int, top_k: int, experts_held: int) -> float:
    """P(a token's K distinct uniform experts include one of `experts_held` given experts)."""
    return 1.0 - comb(num_experts - experts_held, top_k) / comb(num_experts, top_k)


def uniform_rows_per_token(num_experts: int, top_k: int, world_size: int, ranks_per_node: int) -> RowsPerToken:
    E, K, R, G = num_experts, top_k, world_size, ranks_per_node
    if E % R or R % G:
        raise ValueError(f"num_experts={E}, world_size={R}, ranks_per_node={G}; allowed: R divides E and G divides R")
    L, N = E // R, R // G
    p_rank, p_node = hit_probability(E, K, L), hit_probability(E, K, G * L)
    return RowsPerToken((G - 1) * p_rank, (R - G) * p_rank, N * (G - 1) * p_rank, (N - 1) * p_node)


@dataclass(frozen=True)
class Prediction:
    """Predicted us of one dispatch and one combine: flat, node-aware in sequence, node-aware pipelined."""

    flat: float
    aware: float
    aware_pipelined: float


def predict(tokens: int, hidden: int, num_experts: int, top_k: int, world_size: int, ranks_per_node: int,
            itemsize: int = 2, combine: bool = False, nvlink: Link = NVLINK_2XH200, network: Link = NETWORK_400G,
            alpha_us: float = ALPHA_US) -> Prediction:
    """tokens per rank; a dispatch row carries H values plus K weights and K ids (4 bytes each), a
    combine row H values."""
    rows = uniform_rows_per_token(num_experts, top_k, world_size, ranks_per_node)
    row_bytes = hidden * itemsize + (0 if combine else 8 * top_k)
    nbytes = lambda r: tokens * r * row_bytes  # noqa: E731
    flat = alpha_us + max(nvlink.time_us(nbytes(rows.flat_same_node)), network.time_us(nbytes(rows.flat_other_node)))
    if world_size == ranks_per_node:  # one node: hierarchical.use_two_stages runs the flat plan
        return Prediction(flat, flat, flat)
    net, nvl = network.time_us(nbytes(rows.aware_other_node)), nvlink.time_us(nbytes(rows.aware_same_node))
    return Prediction(flat, AWARE_COLLECTIVES[combine] * alpha_us + net + nvl, alpha_us + max(net, nvl))


def table(tokens=(128, 1024, 4096), hidden: int = 7168, num_experts: int = 256, top_k: int = 8, world_size: int = 16,
          ranks_per_node: int = 8, **links) -> str:
    """Markdown: per tokens per rank, network MB per rank and predicted us, flat vs node-aware."""
    rows = uniform_rows_per_token(num_experts, top_k, world_size, ranks_per_node)
    lines = ["| tok/rank | op | network MB/rank flat / node-aware | NVLink MB/rank flat / node-aware | flat us | "
             "node-aware us (two stages) | node-aware us (pipelined) | speed-up (two stages / pipelined) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for T in tokens:
        for combine in (False, True):
            row_bytes = hidden * 2 + (0 if combine else 8 * top_k)
            mb = lambda r: T * r * row_bytes / 1e6  # noqa: E731
            p = predict(T, hidden, num_experts, top_k, world_size, ranks_per_node, combine=combine, **links)
            lines.append(f"| {T} | {'combine' if combine else 'dispatch'} | {mb(rows.flat_other_node):.1f} / "
                         f"{mb(rows.aware_other_node):.1f} | {mb(rows.flat_same_node):.1f} / {mb(rows.aware_same_node):.1f}"
                         f" | {p.flat:.0f} | {p.aware:.0f} | {p.aware_pipelined:.0f} | "
                         f"{p.flat / p.aware:.2f}x / {p.flat / p.aware_pipelined:.2f}x |")
    return "\n".join(lines)


def _gbs(text: str) -> float:
    """argparse type: a bandwidth in GB/s, finite and > 0 (a negative one printed negative times)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: allowed a finite number of GB/s > 0")
    return value


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Predicted dispatch/combine time, flat vs node-aware (DeepSeek-V3 shape)")
    p.add_argument("--nodes", type=int_at_least(2), default=2, help="nodes, >= 2 (default 2)")
    p.add_argument("--ranks-per-node", type=int_at_least(1), default=8, help="ranks per node, >= 1 (default 8)")
    p.add_argument("--network-gbs", type=_gbs, default=NETWORK_400G.bandwidth_gbs)
    p.add_argument("--nvlink-gbs", type=_gbs, default=NVLINK_2XH200.bandwidth_gbs)
    args = p.parse_args(argv)
    G = args.ranks_per_node
    if 256 % (args.nodes * G):
        p.error(f"--nodes {args.nodes} --ranks-per-node {G}: {args.nodes * G} ranks do not divide DeepSeek-V3's 256 "
                f"experts; allowed: nodes x ranks per node a divisor of 256")
    rows = uniform_rows_per_token(256, 8, args.nodes * G, G)
    print(f"{args.nodes} x {G} ranks, K=8 of 256 uniform: rows per token to other nodes flat "
          f"{rows.flat_other_node:.3f}, node-aware {rows.aware_other_node:.3f} "
          f"({rows.flat_other_node / rows.aware_other_node:.2f}x fewer); inside nodes {rows.flat_same_node:.3f} / "
          f"{rows.aware_same_node:.3f}")
    print(f"alpha {ALPHA_US:.1f} us per collective, NVLink {args.nvlink_gbs:.0f} GB/s, network {args.network_gbs:.0f} "
          f"GB/s + {NETWORK_400G.latency_us:g} us")
    print(table(world_size=args.nodes * G, ranks_per_node=G, nvlink=Link(args.nvlink_gbs),
                network=Link(args.network_gbs, NETWORK_400G.latency_us)))


if __name__ == "__main__":
    main()
