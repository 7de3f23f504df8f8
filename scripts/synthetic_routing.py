"""Synthetic routing benchmark: does a router find planted subspaces, and does it collapse on a skewed mixture?

    python scripts/synthetic_routing.py --out runs/synthetic                  # every quickstart variant, seeds 1 2 3
    python scripts/synthetic_routing.py --routers softmax_topk grmoe mpi --seeds 1 2 3 --out runs/synthetic --steps 2000

Task. E components, each a random p-dimensional subspace of R^d (an orthonormal frame U_c drawn on its own) with
its own target map, a random SwiGLU teacher T_c. A token of component c is x = rmsnorm(U_c z + σ·ε), z ~ N(0, I_p),
ε ~ N(0, I_d) (RMS-normalised without gain, as the routers see hidden states in moe-lm), and its target is
y = T_c(x). One MoE layer alone learns the mixture: a router of the registry with its quickstart recipe's settings,
and E SwiGLU experts as wide as the teachers, combined as moe-lm's MoE layer does, y = Σ_k w_k · expert_{id_k}(x)
(dropless), trained by Adam on MSE + Σ coef · aux loss. Token ids, which only `hash` reads, are uniform over a
vocabulary and say nothing about the component. Each (router, seed) trains twice, from the same planted task and
the same initial weights: with balanced components, and with Zipf-skewed ones (P(c) ∝ 1/rank^s).

Figures per router, mean ± std over seeds (docs/synthetic-routing.md):
- angle: on the balanced run, the mean principal angle (degrees) between each planted subspace and the learned
  subspace of the expert matched to it. GrMoE's learned subspace is expert e's frame U_e, compared in its routing
  space with the planted subspace carried there by the router's projection, P·U_c; a linear-logit router's is the
  line of its row (mpi: of its direction φ_e), compared in R^d; hash learns none (n/a).
- accuracy: on the balanced run, the share of held-out tokens whose top-1 expert (the dispatched expert with the
  largest combine weight; none for a token no expert picked) is the one matched to their component. Components
  and experts are matched one to one by the Hungarian assignment that maximises this share, so chance is ≈ 1/E.
- dead experts and load CV: on the skewed run, from the assignment counts of the last `COUNT_STEPS` training steps,
  by `moe_lm.metrics.routing` (dead = share below 0.1/E, as moe-lm logs them).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
import zlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.optimize import linear_sum_assignment
from shootout import quickstart_variants, variant_recipe
from torch import Tensor, nn
from tqdm import tqdm

from moe_lm.config.load import load_config
from moe_lm.config.schema import MetricsConfig, ModelConfig
from moe_lm.metrics.routing import dead_experts, load_cv
from moe_lm.routers import Router, RouterOutput, build_router
from moe_lm.routers.expert_choice import ExpertChoiceRouter
from moe_lm.routers.grmoe import GrMoERouter
from moe_lm.routers.mpi import MPIRouter
from moe_lm.routers.sinkhorn import SinkhornRouter
from moe_lm.routers.softmax_topk import SoftmaxTopKRouter

# Shape suffixes: T tokens, D token width d, P planted subspace dimension p, C components, E experts (C = E),
# F expert width, K dispatch slots per token, M GrMoE routing dimension, Q a learned subspace's dimension.

COUNT_STEPS = 20
"""The last training steps whose assignment counts give the collapse figures."""
EVAL_TOKENS = 4096
"""Held-out tokens of the balanced mixture for the accuracy and the relative MSE."""
DEAD_EXPERT_SHARE = MetricsConfig().dead_expert_share
"""An expert is dead below this share of the uniform share 1/E (moe-lm's default, 0.1)."""
INIT_STD = ModelConfig().init_std
"""Std of the experts' initial weights (moe-lm's default `model.init_std`, 0.02)."""
METRICS = (  # (key, table header, format) of the reported figures
    ("angle_deg", "angle (°)", "{:.1f}"),
    ("accuracy", "accuracy", "{:.3f}"),
    ("relative_mse", "relative MSE", "{:.3f}"),
    ("dead_experts", "dead experts (skewed)", "{:.2f}"),
    ("load_cv", "load CV (skewed)", "{:.3f}"),
)
SKEWED_METRICS = ("dead_experts", "load_cv")
"""Figures taken from the skewed run; the others come from the balanced run."""
LINEAR_LOGIT_ROUTERS = (SoftmaxTopKRouter, SinkhornRouter, ExpertChoiceRouter)
"""Routers whose logits are x·w_e with the rows w_e of `proj.weight`."""


@dataclass(frozen=True)
class Task:
    """Benchmark settings, the same for every router (each is also a command-line flag)."""

    d: int = 32
    """Token width."""
    p: int = 2
    """Dimension of each planted subspace."""
    experts: int = 8
    """E, the number of experts and of planted components (the quickstart's)."""
    top_k: int = 2
    """Experts per token (the quickstart's)."""
    d_expert: int = 32
    """Hidden width of every expert and of every teacher."""
    noise: float = 0.1
    """σ, std of the isotropic noise added to each coordinate before the RMS normalisation. Without noise one expert
    fits every teacher on its own plane at once, and routing hardly matters (docs/synthetic-routing.md)."""
    steps: int = 300
    """Optimizer steps of each run."""
    batch: int = 256
    """Tokens per step."""
    lr: float = 1e-2
    """Adam learning rate of the router and the experts."""
    skew: float = 1.0
    """Zipf exponent s of the skewed run, P(c) ∝ 1/rank^s (1.0 for E = 8: 37% down to 4.6%)."""
    vocab: int = 4096
    """Token ids are uniform over this many."""

    def __post_init__(self) -> None:
        if min(self.d, self.p, self.experts, self.top_k, self.d_expert, self.steps, self.batch, self.vocab) < 1:
            raise ValueError(f"every size and count must be >= 1: {self}")
        if self.p > self.d or self.noise < 0 or self.lr <= 0 or self.skew < 0:
            raise ValueError(f"need p <= d, noise >= 0, lr > 0 and skew >= 0: {self}")


def rms_normalize(x_TD: Tensor) -> Tensor:
    return x_TD * x_TD.square().mean(-1, keepdim=True).add(1e-12).rsqrt()


def swiglu(x_TD: Tensor, w1_FD: Tensor, w3_FD: Tensor, w2_DF: Tensor) -> Tensor:
    return F.linear(F.silu(F.linear(x_TD, w1_FD)) * F.linear(x_TD, w3_FD), w2_DF)


class PlantedMixture:
    """E planted subspaces (`frames_CDP`), each with its own SwiGLU teacher scaled to unit output RMS on its
    component, so that every component weighs alike in the MSE."""

    def __init__(self, task: Task, generator: torch.Generator):
        c, d, p, f = task.experts, task.d, task.p, task.d_expert
        self.task = task
        self.frames_CDP = torch.linalg.qr(torch.randn(c, d, p, generator=generator)).Q
        self.teacher_w1_CFD = torch.randn(c, f, d, generator=generator) * d ** -0.5
        self.teacher_w3_CFD = torch.randn(c, f, d, generator=generator) * d ** -0.5
        self.teacher_w2_CDF = torch.randn(c, d, f, generator=generator)
        _, y_TD, component_T, _ = self.sample(EVAL_TOKENS, torch.ones(c), generator)
        rms_C = torch.stack([y_TD[component_T == i].square().mean().sqrt() for i in range(c)])
        self.teacher_w2_CDF /= rms_C.view(c, 1, 1)

    def sample(self, num_tokens: int, probs_C: Tensor, generator: torch.Generator) -> tuple[Tensor, ...]:
        """(x_TD, y_TD, component_T, token_ids_T) of `num_tokens` tokens, components drawn from `probs_C`."""
        task = self.task
        component_T = torch.multinomial(probs_C, num_tokens, replacement=True, generator=generator)
        z_TP = torch.randn(num_tokens, task.p, generator=generator)
        noise_TD = torch.randn(num_tokens, task.d, generator=generator) * task.noise
        x_TD = rms_normalize(torch.einsum("tdp,tp->td", self.frames_CDP[component_T], z_TP) + noise_TD)
        y_TD = torch.empty_like(x_TD)
        for c in range(task.experts):
            rows = component_T == c
            y_TD[rows] = swiglu(x_TD[rows], self.teacher_w1_CFD[c], self.teacher_w3_CFD[c], self.teacher_w2_CDF[c])
        return x_TD, y_TD, component_T, torch.randint(0, task.vocab, (num_tokens,), generator=generator)


class Experts(nn.Module):
    """E SwiGLU experts as stacked weights, initialised as moe-lm initialises a one-layer model's (std
    `model.init_std`, and init_std/sqrt(2) for the output projection); `w1_EFD` is the gate stack `mpi` routes with."""

    def __init__(self, task: Task, generator: torch.Generator):
        super().__init__()
        e, d, f = task.experts, task.d, task.d_expert
        self.w1_EFD = nn.Parameter(torch.randn(e, f, d, generator=generator) * INIT_STD)
        self.w3_EFD = nn.Parameter(torch.randn(e, f, d, generator=generator) * INIT_STD)
        self.w2_EDF = nn.Parameter(torch.randn(e, d, f, generator=generator) * INIT_STD / math.sqrt(2))

    def forward(self, x_ND: Tensor, expert_N: Tensor) -> Tensor:
        """Row n through expert `expert_N[n]`: rows sorted by expert, one SwiGLU per expert, unsorted."""
        order_N = expert_N.argsort(stable=True)
        sizes = torch.bincount(expert_N, minlength=self.w1_EFD.shape[0]).tolist()
        y_ND = torch.cat([swiglu(rows, self.w1_EFD[e], self.w3_EFD[e], self.w2_EDF[e])
                          for e, rows in enumerate(x_ND[order_N].split(sizes))])
        return torch.empty_like(y_ND).index_copy(0, order_N, y_ND)


def assignments(out: RouterOutput, num_tokens: int) -> tuple[Tensor, Tensor, Tensor]:
    """(token_N, expert_N, weight_N): every (token, expert) assignment the router made, with its combine weight;
    token choice drops the slots of id -1, expert choice lists each expert's picks."""
    if out.expert_choice:
        num_experts, capacity = out.token_ids_EC.shape
        return (out.token_ids_EC.reshape(-1), torch.arange(num_experts).repeat_interleave(capacity),
                out.weights_EC.reshape(-1))
    used_TK = out.expert_ids_TK >= 0
    tokens_TK = torch.arange(num_tokens).unsqueeze(1).expand_as(out.expert_ids_TK)
    return tokens_TK[used_TK], out.expert_ids_TK[used_TK], out.weights_TK[used_TK]


def moe_forward(router: Router, experts: Experts, x_TD: Tensor,
                token_ids_T: Tensor) -> tuple[Tensor, RouterOutput, tuple[Tensor, Tensor, Tensor]]:
    """(y_TD, router output, its assignments): y_t = Σ w · expert(x_t) over the assignments of token t, moe-lm's
    combine (dropless: no capacity limit). Tokens are drawn independently, so the batch is one sequence (for
    routers that balance per sequence)."""
    out = router(x_TD, expert_w1_EFD=experts.w1_EFD, token_ids_T=token_ids_T, sequence_length=x_TD.shape[0])
    token_N, expert_N, weight_N = assignments(out, x_TD.shape[0])
    y_ND = experts(x_TD[token_N], expert_N) * weight_N.unsqueeze(-1)
    return torch.zeros_like(x_TD).index_add(0, token_N, y_ND), out, (token_N, expert_N, weight_N)


def top1_experts(token_N: Tensor, expert_N: Tensor, weight_N: Tensor, num_tokens: int, num_experts: int) -> Tensor:
    """Each token's assigned expert with the largest combine weight, int64 [T]; -1 for a token with none."""
    weights_TE = torch.full((num_tokens, num_experts), -1.0)
    weights_TE[token_N, expert_N] = weight_N.float()
    best_T, expert_T = weights_TE.max(1)
    return torch.where(best_T >= 0, expert_T, -1)


def principal_angles(a_DA: Tensor, b_DB: Tensor) -> Tensor:
    """The min(A, B) principal angles (degrees) between span(a) and span(b); the columns may be any basis."""
    cosines = torch.linalg.svdvals(torch.linalg.qr(a_DA.double()).Q.mT @ torch.linalg.qr(b_DB.double()).Q)
    return torch.rad2deg(torch.arccos(cosines.clamp(0.0, 1.0)))


def match_components(confusion_CE: Tensor) -> Tensor:
    """expert_C: the one-to-one component → expert matching that keeps the most tokens (Hungarian)."""
    components, experts = linear_sum_assignment(confusion_CE.numpy(), maximize=True)
    return torch.as_tensor(experts)[torch.as_tensor(components).argsort()]


@torch.no_grad()
def recovery_angles(router: Router, experts: Experts, frames_CDP: Tensor) -> Tensor | None:
    """[C, E] mean principal angle (degrees) between planted subspace c and expert e's learned one; None for a
    router with no learned subspace (hash)."""
    if isinstance(router, GrMoERouter):  # in the routing space, where the frames live: P·U_c against U_e
        planted_CMP = torch.einsum("md,cdp->cmp", router.proj.weight.float(), frames_CDP)
        learned_EMQ = router.frames()
    elif isinstance(router, (MPIRouter, *LINEAR_LOGIT_ROUTERS)):  # the line of each router row, in R^d
        rows_ED = router.directions(experts.w1_EFD) if isinstance(router, MPIRouter) else router.proj.weight
        planted_CMP, learned_EMQ = frames_CDP, rows_ED.float().unsqueeze(-1)
    else:
        return None
    return torch.tensor([[principal_angles(planted, learned).mean().item() for learned in learned_EMQ]
                         for planted in planted_CMP])


def zipf(num_components: int, exponent: float) -> Tensor:
    """Component probabilities ∝ 1/rank^exponent (exponent 0: balanced)."""
    weights_C = torch.arange(1, num_components + 1, dtype=torch.float64) ** -exponent
    return (weights_C / weights_C.sum()).float()


def make_router(variant: str, task: Task, seed: int) -> Router:
    """`variant`'s router with its quickstart recipe's settings, for the task's E and top-k, initialised by `seed`."""
    cfg = load_config(variant_recipe(variant),
                      [f"model.moe.num_experts={task.experts}", f"model.moe.top_k={task.top_k}"])
    # not torch.manual_seed(seed): the global generator would replay the task generator's stream, and the router
    # would start from the very numbers that drew the planted frames
    torch.manual_seed(zlib.crc32(f"router {seed}".encode()))
    return build_router(cfg.model.moe.router, task.d, task.experts, task.top_k)


def train_run(router: Router, task: Task, seed: int, probs_C: Tensor) -> dict[str, float]:
    """Train `router` and E fresh experts on the seed's planted task with component probabilities `probs_C`;
    return the run's figures. A seed gives every router the same task, experts and token stream."""
    generator = torch.Generator().manual_seed(seed)
    mixture = PlantedMixture(task, generator)
    experts = Experts(task, generator)
    optimizer = torch.optim.Adam([*router.parameters(), *experts.parameters()], lr=task.lr, foreach=True)
    x_TD, y_TD, _, token_ids_T = mixture.sample(task.steps * task.batch, probs_C, generator)
    counts_E = torch.zeros(task.experts)
    for step in range(task.steps):
        batch = slice(step * task.batch, (step + 1) * task.batch)
        pred_TD, out, (_, expert_N, _) = moe_forward(router, experts, x_TD[batch], token_ids_T[batch])
        coefs = router.loss_coefs
        loss = F.mse_loss(pred_TD, y_TD[batch]) + sum(coefs[name] * aux for name, aux in out.aux_losses.items())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step_counts_E = torch.bincount(expert_N, minlength=task.experts).float()
        if router.needs_step_counts:
            router.post_step(step_counts_E)
        if step >= task.steps - COUNT_STEPS:
            counts_E += step_counts_E
    return {**evaluate(router, experts, mixture, generator),
            "dead_experts": dead_experts(counts_E, DEAD_EXPERT_SHARE).item(), "load_cv": load_cv(counts_E).item()}


@torch.no_grad()
def evaluate(router: Router, experts: Experts, mixture: PlantedMixture, generator: torch.Generator) -> dict[str, float]:
    """Angle, accuracy and relative MSE on `EVAL_TOKENS` held-out tokens of the balanced mixture; and the accuracy
    of the nearest planted subspace on them, the ceiling that the noise leaves."""
    num_experts = mixture.task.experts
    router.eval()
    x_TD, y_TD, component_T, token_ids_T = mixture.sample(EVAL_TOKENS, torch.ones(num_experts), generator)
    pred_TD, _, assigned = moe_forward(router, experts, x_TD, token_ids_T)
    top1_T = top1_experts(*assigned, EVAL_TOKENS, num_experts)
    picked_T = top1_T >= 0
    confusion_CE = torch.zeros(num_experts, num_experts).index_put_(
        (component_T[picked_T], top1_T[picked_T]), torch.ones(int(picked_T.sum())), accumulate=True)
    expert_C = match_components(confusion_CE)
    angles_CE = recovery_angles(router, experts, mixture.frames_CDP)
    nearest_T = torch.einsum("td,cdp->tcp", x_TD, mixture.frames_CDP).square().sum(-1).argmax(1)
    return {
        "angle_deg": math.nan if angles_CE is None else angles_CE[torch.arange(num_experts), expert_C].mean().item(),
        "accuracy": (top1_T == expert_C[component_T]).float().mean().item(),
        "relative_mse": (F.mse_loss(pred_TD, y_TD) / y_TD.var()).item(),
        "oracle_accuracy": (nearest_T == component_T).float().mean().item(),
    }


def summarize(runs: list[dict], routers: list[str]) -> dict[str, dict[str, list[float]]]:
    """router -> figure -> its values over seeds (balanced run, or skewed for `SKEWED_METRICS`); NaN = n/a."""
    return {router: {key: [run["skewed" if key in SKEWED_METRICS else "balanced"][key] for run in runs
                           if run["router"] == router] for key, _, _ in METRICS} for router in routers}


def mean_std(values: list[float], fmt: str) -> str:
    if any(math.isnan(v) for v in values):
        return "n/a"
    if len(values) < 2:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.fmean(values))} ± {fmt.format(statistics.stdev(values))}"


def write_report(out: Path, task: Task, seeds: list[int], runs: list[dict], wall_s: float, cpu_s: float) -> None:
    """results.json (every run), results.md (mean ± std table) and results.png (bars with ± std) under `out`."""
    routers = list(dict.fromkeys(run["router"] for run in runs))
    summary = summarize(runs, routers)
    out.mkdir(parents=True, exist_ok=True)
    nan_to_none = [{**run, **{part: {k: None if math.isnan(v) else v for k, v in run[part].items()}
                              for part in ("balanced", "skewed")}} for run in runs]
    (out / "results.json").write_text(json.dumps({"task": asdict(task), "seeds": seeds, "wall_s": wall_s,
                                                  "cpu_s": cpu_s, "runs": nan_to_none}, indent=1) + "\n")
    settings = ", ".join(f"{k}={v}" for k, v in asdict(task).items())
    oracle = statistics.fmean(run["balanced"]["oracle_accuracy"] for run in runs)
    lines = [f"Synthetic routing, mean ± std over seeds {seeds} ({settings}): {wall_s:.0f} s wall, {cpu_s:.0f} s CPU. "
             f"Nearest-planted-subspace accuracy (the ceiling under this noise): {oracle:.3f}.", "",
             "| router | " + " | ".join(header for _, header, _ in METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    lines += [f"| {router} | " + " | ".join(mean_std(summary[router][key], fmt) for key, _, fmt in METRICS) + " |"
              for router in routers]
    (out / "results.md").write_text("\n".join(lines) + "\n")

    fig = Figure(figsize=(3.2 * len(METRICS), 3.6), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (key, header, _) in zip(fig.subplots(1, len(METRICS)), METRICS):
        values = [[0.0] if any(map(math.isnan, v)) else v for v in (summary[router][key] for router in routers)]
        ax.bar(range(len(routers)), [statistics.fmean(v) for v in values], capsize=3,
               yerr=[statistics.stdev(v) if len(v) > 1 else 0.0 for v in values],
               color=[f"C{i}" for i in range(len(routers))])
        for i, router in enumerate(routers):
            if any(map(math.isnan, summary[router][key])):
                ax.text(i, 0, "n/a", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(routers)), routers, rotation=45, ha="right")
        ax.set_title(header)
    fig.savefig(out / "results.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--routers", nargs="+", default=quickstart_variants(),
                        help="quickstart variants (recipes/quickstart_<name>.yaml; softmax_topk: quickstart.yaml)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--out", type=Path, required=True)
    for field in fields(Task):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default)
    args = parser.parse_args()
    missing = [v for v in args.routers if not variant_recipe(v).exists()]
    if missing:
        parser.error(f"no recipe for {missing}: expected {[str(variant_recipe(v)) for v in missing]}")
    try:
        task = Task(**{field.name: getattr(args, field.name) for field in fields(Task)})
    except ValueError as exc:
        parser.error(str(exc))
    torch.set_num_threads(1)  # tiny tensors: more threads only contend

    start, start_cpu = time.perf_counter(), time.process_time()
    runs = []
    jobs = [(variant, seed) for variant in args.routers for seed in args.seeds]
    for variant, seed in tqdm(jobs, desc="synthetic routing", unit="router·seed"):
        runs.append({"router": variant, "seed": seed,
                     "balanced": train_run(make_router(variant, task, seed), task, seed, zipf(task.experts, 0.0)),
                     "skewed": train_run(make_router(variant, task, seed), task, seed, zipf(task.experts, task.skew))})
    write_report(args.out, task, args.seeds, runs, time.perf_counter() - start, time.process_time() - start_cpu)
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
