"""Router/expert alignment diagnostics: how router rows r_e [E, D] point relative to their experts' SwiGLU gate
matrices W_e = W1_e ∈ R^{F×D}, for any router with one row per expert (`softmax_topk`'s `proj.weight`, `mpi`'s φ
and r; routers.md §2.4, docs/routers/mpi.md).

G_e = W_eᵀW_e, σ₁ ≥ σ₂ ≥ … the singular values of W_e and v₁ its top right singular vector, the fixed point of
MPI's power step. All in fp32; routers call them from `diagnostics`, every `metrics.diagnostics_interval` steps.

Shape suffixes: E experts, D model width, F expert hidden width, R = min(F, D) singular values.
"""

from __future__ import annotations

import torch
from torch import Tensor


def principal_right_singular(w1_EFD: Tensor) -> tuple[Tensor, Tensor]:
    """(σ [E, R], v₁ [E, D]) of every W_e, exact, by `torch.linalg.svd` in fp32: all R = min(F, D) singular values
    in descending order (σ[:, 0] = σ₁, and σ₂/σ₁ is the gap that decides whether v₁ is well defined), and the top
    right singular vector (its sign is arbitrary)."""
    _, sigma_ER, vh_ERD = torch.linalg.svd(w1_EFD.float(), full_matrices=False)
    return sigma_ER, vh_ERD[:, 0, :]


def direction_alignment(rows_ED: Tensor, v1_ED: Tensor) -> Tensor:
    """a_e = |⟨r_e/||r_e||, v₁e⟩| ∈ [0, 1] for unit v₁e: |cos| of the angle, so the sign of v₁ does not matter.

    Chance level (r_e uniform on the sphere of R^D): E[a_e] = Γ(D/2) / (√π Γ((D+1)/2)) ≈ √(2/(πD)).
    """
    rows_ED = torch.nn.functional.normalize(rows_ED.float(), dim=-1)
    return (rows_ED * v1_ED.float()).sum(-1).abs()


def router_alignment(rows_ED: Tensor, expert_w1_EFD: Tensor) -> Tensor:
    """a_e = |cos∠(r_e, v₁(W1_e))| [E]: how well router row e points along its expert's top right singular
    vector, for any router with one row per expert (routers.md §2.4 diagnostic). For `softmax_topk` r is
    `proj.weight`; for `mpi` it is φ (or the raw rows r)."""
    return direction_alignment(rows_ED, principal_right_singular(expert_w1_EFD)[1])


def alignment_specificity(rows_ED: Tensor, v1_ED: Tensor) -> Tensor:
    """s = mean_e |cos∠(r_e, v₁e)| − mean_{e≠e'} |cos∠(r_e, v₁e')|: how much more row e aligns with *its own*
    expert's top singular vector than with the other experts'. Alignment alone cannot tell this from a direction
    every expert and row share (e.g. the mean of the hidden states): then s ≈ 0 however high the alignment.
    s = 1 for rows equal to mutually orthogonal v₁e. Needs all E rows and v₁ (gather them under EP)."""
    cos_EE = (torch.nn.functional.normalize(rows_ED.float(), dim=-1) @ v1_ED.float().t()).abs()
    num_experts = cos_EE.shape[0]
    own = cos_EE.diagonal().mean()
    return own - (cos_EE.sum() - cos_EE.diagonal().sum()) / max(num_experts * (num_experts - 1), 1)


def pairwise_cosine(rows_ED: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, max) over pairs e ≠ e' of |cos∠(r_e, r_e')|: whether routing directions are expert-specific (near 0,
    as for orthogonal rows) or have drifted to a shared direction (near 1), which a high alignment with each
    expert's v₁ alone cannot tell."""
    unit_ED = torch.nn.functional.normalize(rows_ED.float(), dim=-1)
    cos_EE = (unit_ED @ unit_ED.t()).abs()
    off_diagonal = ~torch.eye(cos_EE.shape[0], dtype=torch.bool, device=cos_EE.device)
    return cos_EE[off_diagonal].mean(), cos_EE[off_diagonal].max()


def rayleigh_ratio(rows_ED: Tensor, w1_EFD: Tensor, sigma1_E: Tensor | None = None) -> Tensor:
    """ρ_e = ||W_e r̂_e|| / σ₁(W_e) ∈ [σ_min/σ₁, 1], with r̂_e = r_e/||r_e||: the share of the expert's largest gain
    that direction r_e gets. ρ_e = 1 exactly when r̂_e = ±v₁ (for σ₁ > σ₂). Chance level (r̂_e uniform on the
    sphere): the root-mean-square √E[||W_e r̂||²] / σ₁ = ||W_e||_F / (√D · σ₁). Pass `sigma1_E` to reuse an SVD."""
    w1_EFD = w1_EFD.float()
    if sigma1_E is None:
        sigma1_E = torch.linalg.matrix_norm(w1_EFD, ord=2)
    rows_ED = torch.nn.functional.normalize(rows_ED.float(), dim=-1)
    return torch.einsum("efd,ed->ef", w1_EFD, rows_ED).norm(dim=-1) / sigma1_E.float()
