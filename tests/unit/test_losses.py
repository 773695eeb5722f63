"""Math of training/losses.py: weightings, the KL identity, v->eps, schedules, gates, the composed loss."""
import math

import pytest
import torch
from diffusers import DDPMScheduler

from training.losses import (
    WEIGHTINGS,
    DiffusionLoss,
    LearnedWeighting,
    LossConfig,
    gate,
    kl_weight,
    min_snr_weight,
    snr,
    teacher_active,
    teacher_lambda,
    v_to_epsilon,
    weight_table,
)


def sd_scheduler(**kw):
    """Stable Diffusion's training schedule (scaled-linear betas, 1000 steps)."""
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, **kw)


SCHEDULES = {
    "scaled_linear": sd_scheduler(),
    "linear": DDPMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
}


# ------------------------------------------------------------------ weightings

@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("name", WEIGHTINGS)
def test_every_weighting_has_mean_one(name, schedule):
    w = weight_table(name, SCHEDULES[schedule].alphas_cumprod)
    assert w.shape == (1000,) and w.dtype == torch.float32
    assert torch.isfinite(w).all() and (w > 0).all()
    assert w.double().mean().item() == pytest.approx(1.0, abs=1e-5)


def test_weightings_differ_and_have_the_expected_shape_over_t():
    a = SCHEDULES["scaled_linear"].alphas_cumprod
    tables = {n: weight_table(n, a) for n in WEIGHTINGS}
    assert torch.equal(tables["uniform"], torch.ones(1000))
    assert torch.equal(tables["learned"], tables["uniform"])  # the learned part lives in LearnedWeighting
    # min-SNR and P2 down-weight the easy low-noise steps; the KL weight is largest there.
    assert tables["min_snr"][0] < tables["min_snr"][999]
    assert tables["p2"][0] < tables["p2"][999]
    assert tables["kl"][1] > tables["kl"][999]


def test_min_snr_is_min_snr_gamma_over_snr_before_normalising():
    a = SCHEDULES["scaled_linear"].alphas_cumprod.double()
    s = a / (1 - a)
    raw = min_snr_weight(a, gamma=5.0)
    # Where SNR < 5 (high noise) the weight is exactly 1; where SNR > 5 it is 5 / SNR.
    low = s < 5
    assert low.any() and (~low).any()
    assert torch.allclose(raw[low], torch.ones_like(raw[low]))
    assert torch.allclose(raw[~low], 5.0 / s[~low])
    table = weight_table("min_snr", a, min_snr_gamma=5.0)
    assert torch.allclose(table.double(), raw / raw.mean(), rtol=1e-6)


def test_p2_follows_choi_et_al():
    a = SCHEDULES["linear"].alphas_cumprod.double()
    raw = (1.0 + a / (1 - a)) ** -0.5
    table = weight_table("p2", a, p2_gamma=0.5, p2_k=1.0)
    assert torch.allclose(table.double(), raw / raw.mean(), rtol=1e-6)


def test_snr_definition():
    a = torch.tensor([0.2, 0.5, 0.8])
    assert torch.allclose(snr(a), torch.tensor([0.25, 1.0, 4.0]))


def _ddpm_reverse_kl(betas, t, x0, eps, eps_hat):
    """KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) summed over elements, built from betas.

    q is the DDPM posterior (Ho et al. 2020, eqs. 6-7); p is the model's reverse Gaussian
    with the same (posterior) variance and its mean from the x0 predicted by eps_hat.
    Computed with the general closed form for two Gaussians, log-variance terms included.
    """
    alphas = 1 - betas
    abar = torch.cumprod(alphas, 0)
    abar_t, abar_prev, beta_t, alpha_t = abar[t], abar[t - 1], betas[t], alphas[t]
    x_t = abar_t.sqrt() * x0 + (1 - abar_t).sqrt() * eps

    def posterior_mean(x0_):
        return (beta_t * abar_prev.sqrt() / (1 - abar_t)) * x0_ + (alpha_t.sqrt() * (1 - abar_prev) / (1 - abar_t)) * x_t

    var_q = beta_t * (1 - abar_prev) / (1 - abar_t)
    var_p = var_q
    mean_q = posterior_mean(x0)
    x0_hat = (x_t - (1 - abar_t).sqrt() * eps_hat) / abar_t.sqrt()
    mean_p = posterior_mean(x0_hat)
    kl = 0.5 * (torch.log(var_p / var_q) + (var_q + (mean_q - mean_p) ** 2) / var_p - 1)
    return kl.sum()


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_kl_weight_equals_independent_gaussian_kl(schedule):
    betas = SCHEDULES[schedule].betas.double()
    abar = torch.cumprod(1 - betas, 0)
    w = kl_weight(abar)
    g = torch.Generator().manual_seed(0)
    for t in (1, 2, 10, 250, 500, 900, 999):
        x0 = torch.randn(4, 8, 8, generator=g, dtype=torch.float64)
        eps = torch.randn(4, 8, 8, generator=g, dtype=torch.float64)
        eps_hat = eps + 0.3 * torch.randn(4, 8, 8, generator=g, dtype=torch.float64)
        expected = _ddpm_reverse_kl(betas, t, x0, eps, eps_hat)
        got = w[t] * ((eps - eps_hat) ** 2).sum()
        assert got.item() == pytest.approx(expected.item(), rel=1e-8), f"t={t}"


def test_kl_weight_at_t0_takes_t1_value_and_table_is_proportional():
    a = SCHEDULES["scaled_linear"].alphas_cumprod
    raw = kl_weight(a)
    assert raw[0] == raw[1]
    table = weight_table("kl", a)
    assert table[0] == table[1]
    assert torch.allclose(table.double(), raw / raw.mean(), rtol=1e-6)
    # The float32 diffusers schedule gives the same weights as the exact float64 one.
    exact = kl_weight(torch.cumprod(1 - SCHEDULES["scaled_linear"].betas.double(), 0))
    assert torch.allclose(raw, exact, rtol=1e-3)


def test_bad_inputs_are_named():
    a = SCHEDULES["linear"].alphas_cumprod
    with pytest.raises(ValueError, match="unknown weighting 'snr'"):
        weight_table("snr", a)
    with pytest.raises(ValueError, match="1-D"):
        weight_table("kl", a[None])
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        weight_table("min_snr", torch.cat([a[:-1], torch.zeros(1)]))
    with pytest.raises(ValueError, match="teacher_cutoff"):
        LossConfig(teacher_cutoff=1.5)
    with pytest.raises(ValueError, match="unknown teacher_gate"):
        LossConfig(teacher_gate="soft-ish")
    with pytest.raises(ValueError, match="unknown teacher_weighting 'learned'"):
        LossConfig(teacher_weighting="learned")


# ------------------------------------------------------------------ v-prediction

def test_v_to_epsilon_inverts_diffusers_get_velocity():
    sched = sd_scheduler(prediction_type="v_prediction")
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 4, 8, 8, generator=g)
    eps = torch.randn(5, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 300, 700, 999])
    x_t = sched.add_noise(x0, eps, t)
    v = sched.get_velocity(x0, eps, t)
    assert torch.allclose(v_to_epsilon(v, x_t, sched.alphas_cumprod, t), eps, atol=1e-5)
    half = v_to_epsilon(v.bfloat16(), x_t.bfloat16(), sched.alphas_cumprod, t)
    assert half.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="timesteps"):
        v_to_epsilon(v, x_t, sched.alphas_cumprod, t[:2])


# ------------------------------------------------------------------ teacher schedules

def test_none_and_constant_schedules():
    for step in (0, 10, 999):
        assert teacher_lambda("none", step, 1000) == 0.0
        assert not teacher_active("none", step, 1000)
        assert teacher_lambda("constant", step, 1000, lambda0=0.7) == 0.7


def test_cosine_reaches_exactly_zero_at_cutoff_and_stays_there():
    kw = dict(lambda0=0.5, cutoff=0.3)
    assert teacher_lambda("cosine", 0, 1000, **kw) == 0.5
    assert teacher_lambda("cosine", 150, 1000, **kw) == pytest.approx(0.25)
    assert teacher_lambda("cosine", 75, 1000, **kw) == pytest.approx(0.25 * (1 + math.cos(math.pi / 4)))
    assert 0 < teacher_lambda("cosine", 299, 1000, **kw) < 1e-4
    assert teacher_active("cosine", 299, 1000, **kw)
    for step in (300, 301, 650, 999, 5000):
        assert teacher_lambda("cosine", step, 1000, **kw) == 0.0
        assert not teacher_active("cosine", step, 1000, **kw)
    values = [teacher_lambda("cosine", s, 1000, **kw) for s in range(300)]
    assert all(a > b for a, b in zip(values, values[1:]))  # strictly decreasing before the cutoff


def test_cosine_recomputes_over_a_larger_total_on_resume():
    assert teacher_lambda("cosine", 300, 1000) == 0.0
    assert teacher_lambda("cosine", 300, 2000) == pytest.approx(0.25)


def test_cyclical_has_four_linear_ramps_then_holds():
    total, kw = 1000, dict(lambda0=0.5, cycles=4, ramp_ratio=0.5)
    lam = [teacher_lambda("cyclical", s, total, **kw) for s in range(total)]
    starts = [s for s in range(total) if lam[s] == 0.0]
    assert starts == [0, 250, 500, 750]
    for c in starts:
        assert lam[c + 25] == pytest.approx(0.1)  # 25 steps into a 125-step ramp: 0.2 * lambda0
        assert lam[c + 100] == pytest.approx(0.4)
        assert all(v == 0.5 for v in lam[c + 125 : c + 250])  # held for the rest of the cycle
        ramp = lam[c : c + 126]
        assert all(b > a for a, b in zip(ramp, ramp[1:]))
    assert not teacher_active("cyclical", 250, total, **kw)
    assert teacher_active("cyclical", 251, total, **kw)


def test_schedule_errors():
    with pytest.raises(ValueError, match="unknown teacher schedule 'linear'"):
        teacher_lambda("linear", 0, 10)
    with pytest.raises(ValueError, match="total_steps"):
        teacher_lambda("cosine", 0, 0)
    with pytest.raises(ValueError, match="teacher_ramp_ratio"):
        teacher_lambda("cyclical", 0, 10, ramp_ratio=0)


# ------------------------------------------------------------------ gates

def test_soft_gate_uses_a_tenth_of_the_teacher_median():
    e_s = torch.tensor([1.0, 2.0, 0.5, 4.0, 3.0])
    e_t = torch.tensor([2.0, 1.0, 0.5, 3.0, 1.5])  # median 1.5 -> tau = 0.15
    got = gate(e_s, e_t, "soft")
    expected = 1 / (1 + torch.exp(-(e_s - e_t) / 0.15))
    assert torch.allclose(got, expected)
    assert got[2] == 0.5  # equal errors: undecided
    assert got[1] > 0.99 and got[0] < 0.01  # teacher better -> distil; teacher worse -> do not
    # Scaling every error scales tau with it: the gate does not depend on the loss scale.
    assert torch.allclose(gate(10 * e_s, 10 * e_t, "soft"), got)
    # An even batch takes the usual median (mean of the two middle values).
    assert torch.allclose(gate(torch.tensor([1.2, 0.0]), torch.tensor([1.0, 0.0]), "soft", tau_scale=1.0)[0],
                          torch.sigmoid(torch.tensor(0.2 / 0.5)))


def test_hard_and_none_gates_and_degenerate_tau():
    e_s = torch.tensor([1.0, 2.0, 0.5])
    e_t = torch.tensor([2.0, 1.0, 0.5])
    assert torch.equal(gate(e_s, e_t, "hard"), torch.tensor([0.0, 1.0, 0.0]))
    assert torch.equal(gate(e_s, e_t, "none"), torch.ones(3))
    zero = torch.zeros(3)
    assert torch.isfinite(gate(zero, zero, "soft")).all()  # tau clamped above 0


def test_gate_is_detached():
    e_s = torch.tensor([1.0, 2.0], requires_grad=True)
    e_t = torch.tensor([2.0, 1.0], requires_grad=True)
    for kind in ("none", "soft", "hard"):
        assert not gate(e_s, e_t, kind).requires_grad


# ------------------------------------------------------------------ learned weighting

def test_learned_weighting_starts_at_zero_and_is_trainable():
    a = SCHEDULES["scaled_linear"].alphas_cumprod
    lw = LearnedWeighting(a)
    t = torch.tensor([0, 500, 999])
    assert torch.equal(lw(t), torch.zeros(3))
    params = [p for p in lw.parameters() if p.requires_grad]
    assert params
    # Same seed -> same Fourier features, so a resumed run rebuilds the identical module.
    assert torch.equal(LearnedWeighting(a).freqs, lw.freqs)
    assert set(lw.state_dict()) >= {"freqs", "phases"} and "scaled_log_snr" not in lw.state_dict()


# ------------------------------------------------------------------ the composed loss

def _batch(seed=0, b=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(b, 4, 8, 8, generator=g)
    eps_s = eps + 0.5 * torch.randn(b, 4, 8, 8, generator=g)
    eps_t = eps + 0.3 * torch.randn(b, 4, 8, 8, generator=g)
    t = torch.tensor([3, 200, 640, 999][:b])
    return eps.to(dtype), eps_s.to(dtype).requires_grad_(), eps_t.to(dtype).requires_grad_(), t


def test_full_loss_recomputed_by_hand():
    a = SCHEDULES["scaled_linear"].alphas_cumprod
    cfg = LossConfig(weighting="p2", teacher_weighting="kl", teacher_schedule="constant", teacher_lambda0=0.4,
                     teacher_gate="soft", teacher_gate_tau_scale=0.2)
    loss_fn = DiffusionLoss(cfg, a)
    eps, eps_s, eps_t, t = _batch()
    loss, logs = loss_fn(eps, eps_s, eps_t, t, step=10, total_steps=100)

    # By hand, sample by sample, from the raw (un-normalised) weights.
    s = (a.double() / (1 - a.double()))
    w_data = (1 + s) ** -1.0
    w_data = w_data / w_data.mean()
    w_kl = torch.cat([0.5 * (s[:1] / s[1:2] - 1), 0.5 * (s[:-1] / s[1:] - 1)])
    w_kl = w_kl / w_kl.mean()
    e_s = [((eps_s[i] - eps[i]) ** 2).mean().item() for i in range(4)]
    e_t = [((eps_t[i] - eps[i]) ** 2).mean().item() for i in range(4)]
    kd = [((eps_t[i] - eps_s[i]) ** 2).mean().item() for i in range(4)]
    middle = sorted(e_t)[1:3]  # even batch: the median is the mean of the two middle values
    tau = 0.2 * (middle[0] + middle[1]) / 2
    g = [1 / (1 + math.exp(-(e_s[i] - e_t[i]) / tau)) for i in range(4)]
    data = sum(w_data[t[i]].item() * e_s[i] for i in range(4)) / 4
    teacher = sum(g[i] * w_kl[t[i]].item() * kd[i] for i in range(4)) / 4
    assert logs["loss/data"] == pytest.approx(data, rel=1e-5)
    assert logs["loss/teacher"] == pytest.approx(teacher, rel=1e-5)
    assert loss.item() == pytest.approx(data + 0.4 * teacher, rel=1e-5)
    assert logs["loss/total"] == pytest.approx(loss.item())
    assert logs["lambda"] == 0.4
    assert logs["gate_rate"] == pytest.approx(sum(g) / 4, rel=1e-5)
    assert logs["weight_mean"] == pytest.approx(sum(w_data[t[i]].item() for i in range(4)) / 4, rel=1e-5)
    per_sample = loss_fn.last_per_sample
    assert per_sample.shape == (4,) and not per_sample.requires_grad
    assert per_sample.mean().item() == pytest.approx(loss.item(), rel=1e-5)
    assert all(isinstance(v, float) for v in logs.values())


def test_no_gradient_reaches_the_teacher_or_through_the_gate():
    a = SCHEDULES["scaled_linear"].alphas_cumprod
    # A wide tau keeps the soft gate mid-way, where a gradient through it would be large.
    cfg = LossConfig(weighting="uniform", teacher_weighting="min_snr", teacher_schedule="constant",
                     teacher_lambda0=0.5, teacher_gate="soft", teacher_gate_tau_scale=3.0)
    loss_fn = DiffusionLoss(cfg, a)
    eps, eps_s, eps_t, t = _batch()
    loss, logs = loss_fn(eps, eps_s, eps_t, t, step=0, total_steps=10)
    assert 0.2 < logs["gate_rate"] < 0.8
    loss.backward()
    assert eps_t.grad is None
    # Gradient w.r.t. eps_S with the gate held constant: if it flowed through sigmoid(e_S ...),
    # this analytic gradient would not match.
    n = eps_s[0].numel()
    e_s = ((eps_s - eps) ** 2).flatten(1).mean(1).detach()
    e_t = ((eps_t - eps) ** 2).flatten(1).mean(1).detach()
    g = gate(e_s, e_t, "soft", tau_scale=3.0)
    w_kd = weight_table("min_snr", a)[t]
    coef = (g * w_kd * 0.5).view(-1, 1, 1, 1)
    expected = (2 * (eps_s - eps) + coef * 2 * (eps_s - eps_t)).detach() / (n * 4)
    assert torch.allclose(eps_s.grad, expected, atol=1e-7)


def test_teacher_skipped_when_not_needed():
    a = SCHEDULES["scaled_linear"].alphas_cumprod
    loss_fn = DiffusionLoss(LossConfig(), a)  # dynamic-kl: cosine to zero at 30% of training
    assert loss_fn.needs_teacher(0, 100) and loss_fn.needs_teacher(29, 100)
    assert not loss_fn.needs_teacher(30, 100)
    eps, eps_s, _, t = _batch()
    loss, logs = loss_fn(eps, eps_s, None, t, step=50, total_steps=100)
    assert logs["lambda"] == 0.0 and logs["loss/teacher"] == 0.0 and logs["gate_rate"] == 0.0
    assert loss.item() == pytest.approx(logs["loss/data"])
    with pytest.raises(ValueError, match="needs_teacher"):
        loss_fn(eps, eps_s, None, t, step=0, total_steps=100)


def test_teacher_term_is_zero_when_teacher_equals_student():
    a = SCHEDULES["scaled_linear"].alphas_cumprod
    loss_fn = DiffusionLoss(LossConfig(teacher_schedule="constant", teacher_gate="none"), a)
    eps, eps_s, _, t = _batch()
    loss, logs = loss_fn(eps, eps_s, eps_s.detach().clone(), t, step=0, total_steps=10)
    assert logs["loss/teacher"] == 0.0 and logs["gate_rate"] == 1.0
    assert loss.item() == pytest.approx(logs["loss/data"])


def test_learned_weighting_adds_u_term_and_trains():
    a = SCHEDULES["scaled_linear"].alphas_cumprod
    loss_fn = DiffusionLoss(LossConfig(weighting="learned", teacher_schedule="none"), a)
    params = list(loss_fn.parameters())
    assert params and all(p.requires_grad for p in params)
    eps, eps_s, _, t = _batch()
    with torch.no_grad():  # move u(t) away from 0 to see both parts of w e^{-u} e + u
        loss_fn.learned.mlp[-1].bias.fill_(0.7)
    loss, logs = loss_fn(eps, eps_s, None, t, step=0, total_steps=10)
    e_s = ((eps_s - eps) ** 2).flatten(1).mean(1)
    assert loss.item() == pytest.approx((e_s * math.exp(-0.7) + 0.7).mean().item(), rel=1e-5)
    assert logs["learned_u_mean"] == pytest.approx(0.7)
    loss.backward()
    assert loss_fn.learned.mlp[-1].bias.grad is not None
    # d/du [e^{-u} e + u] = 1 - e^{-u} e, averaged over the batch.
    expected = (1 - math.exp(-0.7) * e_s.detach()).mean().item()
    assert loss_fn.learned.mlp[-1].bias.grad.item() == pytest.approx(expected, rel=1e-5)
    # Tables are recomputed from the config; only learned parameters go into a checkpoint.
    assert not any(k.endswith("weights") for k in loss_fn.state_dict())


def test_low_precision_inputs_give_a_float32_loss():
    a = SCHEDULES["scaled_linear"].alphas_cumprod
    loss_fn = DiffusionLoss(LossConfig(), a)
    eps, eps_s, eps_t, t = _batch(dtype=torch.bfloat16)
    loss, _ = loss_fn(eps, eps_s, eps_t, t.int(), step=0, total_steps=10)
    assert loss.dtype == torch.float32 and loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert eps_s.grad.dtype == torch.bfloat16


def test_loss_input_errors():
    loss_fn = DiffusionLoss(LossConfig(), SCHEDULES["linear"].alphas_cumprod)
    eps, eps_s, eps_t, t = _batch()
    with pytest.raises(ValueError, match="share a shape"):
        loss_fn(eps, eps_s[:2], eps_t, t, 0, 10)
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 1000\)"):
        loss_fn(eps, eps_s, eps_t, torch.tensor([0, 1, 2, 1000]), 0, 10)
    with pytest.raises(ValueError, match="integer indices"):
        loss_fn(eps, eps_s, eps_t, t.float(), 0, 10)
