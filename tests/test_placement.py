import warnings

import pytest
import torch

import ep_runtime as ep
from ep_runtime import ExpertPlacement
from ep_runtime.reference import moe_reference, rel_err
from ep_runtime.runner_core import RunnerInput
from ep_runtime.testing import random_topk_ids

# E=8 over R=2, experts dealt round-robin: rank 0 holds 0, 2, 4, 6; rank 1 holds 1, 3, 5, 7.
ROUND_ROBIN = [e % 2 for e in range(8)]


@pytest.mark.parametrize("E,R", [(4, 1), (8, 2), (64, 4)])
def test_every_expert_has_exactly_one_owner(E, R):
    ids = torch.arange(E)
    owners = [ExpertPlacement(E, R, r) for r in range(R)]
    hits = torch.stack([p.to_local(ids) >= 0 for p in owners])
    assert hits.sum(0).eq(1).all()
    for r, p in enumerate(owners):
        assert p.num_local_experts == E // R
        assert p.rank_of(ids).eq(ids // (E // R)).all()
        local = p.to_local(ids)
        mine = local >= 0
        assert ids[mine].tolist() == list(range(r * E // R, (r + 1) * E // R))
        assert p.to_global(local[mine]).eq(ids[mine]).all()


def test_minus_one_maps_to_minus_one():
    p = ExpertPlacement(8, 2, 1)
    ids = torch.tensor([-1, 0, 3, 4, 7])
    assert p.to_local(ids).tolist() == [-1, -1, -1, 0, 3]
    assert p.rank_of(ids).tolist() == [-1, 0, 0, 1, 1]
    assert p.local_index(ids).tolist() == [-1, 0, 3, 0, 3]
    assert p.to_global(torch.tensor([-1, 0, 3])).tolist() == [-1, 4, 7]


def test_masks():
    p = ExpertPlacement(8, 4, 2)
    assert p.local_mask_with_sink().tolist() == [True, True, False]
    assert p.sink == 2
    assert p.global_mask().tolist() == [False] * 4 + [True] * 2 + [False] * 2


@pytest.mark.parametrize("seed", [0, 1])
def test_non_contiguous_tables_agree_with_a_python_model(seed):
    """A random assignment (L experts per rank): every table and lookup equals a plain-Python model."""
    E, R = 12, 3
    g = torch.Generator().manual_seed(seed)
    owner = [r for r in range(R) for _ in range(E // R)]
    owner = [owner[i] for i in torch.randperm(E, generator=g).tolist()]
    for rank in range(R):
        p = ExpertPlacement(E, R, rank, expert_to_rank=owner)
        mine = [e for e in range(E) if owner[e] == rank]
        index = [[f for f in range(E) if owner[f] == owner[e]].index(e) for e in range(E)]
        assert p.expert_rank_table().tolist() == owner
        assert p.expert_rank_table().dtype == p.expert_local_index_table().dtype == torch.int32
        assert p.expert_local_index_table().tolist() == index
        assert p.local_expert_ids().tolist() == mine
        assert [p.experts_of_rank(r).tolist() for r in range(R)] == [[e for e in range(E) if owner[e] == r]
                                                                   for r in range(R)]
        assert p.global_mask().tolist() == [o == rank for o in owner]
        assert p.global_to_local_table().tolist() == [index[e] if owner[e] == rank else E // R
                                                      for e in range(E)] + [E // R]
        ids = torch.tensor([-1, *range(E)])
        assert p.to_local(ids).tolist() == [-1] + [index[e] if owner[e] == rank else -1 for e in range(E)]
        assert p.to_global(p.to_local(ids)).tolist() == [-1] + [e if owner[e] == rank else -1 for e in range(E)]
        assert p.is_contiguous == (owner == sorted(owner))


def test_from_global_ids_computes_this_ranks_experts_under_any_placement():
    """RunnerInput.from_global_ids + the torch runner == the float64 reference over this rank's experts,
    with experts dealt round-robin (so no offset arithmetic could find them). The reference's experts are read
    off ROUND_ROBIN in the test, not from the placement under test (its tables would agree with themselves)."""
    gen = torch.Generator().manual_seed(2)
    cfg = ep.MoeConfig(8, 3, 16, 8)
    w13 = torch.randn(8, 16, 16, generator=gen, dtype=torch.float64) / 4
    w2 = torch.randn(8, 16, 8, generator=gen, dtype=torch.float64) / 3
    x = torch.randn(20, 16, generator=gen, dtype=torch.float64)
    ids = random_topk_ids(gen, 20, 8, 3, 1)
    w = torch.rand(20, 3, generator=gen)
    for rank in range(2):
        p = ExpertPlacement(8, 2, rank, expert_to_rank=ROUND_ROBIN)
        mine = [e for e, owner in enumerate(ROUND_ROBIN) if owner == rank]  # in global order: the local order
        inp = RunnerInput.from_global_ids(x, ids, w, p)
        y = ep.runners.create("torch", cfg).run(inp, ep.ExpertWeights(w13[mine], w2[mine]))
        here = torch.tensor([owner == rank for owner in ROUND_ROBIN])[ids.clamp(min=0).long()] & (ids >= 0)
        assert here.any() and not here.all()
        kept = torch.where(here, ids, torch.full_like(ids, -1))  # other ranks' experts add nothing here
        assert rel_err(y, moe_reference(x, kept, w.double(), w13, w2, cfg)) < 1e-12  # float64 throughout


def test_load_experts_takes_this_ranks_experts_from_the_placement():
    layer = ep.EPMoE(8, 2, 16, 8, runner="torch")
    layer.placement = ExpertPlacement(8, 2, 1, expert_to_rank=ROUND_ROBIN)  # what the lead's wiring will pass
    w13, w2 = torch.randn(8, 16, 16), torch.randn(8, 16, 8)
    layer.w13.data, layer.w2.data = torch.empty(4, 16, 16), torch.empty(4, 16, 8)
    layer.load_experts(w13, w2)
    assert torch.equal(layer.w13, w13[[1, 3, 5, 7]]) and torch.equal(layer.w2, w2[[1, 3, 5, 7]])
    w2[5, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"w2 \(experts \[1, 3, 5, 7\]\) has a non-finite value inf at \[2, 0, 0\]"):
        layer.load_experts(w13, w2)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_experts=10, ep_size=4), "num_experts=10 is not divisible by ep_size=4"),
    (dict(num_experts=8, ep_size=2, rank=2), r"rank=2; allowed: an int in 0..1 \(ep_size=2\)"),
    (dict(num_experts=8, ep_size=0), "ep_size=0"),
    (dict(num_experts=4, ep_size=2, expert_to_rank=[0, 1, 0]), "expert_to_rank has 3 entries; expected num_experts=4"),
    (dict(num_experts=4, ep_size=2, expert_to_rank=[0, 1, 2, 1]), r"expert_to_rank\[2\]=2 out of range \[0, 2\)"),
    (dict(num_experts=4, ep_size=2, expert_to_rank=[0, 1, 1, 1]),
     "expert_to_rank gives rank 0 1 experts; every rank must hold num_experts / ep_size = 2"),
    # non-integer entries are named, not truncated by int() onto a rank or an expert (0.7 was rank 0)
    (dict(num_experts=4, ep_size=2, expert_to_rank=[0, 0.7, 1, 1.2]),
     r"expert_to_rank\[1\]=0.7; allowed: an int \(a rank or an expert id\)"),
    (dict(num_experts=4, ep_size=2, expert_to_rank=[0, True, 1, 0]), r"expert_to_rank\[1\]=True; allowed: an int"),
    (dict(num_experts=2, ep_size=2, physical_to_logical=[0, 1, 1.5, 0]),
     r"physical_to_logical\[2\]=1.5; allowed: an int"),
    # the sizes and the rank are ints too: rank=1.5 held no experts (no slot's rank equals it), silently
    (dict(num_experts=8, ep_size=2, rank=1.5), r"rank=1.5; allowed: an int in 0..1 \(ep_size=2\)"),
    (dict(num_experts=8, ep_size=2, rank=True), r"rank=True; allowed: an int in 0..1"),
    (dict(num_experts=8, ep_size=2.0), r"ep_size=2.0; allowed: an int >= 1"),
    (dict(num_experts=8.0, ep_size=2), r"num_experts=8.0; allowed: an int >= 1"),
    (dict(num_experts="8", ep_size=2), r"num_experts='8'; allowed: an int >= 1"),
    # a table that is no sequence was "'int' object is not iterable" / "iteration over a 0-d tensor"
    (dict(num_experts=4, ep_size=2, expert_to_rank=3), r"expert_to_rank=3; allowed: None or a sequence of ints"),
    (dict(num_experts=4, ep_size=2, expert_to_rank=torch.tensor(1)),
     r"expert_to_rank=tensor\(1\); allowed: None or a sequence of ints"),
    (dict(num_experts=4, ep_size=2, physical_to_logical=4), r"physical_to_logical=4; allowed: None or a sequence"),
])
def test_bad_placement_is_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ExpertPlacement(**kwargs)


def test_first_expert_exists_only_for_contiguous_placements():
    assert ExpertPlacement(8, 2, 1, expert_to_rank=[0, 0, 0, 0, 1, 1, 1, 1]).first_expert == 4
    with pytest.raises(ValueError, match="first_expert is undefined for a non-contiguous placement"):
        ExpertPlacement(8, 2, 1, expert_to_rank=ROUND_ROBIN).first_expert


def test_device_tables_of_dropped_placements_are_freed():
    """A long job rebalances over and over, each time to a new placement: the tables cached for the
    placements it dropped go (least recently used first) instead of piling up for the life of the
    process, and a placement whose tables were dropped builds them again, equal."""
    import gc
    import random
    import weakref

    from ep_runtime import placement as placement_module
    E, N, R, T, K = 8, 4, 2, 32, 2
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(-1, E, (T, K), generator=g)

    def check(p):
        physical = p.to_physical(ids)
        assert torch.equal(p.logical_of(physical), ids)  # each pair's expert, -1 kept
        here = torch.tensor([e in p.logical_experts_of_rank(p.rank) for e in range(E)])[ids.clamp(min=0)]
        owner = p.physical().rank_of(physical)
        assert owner[(ids >= 0) & here].eq(p.rank).all()  # an expert with a copy here never leaves the rank

    start = [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]
    first = ExpertPlacement(E, R, 1, physical_to_logical=start)
    check(first)
    first_ref = weakref.ref(first)
    del first
    seen, draw = set(), random.Random(0)
    while len(seen) < placement_module.TABLE_CACHE_SIZE // 2:  # each builds 4 tables: twice the cache's worth
        experts = list(range(E)) + [draw.randrange(E) for _ in range(N)]
        draw.shuffle(experts)
        try:
            p = ExpertPlacement(E, R, 1, physical_to_logical=experts)
        except ValueError:  # two copies of one expert on one rank: draw again
            continue
        seen.add(p.physical_to_logical)
        assert torch.equal(p.logical_of(p.to_physical(ids)), ids)
    assert placement_module._cached.cache_info().currsize <= placement_module.TABLE_CACHE_SIZE
    del p
    gc.collect()
    assert first_ref() is None  # nothing keeps the first placement (or its tables) alive
    check(ExpertPlacement(E, R, 1, physical_to_logical=start))


def test_tables_under_torch_compile_warn_nothing_and_match_eager():
    """While torch.compile traces, the tables are built plainly: dynamo ignores an lru_cache and warned at every
    call site of the cached builder (one UserWarning per table). Eager calls keep using the cache."""
    torch.manual_seed(0)
    p = ExpertPlacement.with_redundant_experts(8, 4, ep_size=2, rank=1)
    layer = ep.EPMoE(8, 2, 16, 8, dispatcher="standard", runner="torch")
    gen = torch.Generator().manual_seed(0)
    x, logits = torch.randn(5, 16, generator=gen), torch.randn(5, 8, generator=gen)
    ids = random_topk_ids(gen, 5, 8, 2, 1)

    def step(x, logits, ids):
        physical = p.to_physical(ids)
        return layer(x, router_logits=logits), physical, p.logical_of(physical), p.to_local(ids)

    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torch.compile(step, backend="eager")(x, logits, ids)
    cached = [str(w.message).splitlines()[0] for w in caught if "lru_cache" in str(w.message)]
    assert not cached, cached
    for g, want in zip(got, step(x, logits, ids)):
        assert torch.equal(g, want)


@pytest.mark.parametrize("args, match", [
    ((8, 0, 0), r"^ep_size=0; allowed: an int >= 1$"),  # (was: "num_redundant_experts=0; allowed: an int in 0..-8")
    ((8, 2, -1), r"^ep_size=-1; allowed: an int >= 1$"),
    (("8", 2, 2), r"^num_experts='8'; allowed: an int >= 1$"),  # (was: TypeError "'>' not supported ...")
    ((8, 9, 2), r"^num_redundant_experts=9; allowed: an int in 0..8 "),
])
def test_redundant_placement_names_the_bad_size(args, match):
    """with_redundant_experts checks num_experts and ep_size before the copy limit made of them: a bad
    ep_size was blamed on num_redundant_experts with a negative allowed range."""
    with pytest.raises(ValueError, match=match):
        ExpertPlacement.with_redundant_experts(*args)


@pytest.mark.parametrize("method, value, match", [
    ("experts_of_rank", 1.5, r"^rank=1.5; allowed: an int in 0..1 \(ep_size=2\)$"),  # (was: no experts, silently)
    ("experts_of_rank", True, r"^rank=True; allowed: an int in 0..1"),  # (was: rank 1's)
    ("logical_experts_of_rank", 5, r"^rank=5; allowed: an int in 0..1"),  # (was: [])
    ("physical_slots_of_rank", -1, r"^rank=-1; allowed: an int in 0..1"),
    ("replicas_of", -1, r"^expert=-1; allowed: an int in 0..3 \(num_experts=4\)$"),  # (was: expert 3's copies)
    ("replicas_of", 4, r"^expert=4; allowed: an int in 0..3"),  # (was: IndexError naming nothing)
])
def test_lookups_by_rank_or_expert_name_a_bad_index(method, value, match):
    p = ExpertPlacement(4, 2, 0, physical_to_logical=[0, 1, 2, 3, 0, 1])
    assert p.experts_of_rank(1).tolist() == [3, 0, 1] and p.replicas_of(0) == [(0, 0), (1, 1)]
    with pytest.raises(ValueError, match=match):
        getattr(p, method)(value)
