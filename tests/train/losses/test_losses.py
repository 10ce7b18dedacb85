"""train/losses/objective.py against the naive N×N forms written as the papers write them.

Tolerances: fp32 inputs within 1e-5 relative, fp64 within 1e-10, against a float64 reference built
from the same inputs; gradients relative to the reference's largest entry (elementwise relative
error is meaningless for entries that are ~0).
"""
import io
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train.config import LossConfig
from train.losses.objective import (ContrastiveObjective, clip_loss, cyclic_regularizers, lmix_loss,
                          m2mix_loss, slerp, vlmix_loss, vmix_loss)

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


# ----------------------------------------------------------------- naive references (full N×N)
def naive_clip(I, T, s):
    labels = torch.arange(I.shape[0])
    logits = s * I @ T.T
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def naive_cyclip(I, T):
    n = I.shape[0]
    in_modal = sum(((I[i] @ I[j] - T[i] @ T[j]) ** 2 for i in range(n) for j in range(n))) / n
    cross_modal = sum(((I[i] @ T[j] - I[j] @ T[i]) ** 2 for i in range(n) for j in range(n))) / n
    return in_modal, cross_modal


def naive_slerp(a, b, lam):
    theta = torch.acos((a * b).sum(-1, keepdim=True))
    return (torch.sin((1 - lam) * theta) * a + torch.sin(lam * theta) * b) / torch.sin(theta)


def naive_m2mix(I, T, s, lam, s_mix=None):
    s_mix = s if s_mix is None else s_mix
    n = I.shape[0]
    h = naive_slerp(I, T, lam)
    eye = torch.eye(n, dtype=torch.bool)
    positive = (I * T).sum(-1)
    logits_i = torch.where(eye, torch.diag(positive), I @ h.T) * s_mix
    logits_t = torch.where(eye, torch.diag(positive), T @ h.T) * s_mix
    labels = torch.arange(n)
    return 0.5 * (F.cross_entropy(logits_i, labels) + F.cross_entropy(logits_t, labels))


def naive_unimodal(I, T, s, lam, mix_image, mix_text):
    eye = torch.eye(I.shape[0], dtype=I.dtype)
    anti = torch.flip(eye, dims=[0])
    def mix_with_reversed(X):
        # The middle row of an odd N is mixed with itself: the arc is the point itself (and the
        # textbook formula would divide 0 by 0 there).
        n = X.shape[0]
        return torch.stack([X[i] if i == n - 1 - i else naive_slerp(X[i:i + 1], X[n - 1 - i:n - i], lam)[0]
                            for i in range(n)])

    v = mix_with_reversed(I) if mix_image else I
    t = mix_with_reversed(T) if mix_text else T
    targets = eye + anti if (mix_image and mix_text) else (1 - lam) * eye + lam * anti
    logits = s * v @ t.T
    soft_ce = lambda lg, y: -(y * torch.log_softmax(lg, -1)).sum(-1).mean()
    return 0.5 * (soft_ce(logits, targets) + soft_ce(logits.T, targets.T))


def unit_rows(n, d, dtype=torch.float64, seed=0):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype), dim=-1)


def assert_close_rel(actual, expected, tol):
    actual, expected = actual.double(), expected.double()
    scale = expected.detach().abs().max().clamp_min(1e-300)
    assert torch.isfinite(expected).all() and torch.isfinite(actual).all()
    err = float((actual - expected).abs().max().detach() / scale)
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


def value_and_grads(fn, I, T, log_scale):
    I, T, p = I.clone().requires_grad_(), T.clone().requires_grad_(), log_scale.clone().requires_grad_()
    value = fn(I, T, p.exp())
    grads = torch.autograd.grad(value, (I, T, p), allow_unused=True)
    return value, [g if g is not None else torch.zeros_like(x) for g, x in zip(grads, (I, T, p))]


LOSSES = {
    "clip": (clip_loss, naive_clip),
    "cyclip_in": (lambda I, T, s: cyclic_regularizers(I, T)[0], lambda I, T, s: naive_cyclip(I, T)[0]),
    "cyclip_cross": (lambda I, T, s: cyclic_regularizers(I, T)[1], lambda I, T, s: naive_cyclip(I, T)[1]),
    "m2mix": (lambda I, T, s: m2mix_loss(I, T, s, 0.3), lambda I, T, s: naive_m2mix(I, T, s, 0.3)),
    "m2mix_sep_scale": (lambda I, T, s: m2mix_loss(I, T, s, 0.3, mix_logit_scale=s * 0.5),
                        lambda I, T, s: naive_m2mix(I, T, s, 0.3, s * 0.5)),
    "vmix": (lambda I, T, s: vmix_loss(I, T, s, 0.3), lambda I, T, s: naive_unimodal(I, T, s, 0.3, True, False)),
    "lmix": (lambda I, T, s: lmix_loss(I, T, s, 0.3), lambda I, T, s: naive_unimodal(I, T, s, 0.3, False, True)),
    "vlmix": (lambda I, T, s: vlmix_loss(I, T, s, 0.3), lambda I, T, s: naive_unimodal(I, T, s, 0.3, True, True)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_matches_naive_form(name, dtype):
    fast, naive = LOSSES[name]
    I, T = unit_rows(13, 8, seed=1), unit_rows(13, 8, seed=2)    # odd N: V/L-Mix middle row mixes with itself
    log_scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64)
    value, grads = value_and_grads(fast, I.to(dtype), T.to(dtype), log_scale.to(dtype))
    # Reference in float64 from the very same (rounded) inputs: the error measured is the loss's own.
    ref_value, ref_grads = value_and_grads(naive, I.to(dtype).double(), T.to(dtype).double(), log_scale)
    assert value.dtype == dtype
    assert_close_rel(value, ref_value, TOLERANCE[dtype])
    for grad, ref in zip(grads, ref_grads):
        assert_close_rel(grad, ref, TOLERANCE[dtype])


@pytest.mark.parametrize("pair_noise", [0.05, 1e-3, 0.0])
def test_cyclip_fp32_gram_error_bound(pair_noise):
    """The bound behind fp32 Gram products (combined in fp64), at N=1024, d=128.

    Both terms are differences of terms of size S = (‖IᵀI‖²_F + ‖TᵀT‖²_F)/N ≈ N²/d/N. Bound, for
    any data: |error| ≤ 1e-7·S on values (measured ≤ 2e-8·S) and ≤ 1e-5·max|∇S| on gradients
    (measured ≤ 1.1e-6). Relative to the term itself that is within 1e-5 unless the modalities
    nearly coincide (C < 1e-2·S), where the term is negligible next to the CLIP loss anyway.
    Pair noise 0.05 (pair cosine ≈ 0.9) is the realistic case and is held to 1e-5 relative.
    """
    n, d = 1024, 128
    I = unit_rows(n, d, torch.float32, seed=3)
    T = F.normalize(I + pair_noise * torch.randn(n, d, generator=torch.Generator().manual_seed(4)), dim=-1)
    I64, T64 = I.double().requires_grad_(), T.double().requires_grad_()
    scale = ((I64.T @ I64).square().sum() + (T64.T @ T64).square().sum()) / n
    scale_grad = torch.autograd.grad(scale, I64)[0].abs().max()
    scale = scale.detach()
    naive_terms = (((I64 @ I64.T - T64 @ T64.T) ** 2).sum() / n,     # naive_cyclip, vectorised for N=1024
                   ((I64 @ T64.T - T64 @ I64.T) ** 2).sum() / n)
    for term, naive in enumerate(naive_terms):
        ref_grads = torch.autograd.grad(naive, (I64, T64))
        value, grads = value_and_grads(lambda i, t, s: cyclic_regularizers(i, t)[term], I, T, torch.tensor(0.0))
        assert abs(value.item() - naive.item()) <= 1e-7 * scale.item()
        for grad, ref in zip(grads[:2], ref_grads):
            assert float((grad.double() - ref).abs().max()) <= 1e-5 * float(scale_grad)
            if pair_noise == 0.05:
                assert_close_rel(grad, ref, 1e-5)
        if pair_noise == 0.05:
            assert_close_rel(value, naive, 1e-5)


def test_cyclip_hand_written_gram_backward_passes_gradcheck_and_keeps_input_dtypes():
    """The regularisers' backward is written by hand (train.losses.objective._GramProducts): check it against
    finite differences in fp64, with one input frozen, and for bf16 inputs (gradients come back bf16)."""
    I = unit_rows(7, 3, torch.float64, seed=11).requires_grad_()
    T = unit_rows(7, 3, torch.float64, seed=12).requires_grad_()
    assert torch.autograd.gradcheck(lambda i, t: torch.stack(cyclic_regularizers(i, t)), (I, T))
    frozen = T.detach()
    grad_i = torch.autograd.grad(cyclic_regularizers(I, frozen)[0], I)[0]
    assert torch.equal(grad_i, torch.autograd.grad(cyclic_regularizers(I, T)[0], I)[0])
    low_i, low_t = (x.detach().bfloat16().requires_grad_() for x in (I, T))
    sum(cyclic_regularizers(low_i, low_t)).backward()
    assert low_i.grad.dtype == low_t.grad.dtype == torch.bfloat16
    assert torch.isfinite(low_i.grad.float()).all() and torch.isfinite(low_t.grad.float()).all()


def test_scale_accepts_float_and_one_element_tensor():
    I, T = unit_rows(6, 4, seed=5), unit_rows(6, 4, seed=6)
    expected = naive_clip(I, T, 10.0)
    for scale in (10.0, torch.tensor(10.0, dtype=torch.float64), torch.full((1,), 10.0, dtype=torch.float64)):
        assert_close_rel(clip_loss(I, T, scale), expected, 1e-12)


# ----------------------------------------------------------------- slerp
def test_slerp_matches_textbook_formula_with_per_row_lambda():
    a, b = unit_rows(7, 5, seed=7), unit_rows(7, 5, seed=8)
    lam = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    assert_close_rel(slerp(a, b, lam), naive_slerp(a, b, lam.unsqueeze(-1)), 1e-12)
    assert_close_rel(slerp(a, b, 0.25), naive_slerp(a, b, 0.25), 1e-12)


def test_slerp_on_circle_matches_angle_by_hand():
    # d = 2: a = (1, 0), b at angle φ; the geodesic point at λ is at angle λφ, also past π/2.
    for phi in (0.3, 2.0, 3.0):
        a = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
        b = torch.tensor([[math.cos(phi), math.sin(phi)]], dtype=torch.float64)
        for lam in (0.0, 0.2, 0.5, 1.0):
            expected = torch.tensor([[math.cos(lam * phi), math.sin(lam * phi)]], dtype=torch.float64)
            assert_close_rel(slerp(a, b, lam), expected, 1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_slerp_edge_cases_are_finite_with_finite_gradients(dtype):
    a = unit_rows(4, 6, seed=9)
    cases = {"identical": a.clone(), "antipodal": -a, "random": unit_rows(4, 6, seed=10)}
    for name, b in cases.items():
        for lam in (0.0, 0.5, 1.0, 1e-4):
            x, y = a.to(dtype).requires_grad_(), b.to(dtype).requires_grad_()
            out = slerp(x, y, lam)
            assert out.dtype == dtype
            (out.float() * torch.arange(6.0)).sum().backward()
            for t in (out, x.grad, y.grad):
                assert torch.isfinite(t).all(), (name, lam, dtype)
            if name == "identical":    # the arc between a and a is the point a, for every λ
                torch.testing.assert_close(out.double(), a.to(dtype).double(), atol=2e-3, rtol=0)
            if lam in (0.0, 1.0):      # end points are the inputs themselves, even for antipodal rows
                expected = a if lam == 0.0 else b
                torch.testing.assert_close(out.double(), expected.to(dtype).double(), atol=2e-3, rtol=0)


def test_slerp_nearly_identical_rows_stay_on_sphere_and_near_formula():
    a = unit_rows(3, 6, seed=11)
    b = F.normalize(a + 1e-5 * unit_rows(3, 6, seed=12), dim=-1)    # θ ≈ 1e-5: the chord fallback
    out = slerp(a, b, 0.3)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(out, 0.7 * a + 0.3 * b, atol=1e-9, rtol=0)    # arc ≈ chord at θ ≈ 1e-5


# ----------------------------------------------------------------- m²-Mix end points
def test_m2mix_end_points_reduce_to_clip_half_plus_in_modal_half():
    """λ=0: h = I, so the text→h half is CLIP's text→image CE and the image→h half is in-modal
    (image vs other images, own text as positive). λ=1: h = T, mirror image."""
    I, T = unit_rows(9, 5, seed=13), unit_rows(9, 5, seed=14)
    s, n = 7.0, 9
    labels, eye = torch.arange(n), torch.eye(n, dtype=torch.bool)
    positive = torch.diag((I * T).sum(-1))
    ce = lambda logits: F.cross_entropy(s * logits, labels)
    at_zero = 0.5 * (ce(torch.where(eye, positive, I @ I.T)) + ce(T @ I.T))
    at_one = 0.5 * (ce(I @ T.T) + ce(torch.where(eye, positive, T @ T.T)))
    assert_close_rel(m2mix_loss(I, T, s, 0.0), at_zero, 1e-12)
    assert_close_rel(m2mix_loss(I, T, s, 1.0), at_one, 1e-12)
    # λ → 0, 1: continuous, |dL/dλ| is O(s·θ) so λ = 1e-7 moves the loss by < 1e-5.
    assert_close_rel(m2mix_loss(I, T, s, 1e-7), at_zero, 1e-5)
    assert_close_rel(m2mix_loss(I, T, s, 1 - 1e-7), at_one, 1e-5)


def test_m2mix_closed_form_for_orthogonal_pairs():
    """I_i = e_i, T_i = cos φ e_i + sin φ e_{N+i}: every off-diagonal logit is 0 and every positive
    is s·cos φ, so each row's CE is log(1 + (N−1)·exp(−s cos φ)), for every λ."""
    n, phi, s = 6, 1.1, 5.0
    basis = torch.eye(2 * n, dtype=torch.float64)
    I = basis[:n]
    T = math.cos(phi) * basis[:n] + math.sin(phi) * basis[n:]
    expected = math.log(1 + (n - 1) * math.exp(-s * math.cos(phi)))
    for lam in (0.0, 1e-7, 0.4, 1.0):
        assert abs(float(m2mix_loss(I, T, s, lam)) - expected) < 1e-12


# ----------------------------------------------------------------- composition
def test_objective_composes_weighted_terms_and_skips_zero_weights():
    I, T = unit_rows(8, 6, seed=15), unit_rows(8, 6, seed=16)
    s = torch.tensor(12.0, dtype=torch.float64)
    pretrain = ContrastiveObjective(LossConfig(cyclip_in_modal=0.25, cyclip_cross_modal=0.5), seed=0)(I, T, s)
    assert set(pretrain) == {"loss", "clip", "cyclip_in", "cyclip_cross"}
    c_in, c_cross = naive_cyclip(I, T)
    assert_close_rel(pretrain["loss"], naive_clip(I, T, s) + 0.25 * c_in + 0.5 * c_cross, 1e-10)

    cfg = LossConfig(m2mix_weight=0.01, vmix_weight=0.1, lmix_weight=0.2, vlmix_weight=0.3, m2mix_logit_scale=1 / 0.07)
    finetune = ContrastiveObjective(cfg, seed=0)(I, T, s, lam=0.3)
    assert set(finetune) == {"loss", "clip", "m2mix", "vmix", "lmix", "vlmix"}
    expected = (naive_clip(I, T, s) + 0.01 * naive_m2mix(I, T, s, 0.3, 1 / 0.07)
                + 0.1 * naive_unimodal(I, T, s, 0.3, True, False) + 0.2 * naive_unimodal(I, T, s, 0.3, False, True)
                + 0.3 * naive_unimodal(I, T, s, 0.3, True, True))
    assert_close_rel(finetune["loss"], expected, 1e-10)
    assert set(ContrastiveObjective(LossConfig(), seed=0)(I, T, s)) == {"loss", "clip"}
    with pytest.raises(ValueError):
        LossConfig(m2mix_weight=-1.0).validate()


M2MIX = LossConfig(m2mix_weight=0.02, m2mix_alpha=0.5)


def assert_beta_moments(draws, alpha):
    """Sample mean/variance of Beta(α, α) draws within 5 standard errors of the closed form: mean 1/2,
    σ² = 1/(4(2α+1)), μ₄ = 3/(16(2α+1)(2α+3)) (Beta kurtosis); SE(mean) = σ/√n, SE(s²) ≈ √((μ₄ − σ⁴)/n).
    A correct sampler fails with probability < 1e-6; α off by 20% misses by many SEs at n = 20000."""
    x, n = np.asarray(draws, dtype=np.float64), len(draws)
    var, mu4 = 1 / (4 * (2 * alpha + 1)), 3 / (16 * (2 * alpha + 1) * (2 * alpha + 3))
    assert ((x >= 0) & (x <= 1)).all()
    assert abs(x.mean() - 0.5) < 5 * math.sqrt(var / n)
    assert abs(x.var(ddof=1) - var) < 5 * math.sqrt((mu4 - var ** 2) / n)


def test_lambda_draws_follow_a_seeded_numpy_generator_independent_of_torch():
    reference = np.random.default_rng(123)    # the uninterrupted sequence
    expected = [float(reference.beta(0.5, 0.5)) for _ in range(6)]
    runs = []
    for torch_seed in (0, 1):    # torch's global RNG must change nothing, and must not be consumed
        torch.manual_seed(torch_seed)
        before = torch.get_rng_state()
        objective = ContrastiveObjective(M2MIX, seed=123)
        runs.append([objective.draw_lambda()["m2mix"] for _ in range(6)])
        assert torch.equal(torch.get_rng_state(), before)
    assert runs[0] == runs[1] == expected    # same seed (every rank) → same λ, no collective
    assert ContrastiveObjective(M2MIX, seed=124).draw_lambda()["m2mix"] != expected[0]


def test_lambda_state_dict_round_trip_continues_the_exact_sequence():
    reference = np.random.default_rng(5)
    expected = [float(reference.beta(0.5, 0.5)) for _ in range(8)]
    objective = ContrastiveObjective(M2MIX, seed=5)
    first = [objective.draw_lambda()["m2mix"] for _ in range(3)]
    state = objective.state_dict()
    objective.draw_lambda()    # the saved dict must not alias the live generator
    # The trainer stores it with torch.save and reads it with weights_only=True; JSON must work too.
    buffer = io.BytesIO()
    torch.save({"objective": state}, buffer)
    buffer.seek(0)
    for restored in (torch.load(buffer, weights_only=True)["objective"], json.loads(json.dumps(state))):
        resumed = ContrastiveObjective(M2MIX, seed=999)
        resumed.load_state_dict(restored)
        assert first + [resumed.draw_lambda()["m2mix"] for _ in range(5)] == expected
        assert resumed.state_dict()["steps"] == 8
    with pytest.raises(ValueError, match="older code version"):
        resumed.load_state_dict({"lambda_generator": torch.zeros(5056, dtype=torch.uint8), "steps": 3})



# ----------------------------------------------------------------- reference knobs (docs/METHODS.md)
def test_per_term_lambdas_are_independent_draws_with_their_own_alpha():
    cfg = LossConfig(m2mix_weight=0.02, vmix_weight=0.05, vlmix_weight=0.1, m2mix_alpha=0.5, vmix_alpha=2.0,
                     vlmix_alpha=0.2)
    draws = [ContrastiveObjective(cfg, seed=7).draw_lambda() for _ in range(1)][0]
    assert set(draws) == {"m2mix", "vmix", "vlmix", "mix_weight_factor"}    # lmix is off: no draw
    # Reference: the same numpy generator, the three Beta draws in term order m2mix, vmix, vlmix.
    gen = np.random.default_rng(7)
    expected = [float(gen.beta(alpha, alpha)) for alpha in (0.5, 2.0, 0.2)]
    assert [draws["m2mix"], draws["vmix"], draws["vlmix"]] == expected
    assert len(set(expected)) == 3
    # The objective uses each term's own λ.
    I, T = unit_rows(6, 5, seed=31), unit_rows(6, 5, seed=32)
    s = torch.tensor(10.0, dtype=torch.float64)
    got = ContrastiveObjective(cfg, seed=0)(I, T, s, lam=draws)["loss"]
    want = (naive_clip(I, T, s) + 0.02 * naive_m2mix(I, T, s, draws["m2mix"])
            + 0.05 * naive_unimodal(I, T, s, draws["vmix"], True, False)
            + 0.1 * naive_unimodal(I, T, s, draws["vlmix"], True, True))
    assert_close_rel(got, want, 1e-10)
    # Each term's draws follow its own α (a shared α would fail the moments of the other two).
    obj = ContrastiveObjective(cfg, seed=1)
    many = [obj.draw_lambda() for _ in range(20000)]
    for term, alpha in (("m2mix", 0.5), ("vmix", 2.0), ("vlmix", 0.2)):
        assert_beta_moments([d[term] for d in many], alpha)


def test_inverse_epoch_schedule_divides_every_mixing_weight_by_epoch_plus_one():
    cfg = LossConfig(m2mix_weight=0.02, lmix_weight=0.05, mix_weight_schedule="inverse_epoch", schedule_epoch_steps=3)
    objective = ContrastiveObjective(cfg, seed=0)
    factors = [objective.draw_lambda()["mix_weight_factor"] for _ in range(7)]
    assert factors == [1, 1, 1, 1 / 2, 1 / 2, 1 / 2, 1 / 3]    # epochs 0,0,0,1,1,1,2 by hand
    # The 5th step (epoch 1): CLIP + ½·(0.02·m²-Mix + 0.05·L-Mix); CLIP is never scaled.
    I, T = unit_rows(6, 5, seed=33), unit_rows(6, 5, seed=34)
    s = torch.tensor(8.0, dtype=torch.float64)
    draw = {"m2mix": 0.3, "lmix": 0.6, "mix_weight_factor": 0.5}
    want = naive_clip(I, T, s) + 0.5 * (0.02 * naive_m2mix(I, T, s, 0.3) + 0.05 * naive_unimodal(I, T, s, 0.6, False, True))
    assert_close_rel(objective(I, T, s, lam=draw)["loss"], want, 1e-10)
    # The step count is checkpointed: a resumed objective continues at epoch 2.
    resumed = ContrastiveObjective(cfg, seed=0)
    resumed.load_state_dict(objective.state_dict())
    assert resumed.draw_lambda()["mix_weight_factor"] == 1 / 3
    with pytest.raises(ValueError, match="schedule_epoch_steps"):
        ContrastiveObjective(LossConfig(mix_weight_schedule="inverse_epoch"), seed=0)  # checked where it is used
    with pytest.raises(ValueError, match="mix_weight_schedule"):
        LossConfig(mix_weight_schedule="cosine").validate()


def test_fixed_clip_scale_and_separate_mix_scale_by_hand():
    # Two orthonormal pairs (I = T = e1, e2): CLIP logits are s on the diagonal and 0 off it, so each
    # cross-entropy is log(1 + e^{-s}). At the fixed s = 2: log(1 + e^{-2}) = 0.126928011...
    I = T = torch.eye(2, dtype=torch.float64)
    learned = torch.tensor([50.0], dtype=torch.float64, requires_grad=True)
    cfg = LossConfig(clip_logit_scale=2.0)
    out = ContrastiveObjective(cfg, seed=0)(I, T, learned)
    assert abs(out["loss"].item() - 0.12692801104297263) < 1e-14
    (grad,) = torch.autograd.grad(out["loss"], learned)
    assert grad is not None and float(grad.abs().max()) == 0.0    # a zero gradient, not None
    # m²-Mix with I_i = T_i: h_i = I_i for every λ, so its logits equal CLIP's and its cross-entropies are
    # log(1 + e^{-s₂}) at the *mix* scale s₂ = 1/0.07 while CLIP stays at the fixed s = 2.
    cfg = LossConfig(clip_logit_scale=2.0, m2mix_weight=0.5, m2mix_logit_scale=1 / 0.07)
    out = ContrastiveObjective(cfg, seed=0)(I, T, learned, lam=0.4)
    assert abs(out["m2mix"].item() - math.log1p(math.exp(-1 / 0.07))) < 1e-15
    assert abs(out["loss"].item() - (math.log1p(math.exp(-2)) + 0.5 * math.log1p(math.exp(-1 / 0.07)))) < 1e-14
    # Without a fixed scale the learned one is used (and gets a gradient).
    out = ContrastiveObjective(LossConfig(), seed=0)(I, T, learned / 10)
    assert abs(out["loss"].item() - math.log1p(math.exp(-5))) < 1e-14


def test_cyclip_reference_batch_scales_lambda_by_reference_over_global_batch():
    I, T = unit_rows(8, 6, seed=41), unit_rows(8, 6, seed=42)
    s = torch.tensor(12.0, dtype=torch.float64)
    c_in, c_cross = naive_cyclip(I, T)
    cfg = LossConfig(cyclip_in_modal=0.25, cyclip_cross_modal=0.5, cyclip_reference_batch=512)
    assert cfg.cyclip_factor(8) == 64 and cfg.cyclip_factor(32768) == 1 / 64
    got = ContrastiveObjective(cfg, seed=0)(I, T, s)["loss"]
    assert_close_rel(got, naive_clip(I, T, s) + 64 * (0.25 * c_in + 0.5 * c_cross), 1e-10)
    # Written as N_ref × (mean over the N² pairs): the same number.
    mean_in = sum((I[i] @ I[j] - T[i] @ T[j]) ** 2 for i in range(8) for j in range(8)) / 64
    mean_cross = sum((I[i] @ T[j] - I[j] @ T[i]) ** 2 for i in range(8) for j in range(8)) / 64
    assert_close_rel(got, naive_clip(I, T, s) + 512 * (0.25 * mean_in + 0.5 * mean_cross), 1e-10)
    with pytest.raises(ValueError):
        LossConfig(cyclip_reference_batch=0).validate()
