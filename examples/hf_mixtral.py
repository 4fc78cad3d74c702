"""Drop EPMoE into a Hugging Face Mixtral: `torchrun --nproc-per-node 2 examples/hf_mixtral.py`.

Builds a small randomly initialised `transformers` Mixtral (the same weights on every rank), runs it
once as is, then lets `ep.hf.replace_experts` swap every MoE block's experts for EPExperts: each rank
keeps only its slice of the HF weights (gate_up_proj [E, 2I, H] is [gate; up], down_proj [E, H, I],
the layout EPMoE.load_experts takes) and the block keeps its own router. Each rank feeds its own
batch; the logits must equal the original model's. The same call works for Qwen2-MoE, Qwen3-MoE and
DeepSeek-V3 (tests/test_hf.py). Needs transformers >= 5.0: `pip install 'transformers>=5.0'`.
"""
import torch

import ep_runtime as ep
from ep_runtime.reference import rel_err


def main():
    from transformers import MixtralConfig, MixtralForCausalLM

    group = ep.init_distributed()
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = ep.distributed.device_for_rank()
    dispatcher = "deepep_normal" if "deepep_normal" in ep.dispatchers.registered() else "standard"

    config = MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                           num_experts_per_tok=2, max_position_embeddings=64,
                           initializer_range=0.1)  # large enough that the experts move the logits
    torch.manual_seed(0)  # the same random model on every rank
    model = MixtralForCausalLM(config).to(device).eval()
    gen = torch.Generator().manual_seed(1 + rank)  # each rank its own batch (and its own length)
    input_ids = torch.randint(0, config.vocab_size, (2, 12 + 3 * rank), generator=gen).to(device)

    with torch.no_grad():
        expected = model(input_ids).logits
        replaced = ep.hf.replace_experts(model, dispatcher=dispatcher, runner="torch", group=group, device=device)
        actual = model(input_ids).logits

    err = rel_err(actual, expected)
    placement = model.model.layers[0].mlp.experts.layer.placement
    print(f"rank {rank}: {replaced} MoE blocks -> EPMoE ({dispatcher}), experts "
          f"{placement.describe_local_experts()} of "
          f"{config.num_local_experts} here; logits {tuple(actual.shape)} rel err {err:.1e}")
    assert err < 1e-5, f"rank {rank}: logits differ from the original model's: rel err {err:.2e}"
    torch.distributed.barrier()
    if rank == 0:
        print(f"hf_mixtral: OK ({world_size} ranks)")
    ep.destroy_distributed()


if __name__ == "__main__":
    main()
