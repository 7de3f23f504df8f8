"""The `sinkhorn` router: the transport plan's marginals, balanced selection in training and plain top-k at
evaluation, the combine weights and their gradients, fp32 under bf16, the config, and the same training losses on
1 process and on 2 processes with ep_size=2 (global column sums).

Shape suffixes: T tokens, D model width, E experts, K slots per token.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.testing import assert_close

from moe_lm.config import load_config
from moe_lm.config.schema import ConfigError, MoEConfig
from moe_lm.routers import REGISTRY
from moe_lm.routers.functional import assignment_counts
from moe_lm.routers.sinkhorn import SinkhornConfig, SinkhornRouter, sinkhorn_plan
from tests.distributed_utils import run_distributed
from tests.train.test_trainer import expert_parallel_overrides

D, E, T = 16, 4, 256
RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def make_router(top_k: int = 2, **cfg) -> SinkhornRouter:
    torch.manual_seed(0)
    return SinkhornRouter(SinkhornConfig(**cfg), D, E, top_k)


def skewed(router: SinkhornRouter) -> tuple[SinkhornRouter, torch.Tensor]:
    """Tokens with a shared component along dim 0 and a router whose expert 0 row alone points along it: logits
    of expert 0 are 12 above the others (token-to-token spread ~1.2), so plain top-1 sends every token to
    expert 0."""
    gen = torch.Generator().manual_seed(1)
    x_TD = torch.randn(T, D, generator=gen)
    x_TD[:, 0] = 3.0
    with torch.no_grad():
        router.proj.weight.copy_(0.3 * torch.randn(E, D, generator=gen))
        router.proj.weight[:, 0] = 0.0
        router.proj.weight[0, 0] = 4.0
    return router, x_TD


def load_cv(expert_ids_TK: torch.Tensor) -> float:
    """Coefficient of variation std/mean of the per-expert assignment counts (0 = perfectly balanced)."""
    counts_E = assignment_counts(expert_ids_TK, E)
    return (counts_E.std(unbiased=False) / counts_E.mean()).item()


# ---- the plan -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.3, 3.0])
def test_plan_rows_sum_to_one_and_columns_to_t_over_e(scale):
    logits_TE = scale * torch.randn(T, E, generator=torch.Generator().manual_seed(2))
    plan_TE, error = sinkhorn_plan(logits_TE, iters=16, global_columns=False)
    assert_close(plan_TE.sum(1), torch.ones(T))  # exact: the last step normalises the rows
    assert_close(plan_TE.sum(0), torch.full((E,), T / E), rtol=1e-3, atol=0)  # converged to 0.1 %
    expected = ((plan_TE.sum(0) - T / E).abs().max() / (T / E)).item()
    assert error.ndim == 0 and error.item() == pytest.approx(expected, abs=1e-6)  # its T/E is the mass over E


def test_plan_is_a_diagonal_scaling_of_exp_logits():
    """log P − L = a_t + b_e: Sinkhorn only rescales rows and columns of exp(L), so the double-centred residual
    of log P − L is zero."""
    logits_TE = 2 * torch.randn(T, E, generator=torch.Generator().manual_seed(3))
    plan_TE, _ = sinkhorn_plan(logits_TE, iters=5, global_columns=False)
    r_TE = plan_TE.log() - logits_TE
    centred = r_TE - r_TE.mean(1, keepdim=True) - r_TE.mean(0, keepdim=True) + r_TE.mean()
    assert_close(centred, torch.zeros_like(centred), atol=1e-5, rtol=0)


def test_the_column_error_falls_with_the_iterations_on_skewed_logits():
    router, x_TD = skewed(make_router())
    logits_TE = router.proj(x_TD).detach()
    errors = [sinkhorn_plan(logits_TE, iters, global_columns=False)[1].item() for iters in (1, 4, 16, 32)]
    assert errors == sorted(errors, reverse=True) and errors[0] > 1 and errors[2] < 0.01 and errors[3] < 1e-4


def test_a_column_that_underflows_recovers_instead_of_becoming_nan():
    logits_TE = torch.zeros(T, E)
    logits_TE[:, 0] = 200.0  # exp(−200) underflows in fp32: expert 1..3 columns start at 0
    logits_TE += 0.1 * torch.randn(T, E, generator=torch.Generator().manual_seed(4))
    plan_TE, error = sinkhorn_plan(logits_TE, iters=16, global_columns=False)
    assert torch.isfinite(plan_TE).all() and error.item() < 0.01


# ---- routing --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [1, 2])
def test_training_spreads_a_skewed_router_that_plain_top_k_collapses(top_k):
    """Plain top-k puts every token on expert 0: load CV = √(E−1) = 1.73 for top-1, and at least 1/√3 = 0.58 for
    top-2 (counts T, T/3, T/3, T/3 at best). Sinkhorn's selection brings the CV below 0.15 (0.25 × that)."""
    router, x_TD = skewed(make_router(top_k))
    with torch.no_grad():
        trained = router.train()(x_TD)
        plain = router.eval()(x_TD)
    assert (plain.expert_ids_TK[:, 0] == 0).all()
    assert load_cv(plain.expert_ids_TK) >= (math.sqrt(E - 1) if top_k == 1 else 1 / math.sqrt(3)) - 1e-6
    assert load_cv(trained.expert_ids_TK) < 0.15
    assert trained.stats["balance_error"].item() < 0.01


def test_training_selection_is_top_k_of_the_plan_and_eval_is_top_k_of_the_probs():
    router, x_TD = skewed(make_router())
    logits_TE = router.proj(x_TD).detach()
    with torch.no_grad():
        trained = router.train()(x_TD)
        evaluated = router.eval()(x_TD)
    plan_TE, _ = sinkhorn_plan(logits_TE, 16, global_columns=False)
    assert torch.equal(trained.expert_ids_TK, plan_TE.topk(2, dim=-1).indices)
    assert torch.equal(evaluated.expert_ids_TK, logits_TE.softmax(-1).topk(2, dim=-1).indices)
    assert evaluated.stats == {} and evaluated.aux_losses == {}


@pytest.mark.parametrize("renormalize", [True, False])
def test_top_k_weights_are_the_softmax_probs_of_the_chosen_experts(renormalize):
    router, x_TD = skewed(make_router(renormalize=renormalize))
    out = router.train()(x_TD)
    probs_TE = router.proj(x_TD).softmax(-1)
    assert_close(out.probs_TE, probs_TE)
    chosen_TK = probs_TE.gather(-1, out.expert_ids_TK)
    assert_close(out.weights_TK, chosen_TK / chosen_TK.sum(-1, keepdim=True) if renormalize else chosen_TK)


def test_top_1_weight_is_the_sigmoid_of_the_chosen_logit():
    router, x_TD = skewed(make_router(top_k=1))
    out = router.train()(x_TD)
    assert_close(out.weights_TK, router.proj(x_TD).gather(-1, out.expert_ids_TK).sigmoid())


@pytest.mark.parametrize("top_k", [1, 2])
def test_the_combine_weights_alone_send_gradients_to_the_router(top_k):
    """The selection has no gradient; the weights must carry the LM loss into W_g (aux losses left out)."""
    router, x_TD = skewed(make_router(top_k))
    out = router.train()(x_TD)
    c_TK = torch.randn(out.weights_TK.shape, generator=torch.Generator().manual_seed(5))
    (out.weights_TK * c_TK).sum().backward()
    assert router.proj.weight.grad is not None and router.proj.weight.grad.abs().sum() > 0


def test_aux_losses_and_the_balance_stat_only_in_training():
    router, x_TD = skewed(make_router(load_balance_coef=0.01, z_loss_coef=0.001))
    out = router.train()(x_TD)
    assert set(out.aux_losses) == {"load_balance", "z_loss"} and router.loss_coefs == {"load_balance": 0.01,
                                                                                        "z_loss": 0.001}
    assert out.aux_losses["load_balance"].item() < 1.1  # balanced counts: Switch loss near its minimum 1
    assert set(out.stats) == {"balance_error"} and out.stats["balance_error"].ndim == 0
    with torch.no_grad():
        assert router(x_TD).aux_losses == {}  # no grad: no losses, but the plan still picks
        assert set(router(x_TD).stats) == {"balance_error"}


def test_routing_math_stays_fp32_under_bf16_inputs_and_autocast():
    router = make_router().train()
    x_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(6))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = router(x_TD.bfloat16())
    assert out.probs_TE.dtype == out.weights_TK.dtype == torch.float32 and out.expert_ids_TK.dtype == torch.int64
    reference = router(x_TD.bfloat16().float())
    assert torch.equal(out.expert_ids_TK, reference.expert_ids_TK)
    assert_close(out.weights_TK, reference.weights_TK)


# ---- config and recipes ---------------------------------------------------------------------------------------


def test_registered_with_a_router_matrix_not_named_expert():
    assert REGISTRY["sinkhorn"] == (SinkhornConfig, SinkhornRouter)
    names = [name for name, _ in make_router().named_parameters()]
    assert names == ["proj.weight"] and not [n for n in names if "expert" in n]


@pytest.mark.parametrize("key,value", [("sinkhorn_iters", 0), ("load_balance_coef", -0.1), ("z_loss_coef", -1.0),
                                       ("init_std", 0.0)])
def test_invalid_config_names_the_key(key, value):
    with pytest.raises(ConfigError, match=f"model.moe.router.{key}"):
        dataclasses.replace(SinkhornConfig(), **{key: value}).validate(MoEConfig())


def test_recipes_load_as_sinkhorn_on_the_quickstart_model():
    quick = load_config(RECIPES / "quickstart_sinkhorn.yaml")
    assert isinstance(quick.model.moe.router, SinkhornConfig) and quick.run.name == "quickstart_sinkhorn"
    assert quick.model == dataclasses.replace(load_config(RECIPES / "quickstart.yaml").model, moe=quick.model.moe)
    assert quick.model.moe.router == SinkhornConfig()  # the recipe spells out the defaults


# ---- 1 process == 2 processes (ep_size=2) ---------------------------------------------------------------------
# With global_balance the column sums are all-reduced over the ranks, so each rank routes its tokens as the
# single process routes the global batch; the per-rank variant (Megatron's) is checked at the plan level.

STEPS = 6


def _train_worker(rank: int, world: int, overrides: list[str], logits_TE, expected_plan_TE) -> None:
    from moe_lm.train import Trainer
    from moe_lm.train.distributed import DistEnv

    env = DistEnv(rank, world, rank, os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), "test")
    Trainer(load_config(RECIPES / "quickstart_sinkhorn.yaml", overrides), env=env, progress=False).train()
    if world == 1:
        return
    rows = slice(rank * T // world, (rank + 1) * T // world)
    plan_TE, error = sinkhorn_plan(logits_TE[rows], 16, global_columns=True)
    assert_close(plan_TE, expected_plan_TE[rows])  # the rows of the single-process plan
    local_TE, _ = sinkhorn_plan(logits_TE[rows], 16, global_columns=False)  # Megatron's per-rank balance
    assert_close(local_TE.sum(0), torch.full((E,), T / world / E), rtol=1e-3, atol=0)
    dist.barrier()


def metrics_rows(run_dir: Path) -> dict[int, dict]:
    return {row["step"]: row for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def test_quickstart_recipe_trains_and_two_processes_ep2_report_the_losses_of_one(tmp_path):
    router, x_TD = skewed(make_router())
    logits_TE = router.proj(x_TD).detach()
    plan_TE, _ = sinkhorn_plan(logits_TE, 16, global_columns=True)  # no process group here: one process
    run_distributed(_train_worker, 1, expert_parallel_overrides(tmp_path, "single", 1, STEPS), logits_TE,
                    plan_TE, timeout_s=300)
    run_distributed(_train_worker, 2, expert_parallel_overrides(tmp_path, "ep2", 2, STEPS), logits_TE,
                    plan_TE, timeout_s=300)
    single, ep2 = metrics_rows(tmp_path / "single"), metrics_rows(tmp_path / "ep2")
    assert single[STEPS]["train/loss"] < single[1]["train/loss"]
    assert single[1]["moe/stat/balance_error"] < 0.05  # the stat reaches the metrics (mean over layers)
    for step in range(1, STEPS + 1):
        for key in ("train/loss", "train/aux_loss", "train/grad_norm", "val/loss"):
            assert (key in single[step]) == (key in ep2[step]), (step, key)
            if key in single[step]:
                assert ep2[step][key] == pytest.approx(single[step][key], rel=1e-5, abs=1e-6), (step, key)
        shares = [key for key in single[step] if "/share/e" in key]
        assert shares and [ep2[step][k] for k in shares] == pytest.approx([single[step][k] for k in shares],
                                                                          abs=1e-7), step
