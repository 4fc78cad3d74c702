"""ep_runtime: expert-parallel Mixture-of-Experts layers for PyTorch.

    import ep_runtime as ep
    group = ep.init_distributed()
    layer = ep.EPMoE(num_experts=64, top_k=6, hidden_size=1024, intermediate_size=512,
                     dispatcher="deepep_normal", runner="torch", group=group)
    layer.load_experts(w13, w2)
    y = layer(x, topk_ids, topk_weights)
"""
from . import envs, eplb
from .config import ExpertWeights, MoeConfig
from .distributed import PeerFailure, destroy_distributed, detect_launch, init_distributed
from .placement import ExpertPlacement
from .quant import QuantConfig
from .routing import TopKConfig, TopKOutput, select_experts
from .runner_core import CombineInput, ExpertMajorInput, MoeRunner, RunnerInput, registered_pairs, supported_formats

# Registries last: their modules import the core above.
# isort: off
from . import dispatchers, runners  # noqa: E402  (ep_runtime.dispatchers / ep_runtime.runners)
from .layer import EPMoE  # noqa: E402
from .grad_norm import clip_grad_norm_  # noqa: E402
from . import hf  # noqa: E402,F401  (ep_runtime.hf: transformers drop-in; imports no transformers itself)
# isort: on

__version__ = "0.1.0"

_CHECKPOINT = ("ExpertLoadPlanner", "distributed_optimizer_state_dict", "distributed_state_dict",
               "load_distributed_optimizer_state_dict", "load_distributed_state_dict")


def __getattr__(name: str):
    """The checkpoint names import torch.distributed.checkpoint (~0.3 s): only when first used."""
    if name in _CHECKPOINT:
        from . import checkpoint
        return getattr(checkpoint, name)
    raise AttributeError(f"module 'ep_runtime' has no attribute {name!r}")

__all__ = [
    "CombineInput", "EPMoE", "ExpertLoadPlanner", "ExpertMajorInput", "ExpertPlacement", "ExpertWeights", "MoeConfig",
    "MoeRunner", "PeerFailure", "QuantConfig", "RunnerInput", "eplb", "TopKConfig", "TopKOutput",
    "clip_grad_norm_", "destroy_distributed", "detect_launch", "dispatchers", "distributed_optimizer_state_dict",
    "distributed_state_dict", "envs", "init_distributed", "load_distributed_optimizer_state_dict",
    "load_distributed_state_dict", "registered_pairs", "runners", "select_experts", "supported_formats",
]
