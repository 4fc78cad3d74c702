import pytest
import torch

from ep_runtime import ExpertPlacement


@pytest.mark.parametrize("E,R", [(4, 1), (8, 2), (64, 4)])
def test_every_expert_has_exactly_one_owner(E, R):
    ids = torch.arange(E)
    owners = [ExpertPlacement(E, R, r) for r in range(R)]
    hits = torch.stack([p.to_local(ids) >= 0 for p in owners])
    assert hits.sum(0).eq(1).all()
    for r, p in enumerate(owners):
        assert p.num_local_experts == E // R
        assert p.owner(ids).eq(ids // (E // R)).all()
        local = p.to_local(ids)
        mine = local >= 0
        assert ids[mine].tolist() == list(range(r * E // R, (r + 1) * E // R))
        assert p.to_global(local[mine]).eq(ids[mine]).all()


def test_minus_one_maps_to_minus_one():
    p = ExpertPlacement(8, 2, 1)
    ids = torch.tensor([-1, 0, 3, 4, 7])
    assert p.to_local(ids).tolist() == [-1, -1, -1, 0, 3]
    assert p.owner(ids).tolist() == [-1, 0, 0, 1, 1]
    assert p.to_global(torch.tensor([-1, 0, 3])).tolist() == [-1, 4, 7]


def test_masks():
    p = ExpertPlacement(8, 4, 2)
    assert p.local_mask_with_sink().tolist() == [True, True, False]
    assert p.sink == 2
    assert p.global_mask().tolist() == [False] * 4 + [True] * 2 + [False] * 2


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_experts=10, ep_size=4), "num_experts=10 is not divisible by ep_size=4"),
    (dict(num_experts=8, ep_size=2, rank=2), r"rank=2 out of range \[0, 2\)"),
    (dict(num_experts=8, ep_size=0), "ep_size=0"),
])
def test_bad_placement_is_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ExpertPlacement(**kwargs)
