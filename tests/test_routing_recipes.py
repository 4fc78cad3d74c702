"""docs/routing.md's TopKConfig recipes pick the experts and weights the Hugging Face routers pick.

For each family, a small transformers model (tests/test_hf.py's configs); its first MoE block's
router `gate` returns (logits, weights, ids) for random hidden states; ep.select_experts on the same
logits with the recipe must give the same expert set per token and the same weights (float32
softmax/sigmoid arithmetic on both sides: 1e-6).
"""
import importlib

import pytest
import torch

import ep_runtime as ep

transformers = pytest.importorskip("transformers")
from test_hf import COMMON, FAMILIES  # noqa: E402  (after the importorskip)


def recipe(family: str, config) -> tuple[ep.TopKConfig, bool]:
    """The docs' recipe for `family` with the small model's K and group sizes; True: pass the gate's
    correction bias."""
    K = config.num_experts_per_tok
    if family == "mixtral":
        return ep.TopKConfig(top_k=K, scoring="softmax", renormalize=True), False
    if family == "qwen3_moe":
        return ep.TopKConfig(top_k=K, scoring="softmax", renormalize=True), False
    if family == "qwen2_moe":  # norm_topk_prob=False: the defaults
        return ep.TopKConfig(top_k=K), False
    return ep.TopKConfig(top_k=K, scoring="sigmoid", renormalize=True, num_expert_group=config.n_group,
                         topk_group=config.topk_group, routed_scaling_factor=config.routed_scaling_factor,
                         group_score="top2_sum"), True


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"])  # the docs' recipes
@pytest.mark.parametrize("logit_scale", [1.0, -1.0])
def test_recipe_matches_the_hf_router(family, logit_scale):
    """logit_scale -1: every logit at or below -45, where sigmoid scores are under 1e-19 and DeepSeek-V3's
    renormalisation (divide by the sum + 1e-20) is far from a plain division."""
    cls_name, extra = FAMILIES[family]
    config = getattr(transformers, cls_name)(**COMMON, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    block = next(m for m in model.modules() if hasattr(getattr(m, "gate", None), "top_k"))
    bias = getattr(block.gate, "e_score_correction_bias", None)
    if bias is not None:
        bias.data.normal_(0, 0.3)  # non-zero, so the bias has to be passed to matter
    hidden = torch.randn(40, config.hidden_size, generator=torch.Generator().manual_seed(1))
    if logit_scale < 0:  # the router sees hidden states that give logits -45 - |N(0, 10)|
        target = -45 - 10 * torch.randn(40, block.gate.weight.shape[0], generator=torch.Generator().manual_seed(2)).abs()
        hidden = torch.linalg.lstsq(block.gate.weight.detach().double(), target.double().T).solution.T.float()
    with torch.no_grad():
        logits, hf_weights, hf_ids = block.gate(hidden)
    if logit_scale < 0:
        assert logits.max() < -44
    cfg, needs_bias = recipe(family, config)
    ids, weights = ep.select_experts(logits, cfg, bias if needs_bias else None)
    mine = torch.sort(ids.long(), dim=1)
    theirs = torch.sort(hf_ids.long(), dim=1)
    assert torch.equal(mine.values, theirs.values), family
    torch.testing.assert_close(weights.gather(1, mine.indices), hf_weights.float().gather(1, theirs.indices),
                               rtol=1e-6, atol=1e-6)


def test_the_defaults_are_none_of_mixtral_qwen3_deepseek():
    """What docs/routing.md says: TopKConfig(top_k=K) does not renormalise (so not Mixtral/Qwen3)
    and scores with softmax (so not DeepSeek-V3)."""
    default = ep.TopKConfig(top_k=2)
    assert default.scoring == "softmax" and not default.renormalize and default.num_expert_group is None


ROUTERS = {  # family -> (config class, router module and class, config fields, the docs' recipe)
    "olmoe": ("OlmoeConfig", "olmoe.modeling_olmoe.OlmoeTopKRouter", dict(num_experts=16, num_experts_per_tok=4),
              ep.TopKConfig(top_k=4)),
    "granitemoe": ("GraniteMoeConfig", "granitemoe.modeling_granitemoe.GraniteMoeTopKRouter",
                   dict(num_local_experts=8, num_experts_per_tok=2), ep.TopKConfig(top_k=2, renormalize=True)),
    "gpt_oss": ("GptOssConfig", "gpt_oss.modeling_gpt_oss.GptOssTopKRouter",
                dict(num_local_experts=8, num_experts_per_tok=4), ep.TopKConfig(top_k=4, renormalize=True)),
    "llama4": ("Llama4TextConfig", "llama4.modeling_llama4.Llama4Router", dict(num_local_experts=8, num_experts_per_tok=1),
               ep.TopKConfig(top_k=1, scoring="sigmoid")),
    "deepseek_v2_greedy": ("DeepseekV2Config", "deepseek_v2.modeling_deepseek_v2.DeepseekV2TopkRouter",
                           dict(n_routed_experts=16, num_experts_per_tok=4, topk_method="greedy",
                                routed_scaling_factor=16.0), ep.TopKConfig(top_k=4, routed_scaling_factor=16.0)),
    "deepseek_v2": ("DeepseekV2Config", "deepseek_v2.modeling_deepseek_v2.DeepseekV2TopkRouter",
                    dict(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                         topk_method="group_limited_greedy", routed_scaling_factor=16.0),
                    ep.TopKConfig(top_k=4, num_expert_group=4, topk_group=2, routed_scaling_factor=16.0,
                                  group_score="max")),
}


@pytest.mark.parametrize("family", list(ROUTERS))
def test_more_recipes_match_the_hf_router(family):
    """docs/routing.md's rows for routers that are not a block's `gate` with (logits, weights, ids): each built
    from its transformers config with random weights; our weights scattered to [T, E] equal theirs (Llama 4's
    router returns them so: sigmoid of the picked logits, 0 elsewhere). GPT-OSS and GraniteMoE take the softmax
    of the K largest logits, which is the softmax over all E renormalised over the K picked."""
    cls_name, router_path, fields, cfg = ROUTERS[family]
    module, cls = router_path.rsplit(".", 1)
    config = getattr(transformers, cls_name)(hidden_size=32, **fields)
    router = getattr(importlib.import_module(f"transformers.models.{module}"), cls)(config).float()
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in router.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        hidden = torch.randn(40, 32, generator=gen)
        out = router(hidden)
    if family == "llama4":
        theirs, logits = out
    else:
        logits, hf_weights, hf_ids = out
        theirs = torch.zeros_like(logits).scatter_(1, hf_ids.long(), hf_weights.float())
    ids, weights = ep.select_experts(logits, cfg)
    mine = torch.zeros_like(logits).scatter_(1, ids.long(), weights)
    assert torch.equal(mine != 0, theirs != 0), family
    torch.testing.assert_close(mine, theirs.float(), rtol=1e-6, atol=1e-6)
