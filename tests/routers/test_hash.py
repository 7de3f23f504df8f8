"""The `hash` router: a fixed function of the token id (same experts across batches, positions and layers' inputs),
near-uniform over experts, k distinct experts with weights 1/k, no parameters, a clear error without ids, the real
DeepSpeed MoE layer, and training: the quickstart recipe's loss falls, with the same losses on 1 process and on
2 processes with ep_size=2.

Shape suffixes: T tokens, D model width, E experts, K slots per token, C hash coefficients.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from moe_lm.config import load_config
from moe_lm.config.schema import ConfigError, MoEConfig
from moe_lm.moe import MoEFeedForward
from moe_lm.routers import REGISTRY
from moe_lm.routers.functional import assignment_counts
from moe_lm.routers.hash import HASH_PRIME, HashConfig, HashRouter, hash_experts, polynomial_hash
from tests.distributed_utils import run_distributed
from tests.train.test_trainer import expert_parallel_overrides

D, E, K, T, V = 16, 8, 2, 64, 4096
RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def make_router(top_k: int = K, num_experts: int = E, **cfg) -> HashRouter:
    return HashRouter(HashConfig(**cfg), D, num_experts, top_k)


def route(router: HashRouter, token_ids_T: torch.Tensor):
    return router(torch.randn(token_ids_T.shape[0], D), token_ids_T=token_ids_T)


# ---- the hash -------------------------------------------------------------------------------------------------


def test_polynomial_hash_is_horners_rule_mod_p_without_overflow():
    coefs_C = torch.tensor([HASH_PRIME - 1, 12345, HASH_PRIME - 2, 7])
    values = [0, 1, 2, 4095, HASH_PRIME - 1, HASH_PRIME, 2 ** 40 + 3]
    expected = [(((int(coefs_C[0]) * (v % HASH_PRIME) + int(coefs_C[1])) * (v % HASH_PRIME) + int(coefs_C[2]))
                 * (v % HASH_PRIME) + int(coefs_C[3])) % HASH_PRIME for v in values]  # Python ints: exact
    assert polynomial_hash(torch.tensor(values), coefs_C).tolist() == expected


def test_the_same_token_id_always_goes_to_the_same_experts_across_batches_and_positions():
    router = make_router()
    gen = torch.Generator().manual_seed(0)
    first = torch.randint(0, V, (T,), generator=gen)
    second = torch.cat([first.flip(0), torch.randint(0, V, (T,), generator=gen)])  # other positions, other batch
    ids_a, ids_b = route(router, first).expert_ids_TK, route(router, second).expert_ids_TK
    assert torch.equal(ids_b[:T], ids_a.flip(0))
    table = {}
    for token, experts in zip(torch.cat([first, second]).tolist(), torch.cat([ids_a, ids_b]).tolist()):
        assert table.setdefault(token, experts) == experts
    with torch.no_grad():  # train/eval and grad mode change nothing
        assert torch.equal(route(router.eval(), first).expert_ids_TK, ids_a)


def test_the_routing_depends_on_the_seed_only():
    ids_T = torch.arange(V)
    same = [route(make_router(seed=3), ids_T).expert_ids_TK for _ in range(2)]
    assert torch.equal(*same)
    assert (route(make_router(seed=4), ids_T).expert_ids_TK != same[0]).any()


@pytest.mark.parametrize("top_k,num_experts", [(1, 8), (2, 8), (3, 4), (4, 4)])
def test_k_distinct_experts_per_token_with_uniform_weights_and_probs(top_k, num_experts):
    out = route(make_router(top_k, num_experts), torch.arange(V))
    ids_TK = out.expert_ids_TK
    assert ids_TK.shape == (V, top_k) and ids_TK.dtype == torch.int64
    assert ((ids_TK >= 0) & (ids_TK < num_experts)).all()
    assert (ids_TK.sort(-1).values.diff(dim=-1) > 0).all()  # distinct
    assert torch.equal(out.weights_TK, torch.full((V, top_k), 1 / top_k))
    assert torch.equal(out.probs_TE.gather(-1, ids_TK), out.weights_TK) and torch.allclose(out.probs_TE.sum(-1),
                                                                                           torch.ones(V))
    assert out.probs_TE.dtype == out.weights_TK.dtype == torch.float32 and out.aux_losses == {}


def test_uniform_token_ids_spread_near_uniformly_over_experts_and_expert_pairs():
    """All 65,536 ids, top-2 of 8: each expert's share of the assignments within 2 % of 1/E, and each of the
    28 unordered pairs within 5 % of 1/28 (binomial standard deviations: 0.5 % and 1.6 %)."""
    num_ids = 1 << 16
    ids_TK = route(make_router(), torch.arange(num_ids)).expert_ids_TK
    shares_E = assignment_counts(ids_TK, E) / (num_ids * K)
    assert (shares_E * E - 1).abs().max() < 0.02
    pairs = ids_TK.min(-1).values * E + ids_TK.max(-1).values
    pair_counts = torch.zeros(E * E).index_add_(0, pairs, torch.ones(num_ids))
    pair_counts = pair_counts.view(E, E)[torch.triu(torch.ones(E, E, dtype=torch.bool), diagonal=1)]
    assert pair_counts.numel() == 28 and (pair_counts / (num_ids / 28) - 1).abs().max() < 0.05
    first_slot_E = assignment_counts(ids_TK[:, :1], E) / num_ids  # each slot is uniform on its own as well
    assert (first_slot_E * E - 1).abs().max() < 0.03


def test_hash_experts_is_a_partial_fisher_yates_on_the_identity():
    coefs_KC = make_router(top_k=3, num_experts=5).hash_coefs_KC
    token_ids_T = torch.arange(50)
    expected = []
    for token in token_ids_T.tolist():
        perm = list(range(5))
        for j in range(3):
            pick = j + int(polynomial_hash(torch.tensor([token]), coefs_KC[j])) % (5 - j)
            perm[j], perm[pick] = perm[pick], perm[j]
        expected.append(perm[:3])
    assert hash_experts(token_ids_T, coefs_KC, 5).tolist() == expected


# ---- the module -----------------------------------------------------------------------------------------------


def test_no_parameters_and_a_contiguous_int64_buffer_not_named_expert():
    router = make_router()
    assert list(router.parameters()) == [] and REGISTRY["hash"] == (HashConfig, HashRouter)
    buffers = dict(router.named_buffers())
    assert list(buffers) == ["hash_coefs_KC"] and "hash_coefs_KC" in router.state_dict()  # a checkpoint keeps it
    coefs = buffers["hash_coefs_KC"]
    assert coefs.shape == (K, 4) and coefs.dtype == torch.int64 and coefs.is_contiguous()
    assert ((coefs >= 0) & (coefs < HASH_PRIME)).all() and (coefs[:, 0] > 0).all()


def test_without_token_ids_it_raises_a_clear_error():
    with pytest.raises(ValueError, match="token_ids_T"):
        make_router()(torch.randn(T, D))
    with pytest.raises(ValueError, match="3 ids for 64 tokens"):
        make_router()(torch.randn(T, D), token_ids_T=torch.arange(3))


def test_inside_deepspeeds_moe_layer_experts_get_gradients_and_the_router_has_none():
    cfg = load_config(None, ["model.moe.router.name=hash", f"model.moe.num_experts={E}", f"model.moe.top_k={K}",
                             "model.moe.drop_tokens=false"])
    layer = MoEFeedForward(D, 24, cfg.model.moe, make_router(), ep_size=1, ep_rank=0, init_std=0.1,
                           out_init_std=0.1, seed=0, layer_idx=0).train()
    x_BSD = torch.randn(2, T // 2, D, requires_grad=True)
    token_ids_BS = torch.randint(0, V, (2, T // 2), generator=torch.Generator().manual_seed(1))
    y_BSD, l_aux = layer(x_BSD, token_ids_BS)
    assert l_aux.item() == 0 and not l_aux.requires_grad
    (y_BSD.square().mean() + l_aux).backward()
    assert x_BSD.grad.abs().sum() > 0
    assert all(p.grad is not None for p in layer.local_experts.parameters())
    assert not [n for n, p in layer.named_parameters() if p.grad is not None and "deepspeed_experts" not in n]
    expected = layer.router(x_BSD.reshape(-1, D), token_ids_T=token_ids_BS.reshape(-1)).expert_ids_TK
    assert torch.equal(layer.gate.record.counts_E, assignment_counts(expected, E))
    with pytest.raises(ValueError, match="token_ids_T"):
        layer(x_BSD)


@pytest.mark.parametrize("seed", [-1])
def test_invalid_config_names_the_key(seed):
    with pytest.raises(ConfigError, match="model.moe.router.seed"):
        HashConfig(seed=seed).validate(MoEConfig())


def test_recipes_load_as_hash_on_the_quickstart_model():
    quick = load_config(RECIPES / "quickstart_hash.yaml")
    assert isinstance(quick.model.moe.router, HashConfig) and quick.run.name == "quickstart_hash"
    assert quick.model == dataclasses.replace(load_config(RECIPES / "quickstart.yaml").model, moe=quick.model.moe)
    assert quick.model.moe.router == HashConfig()


# ---- training: the loss falls; 1 process == 2 processes (ep_size=2) ------------------------------------------
# Each rank hashes its own tokens' ids: nothing to communicate, so ep_size=2 must reproduce the 1-process run.

STEPS = 6


def _train_worker(rank: int, world: int, overrides: list[str]) -> None:
    from moe_lm.train import Trainer
    from moe_lm.train.distributed import DistEnv

    env = DistEnv(rank, world, rank, os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), "test")
    trainer = Trainer(load_config(RECIPES / "quickstart_hash.yaml", overrides), env=env, progress=False)
    assert [p for layer in trainer.model.moe_layers() for p in layer.router.parameters()] == []
    trainer.train()


def metrics_rows(run_dir: Path) -> dict[int, dict]:
    return {row["step"]: row for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def test_quickstart_recipe_trains_and_two_processes_ep2_report_the_losses_of_one(tmp_path):
    run_distributed(_train_worker, 1, expert_parallel_overrides(tmp_path, "single", 1, STEPS), timeout_s=300)
    run_distributed(_train_worker, 2, expert_parallel_overrides(tmp_path, "ep2", 2, STEPS), timeout_s=300)
    single, ep2 = metrics_rows(tmp_path / "single"), metrics_rows(tmp_path / "ep2")
    assert single[STEPS]["train/loss"] < single[1]["train/loss"]
    for step in range(1, STEPS + 1):
        for key in ("train/loss", "train/aux_loss", "train/grad_norm", "val/loss"):
            assert (key in single[step]) == (key in ep2[step]), (step, key)
            if key in single[step]:
                assert ep2[step][key] == pytest.approx(single[step][key], rel=1e-5, abs=1e-6), (step, key)
        shares = [key for key in single[step] if "/share/e" in key]
        assert shares and [ep2[step][k] for k in shares] == pytest.approx([single[step][k] for k in shares],
                                                                          abs=1e-7), step
