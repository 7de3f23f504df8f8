"""The `expert_choice` router (Zhou et al. 2022): experts pick their top-C tokens by softmax score.

- Selection: every expert takes exactly C distinct tokens (C = ceil(T·k/E·cf)), with weights equal to their scores;
  `selection=sequence` takes P per sequence, within that sequence.
- The documented leaks, on constructed inputs: batch selection lets another sequence change a token's routing
  (per-sequence selection never does), and in both a later token of the same sequence can change an earlier one's.
- The MoE layer's output equals a plain loop over each expert's picks; gradients reach the router weights.
- 1 process equals 2 processes with ep_size=2 (`selection=sequence`: it does not depend on the split of the batch).

Shape suffixes: T tokens, D model width, E experts, C tokens per expert, B sequences, S positions per sequence.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from moe_lm.config import load_config
from moe_lm.config.schema import ConfigError
from moe_lm.routers import build_router
from moe_lm.routers.expert_choice import expert_choice_selection, tokens_per_expert
from tests.distributed_utils import run_distributed
from tests.moe.test_deepspeed_moe import D, E, K, make_layer

B, S = 4, 8
T = B * S


def make_router(*overrides, d_model=D, num_experts=E, top_k=K):
    cfg = load_config(None, ["model.moe.router.name=expert_choice", f"model.moe.num_experts={num_experts}",
                             f"model.moe.top_k={top_k}", *overrides])
    torch.manual_seed(0)
    return build_router(cfg.model.moe.router, d_model, num_experts, top_k)


def combine_matrix(out, num_tokens: int) -> torch.Tensor:
    """[T, E] weight of each (token, expert) pick, 0 where the expert did not pick the token: the whole routing."""
    dense_ET = torch.zeros(out.weights_EC.shape[0], num_tokens)
    return dense_ET.scatter(1, out.token_ids_EC, out.weights_EC.detach()).t()


def score_router(selection: str):
    """E=2, D=2, k=1 and W_g = I: a token x = (a, 0) has scores (sigmoid(a), 1 − sigmoid(a)), so expert 0 picks the
    tokens of largest a and expert 1 those of smallest a. B=2 sequences of S=4: batch C = 4, sequence P = 2."""
    router = make_router(f"model.moe.router.selection={selection}", d_model=2, num_experts=2, top_k=1)
    with torch.no_grad():
        router.proj.weight.copy_(torch.eye(2))
    return router.eval()


def score_tokens(*a: float) -> torch.Tensor:
    return torch.stack([torch.tensor(a), torch.zeros(len(a))], dim=1)


BASE_A = (0.5, 0.6, 0.1, 0.0,  # sequence 0
          0.55, -1.0, -1.1, -1.2)  # sequence 1


def route(router, a: tuple[float, ...]) -> torch.Tensor:
    return combine_matrix(router(score_tokens(*a), sequence_length=4), len(a))


# ---------------------------------------------------------------------------------------------------------------
# Capacity and selection
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_tokens, top_k, num_experts, factor, expected", [
    (32, 2, 4, 1.0, 16), (32, 2, 4, 0.5, 8), (30, 2, 8, 1.0, 8), (32, 1, 4, 1.3, 11),
    (8, 2, 4, 5.0, 8),  # capped at T: an expert takes a token at most once
    (4, 1, 8, 0.1, 1),  # at least one
])
def test_tokens_per_expert_is_ceil_of_t_k_over_e_times_cf_within_1_and_t(num_tokens, top_k, num_experts, factor,
                                                                           expected):
    assert tokens_per_expert(num_tokens, top_k, num_experts, factor) == expected


@pytest.mark.parametrize("selection", ["batch", "sequence"])
@pytest.mark.parametrize("factor", [1.0, 0.5, 1.3, 3.0])
def test_every_expert_takes_exactly_c_distinct_tokens_weighted_by_their_scores(selection, factor):
    router = make_router(f"model.moe.router.selection={selection}", f"model.moe.router.capacity_factor={factor}")
    x_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(1))
    out = router(x_TD, sequence_length=S)
    capacity = tokens_per_expert(T, K, E, factor) if selection == "batch" else B * tokens_per_expert(S, K, E, factor)
    assert out.expert_choice and out.expert_ids_TK is None and out.weights_TK is None
    assert out.token_ids_EC.shape == out.weights_EC.shape == (E, capacity)
    assert out.token_ids_EC.dtype == torch.int64 and out.token_ids_EC.is_contiguous()
    assert out.weights_EC.dtype == torch.float32 and out.weights_EC.is_contiguous()
    assert out.probs_TE.dtype == torch.float32
    torch.testing.assert_close(out.probs_TE.sum(-1), torch.ones(T))
    for e in range(E):  # no token twice in one expert; perfect balance: C each, nothing dropped
        assert len(set(out.token_ids_EC[e].tolist())) == capacity
    assert ((out.token_ids_EC >= 0) & (out.token_ids_EC < T)).all()
    torch.testing.assert_close(out.weights_EC, out.probs_TE.t().gather(1, out.token_ids_EC))  # the paper's G


def test_routing_math_stays_fp32_for_bf16_inputs_and_under_autocast():
    router = make_router().to(torch.bfloat16)
    x_TD = torch.randn(T, D).to(torch.bfloat16)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = router(x_TD)
    assert out.probs_TE.dtype == out.weights_EC.dtype == torch.float32


def test_batch_selection_takes_the_top_c_scores_of_each_expert_over_all_tokens():
    router = make_router()
    out = router(torch.randn(T, D, generator=torch.Generator().manual_seed(2)))
    capacity = tokens_per_expert(T, K, E, 1.0)
    for e in range(E):
        kth_best = out.probs_TE[:, e].sort(descending=True).values[capacity - 1]
        assert (out.weights_EC[e] >= kth_best).all()
        assert out.probs_TE[:, e].ge(kth_best).sum() == capacity  # random scores: no ties at the boundary


def test_sequence_selection_takes_the_top_p_of_each_sequence_within_that_sequence():
    probs_TE = torch.rand(T, E, generator=torch.Generator().manual_seed(3)).softmax(-1)
    weights_EC, token_ids_EC = expert_choice_selection(probs_TE, 3, S)
    assert token_ids_EC.shape == (E, B * 3)
    for b in range(B):
        block = token_ids_EC[:, 3 * b:3 * (b + 1)]  # sequence b's picks
        expected_weights, expected_positions = probs_TE[b * S:(b + 1) * S].t().topk(3, dim=-1)
        assert torch.equal(block, expected_positions + b * S)
        torch.testing.assert_close(weights_EC[:, 3 * b:3 * (b + 1)], expected_weights)


def test_sequence_selection_without_a_sequence_length_takes_the_flat_input_as_one_sequence():
    router = make_router("model.moe.router.selection=sequence")
    x_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(4))
    assert torch.equal(router(x_TD).token_ids_EC, router(x_TD, sequence_length=T).token_ids_EC)
    with pytest.raises(ValueError, match="whole sequences"):
        router(x_TD, sequence_length=5)


# ---------------------------------------------------------------------------------------------------------------
# The causality leaks (docs/routers/expert_choice.md)
# ---------------------------------------------------------------------------------------------------------------

def test_batch_selection_lets_another_sequence_change_a_tokens_routing():
    """Sequence 1's last token (a=-1.2 -> 5) outbids token 2 of sequence 0 for one of expert 0's C=4 slots."""
    router = score_router("batch")
    changed = BASE_A[:7] + (5.0,)
    before, after = route(router, BASE_A), route(router, changed)
    assert not torch.equal(before[:4], after[:4])
    assert before[2, 0] > 0 and after[2, 0] == 0  # token 2 lost expert 0


def test_sequence_selection_never_lets_another_sequence_change_a_tokens_routing():
    router = score_router("sequence")
    changed = BASE_A[:7] + (5.0,)
    assert torch.equal(route(router, BASE_A)[:4], route(router, changed)[:4])
    # and for any change of sequence 1, on a random model
    router = make_router("model.moe.router.selection=sequence")
    gen = torch.Generator().manual_seed(5)
    x_TD = torch.randn(T, D, generator=gen)
    reference = combine_matrix(router(x_TD, sequence_length=S), T)
    for _ in range(5):
        other = x_TD.clone()
        other[S:] = torch.randn(T - S, D, generator=gen)  # every sequence but the first
        assert torch.equal(combine_matrix(router(other, sequence_length=S), T)[:S], reference[:S])


@pytest.mark.parametrize("selection", ["batch", "sequence"])
def test_a_later_token_of_the_same_sequence_can_change_an_earlier_tokens_routing(selection):
    """The leak per-sequence selection keeps: token 3 of sequence 0 (a=0 -> 5) takes a slot of expert 0 from an
    earlier token of its own sequence. At training time, expert choice is never causal."""
    router = score_router(selection)
    changed = BASE_A[:3] + (5.0,) + BASE_A[4:]
    before, after = route(router, BASE_A), route(router, changed)
    assert not torch.equal(before[:3], after[:3])  # positions 0-2, all before the changed one
    lost = {"batch": 2, "sequence": 0}[selection]
    assert before[lost, 0] > 0 and after[lost, 0] == 0


def test_batch_selection_depends_on_the_split_of_the_batch_and_sequence_selection_does_not():
    """What each rank routes is its own micro-batch: two halves are not one batch under batch selection."""
    gen = torch.Generator().manual_seed(6)
    x_TD = torch.randn(T, D, generator=gen)
    for selection, equal in (("batch", False), ("sequence", True)):
        router = make_router(f"model.moe.router.selection={selection}")
        whole = combine_matrix(router(x_TD, sequence_length=S), T)
        halves = torch.cat([combine_matrix(router(half, sequence_length=S), T // 2) for half in x_TD.chunk(2)])
        assert torch.equal(whole, halves) == equal, selection


# ---------------------------------------------------------------------------------------------------------------
# The MoE layer, gradients, config
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("selection", ["batch", "sequence"])
def test_layer_output_equals_a_loop_over_each_experts_picks(selection):
    layer = make_layer("expert_choice", f"model.moe.router.selection={selection}",
                       "model.moe.router.capacity_factor=0.75")
    x_BSD = torch.randn(B, S, D, generator=torch.Generator().manual_seed(7))
    y_BSD = layer(x_BSD)[0].detach()  # with grad: the layer keeps its routing record only in training
    with torch.no_grad():
        x_TD = x_BSD.reshape(T, D)
        out = layer.router(x_TD, sequence_length=S)
        expected_TD = torch.zeros_like(x_TD)
        for e in range(E):
            for t, weight in zip(out.token_ids_EC[e].tolist(), out.weights_EC[e]):
                expected_TD[t] += weight * layer.local_experts[e](x_TD[t])
    torch.testing.assert_close(y_BSD.reshape(T, D), expected_TD, rtol=1e-5, atol=1e-6)
    record = layer.gate.record
    assert torch.equal(record.counts_E, torch.full((E,), float(out.token_ids_EC.shape[1])))


def test_gradients_reach_the_router_weights_through_the_combine_weights_and_the_z_loss():
    layer = make_layer("expert_choice", "model.moe.router.z_loss_coef=0.001")
    x_BSD = torch.randn(B, S, D, generator=torch.Generator().manual_seed(8))
    y, l_aux = layer(x_BSD)
    y.square().mean().backward()
    assert layer.router.proj.weight.grad.abs().sum() > 0
    layer.zero_grad()
    y, l_aux = layer(x_BSD)
    assert l_aux > 0
    (0 * y.sum() + l_aux).backward()  # Megatron's check: the z-loss alone moves the router
    assert layer.router.proj.weight.grad.abs().sum() > 0


def test_no_aux_loss_without_z_loss_and_none_in_evaluation():
    layer = make_layer("expert_choice", "model.moe.router.z_loss_coef=0.001")
    x_BSD = torch.randn(B, S, D)
    layer.eval()
    assert layer(x_BSD)[1] == 0
    layer = make_layer("expert_choice")
    assert layer(x_BSD)[1] == 0 and layer.router.loss_coefs == {"z_loss": 0.0}


def test_evaluation_selects_over_the_evaluation_batch_as_in_training():
    router = make_router()
    x_TD = torch.randn(T, D)
    train_ids = router.train()(x_TD).token_ids_EC
    assert torch.equal(router.eval()(x_TD).token_ids_EC, train_ids)


def test_unpicked_share_counts_the_tokens_no_expert_took():
    router = score_router("batch")
    out = router(score_tokens(*BASE_A))  # C=4 of 8 tokens per expert, 2 experts: each token once, none left out
    assert out.stats["unpicked_share"] == 0
    router = make_router("model.moe.router.capacity_factor=0.25")  # 4 tokens per expert from 32: at least 16 left
    assert router(torch.randn(T, D)).stats["unpicked_share"] >= 0.5


@pytest.mark.parametrize("override, key", [("capacity_factor=0", "capacity_factor"),
                                           ("selection=window", "selection"),
                                           ("z_loss_coef=-1", "z_loss_coef")])
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.moe.router.name=expert_choice", f"model.moe.router.{override}"])
    assert err.value.key == f"model.moe.router.{key}"


# ---------------------------------------------------------------------------------------------------------------
# 1 process = 2 processes with ep_size=2
# ---------------------------------------------------------------------------------------------------------------

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def _train_worker(rank: int, world: int, overrides: list[str]) -> None:
    from moe_lm.train import Trainer

    Trainer(load_config(None, overrides), progress=False).train()


def test_per_sequence_selection_trains_the_same_on_one_process_and_on_two_with_ep_size_2(tmp_path):
    """Same global batch (8 sequences: 1 x 8 or 2 x 4). Per-sequence selection does not depend on the split, so
    the losses match; batch selection would not (each rank would select among its own 4 sequences)."""
    from tests.train.test_distributed import tiny_overrides

    (tmp_path / "corpus").mkdir()
    rng = random.Random(0)
    for i in range(12):
        (tmp_path / "corpus" / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(40)) + "\n")
    router = ["model.moe.router.name=expert_choice", "model.moe.router.selection=sequence", "train.max_steps=3",
              "train.eval_interval=3", "train.eval_batches=1"]
    run_distributed(_train_worker, 1, [*tiny_overrides(tmp_path, "single", 1, 1), *router], timeout_s=180)
    run_distributed(_train_worker, 2, [*tiny_overrides(tmp_path, "ep2", 2, 2), *router], timeout_s=180)

    def rows(run: str) -> dict[int, dict]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return {row["step"]: row for row in map(json.loads, lines) if "train/loss" in row or "val/loss" in row}

    single, ep2 = rows("single"), rows("ep2")
    assert sorted(single) == sorted(ep2) == [1, 2, 3]
    for step in single:
        for key in ("train/loss", "train/grad_norm", "val/loss"):
            assert (key in single[step]) == (key in ep2[step]), (step, key)
            if key in single[step]:
                assert ep2[step][key] == pytest.approx(single[step][key], rel=1e-5), (step, key)
    assert "val/loss" in single[3]
