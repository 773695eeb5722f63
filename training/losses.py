"""The training loss: timestep-weighted denoising error plus a gated, annealed KL to a weak teacher.

Notation (docs/design.md section 5): eps is the true noise, eps_S the student (UNet with the
adapter's context), eps_T the frozen teacher (the same UNet with its own CLIP context) on
the same x_t and t; SNR_t = abar_t / (1 - abar_t); e(x) is the per-sample mean squared error.

    loss = mean_b[ w(t_b) e(eps_S - eps) ]
         + lambda(step) * mean_b[ g_b * w_KD(t_b) * e(sg(eps_T) - eps_S) ]

Everything is in epsilon space (convert v-prediction outputs with `v_to_epsilon` first).
Each weighting, schedule and gate is a small pure function so that its math can be tested
on its own; `DiffusionLoss` only composes them. Timestep indices follow diffusers:
t = 0..T-1 indexes `scheduler.alphas_cumprod`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

WEIGHTINGS = ("uniform", "min_snr", "p2", "kl", "learned")
TEACHER_WEIGHTINGS = ("uniform", "min_snr", "p2", "kl")  # "learned" has no meaning for the teacher term
TEACHER_SCHEDULES = ("none", "constant", "cosine", "cyclical")
GATES = ("none", "soft", "hard")


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


def _check_alphas_cumprod(alphas_cumprod: Tensor) -> Tensor:
    """Validate a noise schedule and return it in float64 (SNR ratios near t=0 need the precision)."""
    if alphas_cumprod.ndim != 1 or alphas_cumprod.numel() < 2:
        raise ValueError(
            f"alphas_cumprod must be a 1-D tensor with one entry per timestep (at least 2), "
            f"got shape {tuple(alphas_cumprod.shape)}; pass scheduler.alphas_cumprod"
        )
    a = alphas_cumprod.detach().to(torch.float64)
    if not bool(((a > 0) & (a < 1)).all()):
        raise ValueError(
            "alphas_cumprod must lie strictly between 0 and 1 (SNR is infinite or zero otherwise); "
            "a zero-terminal-SNR schedule needs its last value clamped before use here"
        )
    return a


# ----------------------------------------------------------------------------------------
# Timestep weightings, all in epsilon space and un-normalised (float64, one value per t).
# ----------------------------------------------------------------------------------------

def snr(alphas_cumprod: Tensor) -> Tensor:
    """Signal-to-noise ratio SNR_t = abar_t / (1 - abar_t)."""
    return alphas_cumprod / (1 - alphas_cumprod)


def min_snr_weight(alphas_cumprod: Tensor, gamma: float = 5.0) -> Tensor:
    """Min-SNR-gamma (Hang et al. 2023), epsilon space: min(SNR_t, gamma) / SNR_t."""
    if gamma <= 0:
        raise ValueError(f"min_snr_gamma must be > 0, got {gamma}")
    s = snr(_check_alphas_cumprod(alphas_cumprod))
    return s.clamp(max=gamma) / s


def p2_weight(alphas_cumprod: Tensor, gamma: float = 1.0, k: float = 1.0) -> Tensor:
    """P2 weighting (Choi et al. 2022) on the epsilon MSE: 1 / (k + SNR_t)^gamma."""
    if k <= 0 or gamma < 0:
        raise ValueError(f"p2 needs p2_k > 0 and p2_gamma >= 0, got k={k}, gamma={gamma}")
    return (k + snr(_check_alphas_cumprod(alphas_cumprod))) ** -gamma


def kl_weight(alphas_cumprod: Tensor) -> Tensor:
    """DDPM reverse-step KL as an epsilon-MSE weight (Ho et al. 2020, eq. 12 with sigma^2 = beta-tilde).

    w_KL(t) = beta_t / (2 alpha_t (1 - abar_{t-1})) = 0.5 (SNR_{t-1} / SNR_t - 1).
    At t = 0, abar_{-1} = 1 makes SNR_{-1} infinite (the decoder term, not a Gaussian KL),
    so t = 0 takes the t = 1 value.
    """
    s = snr(_check_alphas_cumprod(alphas_cumprod))
    w = 0.5 * (s[:-1] / s[1:] - 1)  # entries for t = 1..T-1
    return torch.cat([w[:1], w])


def weight_table(
    name: str,
    alphas_cumprod: Tensor,
    *,
    min_snr_gamma: float = 5.0,
    p2_gamma: float = 1.0,
    p2_k: float = 1.0,
) -> Tensor:
    """[T] float32 weights for t = 0..T-1, normalised to mean 1 over t.

    Normalising keeps every arm's loss on the same scale, so one learning rate serves all.
    "learned" returns the uniform base table; its learned part is `LearnedWeighting`.
    """
    _check_choice("weighting", name, WEIGHTINGS)
    a = _check_alphas_cumprod(alphas_cumprod)
    if name in ("uniform", "learned"):
        w = torch.ones_like(a)
    elif name == "min_snr":
        w = min_snr_weight(a, min_snr_gamma)
    elif name == "p2":
        w = p2_weight(a, p2_gamma, p2_k)
    else:
        w = kl_weight(a)
    return (w / w.mean()).to(torch.float32)


def v_to_epsilon(v: Tensor, x_t: Tensor, alphas_cumprod: Tensor, timesteps: Tensor) -> Tensor:
    """Convert a v-prediction to epsilon: eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t.

    With x_t = sqrt(abar) x0 + sqrt(1-abar) eps and v = sqrt(abar) eps - sqrt(1-abar) x0
    (Salimans & Ho 2022, diffusers' get_velocity). Returned in v's dtype.
    """
    if v.shape != x_t.shape:
        raise ValueError(f"v and x_t must have the same shape, got {tuple(v.shape)} and {tuple(x_t.shape)}")
    if timesteps.shape != (v.shape[0],):
        raise ValueError(f"timesteps must have shape [B]=({v.shape[0]},), got {tuple(timesteps.shape)}")
    abar = alphas_cumprod.to(device=v.device, dtype=torch.float32)[timesteps.to(v.device)]
    abar = abar.view(-1, *([1] * (v.ndim - 1)))
    eps = abar.sqrt() * v.float() + (1 - abar).sqrt() * x_t.float()
    return eps.to(v.dtype)


# ----------------------------------------------------------------------------------------
# Teacher schedules lambda(step) and gates g.
# ----------------------------------------------------------------------------------------

def _check_schedule_params(lambda0: float, cutoff: float, cycles: int, ramp_ratio: float) -> None:
    if lambda0 < 0:
        raise ValueError(f"teacher_lambda0 must be >= 0, got {lambda0}")
    if not 0 <= cutoff <= 1:
        raise ValueError(f"teacher_cutoff is a fraction of training and must be in [0, 1], got {cutoff}")
    if int(cycles) != cycles or cycles < 1:
        raise ValueError(f"teacher_cycles must be a whole number >= 1, got {cycles}")
    if not 0 < ramp_ratio <= 1:
        raise ValueError(f"teacher_ramp_ratio is a fraction of a cycle and must be in (0, 1], got {ramp_ratio}")


def teacher_lambda(
    schedule: str,
    step: int,
    total_steps: int,
    *,
    lambda0: float = 0.5,
    cutoff: float = 0.3,
    cycles: int = 4,
    ramp_ratio: float = 0.5,
) -> float:
    """Weight lambda of the teacher term at 0-based optimizer `step` of `total_steps`.

    - "none": 0.
    - "constant": lambda0.
    - "cosine": lambda0 * 0.5 * (1 + cos(pi * step / (cutoff * total))) for step < cutoff * total,
      then exactly 0 (the trainer stops running the teacher).
    - "cyclical" (Fu et al. 2019, "Cyclical Annealing Schedule", with a linear ramp):
      training is split into `cycles` equal cycles; within a cycle, at fraction
      tau = ((step * cycles) mod total) / total, lambda = lambda0 * min(1, tau / ramp_ratio):
      0 at the start of every cycle, a linear ramp to lambda0 over the first ramp_ratio
      of the cycle, then held. Steps past `total_steps` continue periodically.
    The schedule depends only on (step, total_steps), so a resumed run with a larger
    total simply recomputes it.
    """
    _check_choice("teacher schedule", schedule, TEACHER_SCHEDULES)
    _check_schedule_params(lambda0, cutoff, cycles, ramp_ratio)
    if total_steps < 1 or step < 0:
        raise ValueError(f"need total_steps >= 1 and step >= 0, got step={step}, total_steps={total_steps}")
    if schedule == "none":
        return 0.0
    if schedule == "constant":
        return float(lambda0)
    if schedule == "cosine":
        end = cutoff * total_steps
        if step >= end:
            return 0.0
        return float(lambda0 * 0.5 * (1 + math.cos(math.pi * step / end)))
    tau = ((step * int(cycles)) % total_steps) / total_steps  # integer modulo: exact cycle starts
    return float(lambda0 * min(1.0, tau / ramp_ratio))


def teacher_active(schedule: str, step: int, total_steps: int, **kw) -> bool:
    """False when lambda(step) is 0: the trainer then skips the teacher forward entirely."""
    return teacher_lambda(schedule, step, total_steps, **kw) > 0


def gate(student_err: Tensor, teacher_err: Tensor, kind: str, *, tau_scale: float = 0.1) -> Tensor:
    """[B] detached distillation gate: large where the teacher is closer to the true noise.

    - "none": 1.
    - "soft": sigmoid((e_S - e_T) / tau), tau = tau_scale * median_b(e_T), clamped > 0.
      Scaling tau by the teacher's typical error makes the gate independent of the loss scale.
      The median is the usual one (mean of the two middle values for an even batch),
      taken over this process's batch.
    - "hard": 1 where e_S > e_T, else 0.
    """
    _check_choice("teacher gate", kind, GATES)
    if student_err.ndim != 1 or student_err.shape != teacher_err.shape:
        raise ValueError(
            f"gate needs per-sample errors of shape [B], got {tuple(student_err.shape)} "
            f"and {tuple(teacher_err.shape)}"
        )
    e_s, e_t = student_err.detach().float(), teacher_err.detach().float()
    if kind == "none":
        return torch.ones_like(e_s)
    if kind == "hard":
        return (e_s > e_t).float()
    if tau_scale <= 0:
        raise ValueError(f"teacher_gate_tau_scale must be > 0, got {tau_scale}")
    tau = (tau_scale * torch.quantile(e_t, 0.5)).clamp(min=1e-12)
    return torch.sigmoid((e_s - e_t) / tau)


# ----------------------------------------------------------------------------------------
# Learned weighting and the composed loss.
# ----------------------------------------------------------------------------------------

class LearnedWeighting(nn.Module):
    """EDM2-style learned uncertainty u(t) (Karras et al. 2024, "Analyzing and Improving ...", sec. 5).

    A tiny MLP on fixed random Fourier features of log-SNR predicts u(t); the data term
    becomes w(t) exp(-u(t)) e + u(t). Minimising over u drives exp(u) to the expected
    weighted error at t, so every timestep contributes about equally. The last layer starts
    at zero, so u = 0 and the loss equals the base weighting at the start.
    """

    def __init__(self, alphas_cumprod: Tensor, num_features: int = 128, hidden: int = 64, seed: int = 0):
        super().__init__()
        log_snr = snr(_check_alphas_cumprod(alphas_cumprod)).log()
        # log-SNR spans roughly [-10, 10]; /8 brings it near [-1, 1] like EDM2's c_noise = ln(sigma)/4.
        self.register_buffer("scaled_log_snr", (log_snr / 8).to(torch.float32), persistent=False)
        # Frequencies and phases are drawn from a fixed seed and saved, so a resume is exact.
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_features, generator=g))
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_features, generator=g))
        self.mlp = nn.Sequential(nn.Linear(num_features, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, timesteps: Tensor) -> Tensor:
        """u(t) for each timestep index, shape [B], float32."""
        x = self.scaled_log_snr.to(timesteps.device)[timesteps]
        features = math.sqrt(2) * torch.cos(x[:, None] * self.freqs + self.phases)
        return self.mlp(features).squeeze(-1).float()


@dataclass
class LossConfig:
    """Every arm of the loss as a value; the defaults are the `dynamic-kl` preset."""

    weighting: str = "min_snr"  # data-term w(t): one of WEIGHTINGS ("learned" = uniform base + u(t))
    min_snr_gamma: float = 5.0
    p2_gamma: float = 1.0
    p2_k: float = 1.0
    teacher_schedule: str = "cosine"  # one of TEACHER_SCHEDULES
    teacher_weighting: str = "min_snr"  # w_KD(t): one of TEACHER_WEIGHTINGS
    teacher_lambda0: float = 0.5
    teacher_cutoff: float = 0.3  # cosine: fraction K of training after which lambda = 0
    teacher_cycles: int = 4  # cyclical
    teacher_ramp_ratio: float = 0.5  # cyclical
    teacher_gate: str = "soft"  # one of GATES
    teacher_gate_tau_scale: float = 0.1

    def __post_init__(self):
        _check_choice("weighting", self.weighting, WEIGHTINGS)
        _check_choice("teacher_weighting", self.teacher_weighting, TEACHER_WEIGHTINGS)
        _check_choice("teacher_schedule", self.teacher_schedule, TEACHER_SCHEDULES)
        _check_choice("teacher_gate", self.teacher_gate, GATES)
        _check_schedule_params(self.teacher_lambda0, self.teacher_cutoff, self.teacher_cycles, self.teacher_ramp_ratio)
        if self.min_snr_gamma <= 0 or self.p2_k <= 0 or self.p2_gamma < 0 or self.teacher_gate_tau_scale <= 0:
            raise ValueError(
                "need min_snr_gamma > 0, p2_k > 0, p2_gamma >= 0 and teacher_gate_tau_scale > 0, got "
                f"{self.min_snr_gamma}, {self.p2_k}, {self.p2_gamma}, {self.teacher_gate_tau_scale}"
            )


def _per_sample_mse(a: Tensor, b: Tensor) -> Tensor:
    """e(a - b): mean squared error over every axis but the batch, in float32, shape [B]."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


class DiffusionLoss(nn.Module):
    """Weighted epsilon-MSE plus the gated, annealed teacher KL term (docs/design.md section 5).

    Its only trainable parameters are those of `LearnedWeighting` (when weighting ==
    "learned"); the trainer gives them their own optimizer. The weight tables are
    non-persistent buffers: recomputed from the config, never stored in checkpoints.
    """

    def __init__(self, cfg: LossConfig, alphas_cumprod: Tensor):
        super().__init__()
        self.cfg = cfg
        table_kw = dict(min_snr_gamma=cfg.min_snr_gamma, p2_gamma=cfg.p2_gamma, p2_k=cfg.p2_k)
        self.register_buffer("data_weights", weight_table(cfg.weighting, alphas_cumprod, **table_kw), persistent=False)
        self.register_buffer(
            "teacher_weights", weight_table(cfg.teacher_weighting, alphas_cumprod, **table_kw), persistent=False
        )
        self.learned = LearnedWeighting(alphas_cumprod) if cfg.weighting == "learned" else None
        self.last_per_sample: Tensor | None = None  # [B] per-sample total loss of the last call, detached

    def _schedule_kw(self) -> dict:
        c = self.cfg
        return dict(lambda0=c.teacher_lambda0, cutoff=c.teacher_cutoff, cycles=c.teacher_cycles, ramp_ratio=c.teacher_ramp_ratio)

    def teacher_lambda(self, step: int, total_steps: int) -> float:
        return teacher_lambda(self.cfg.teacher_schedule, step, total_steps, **self._schedule_kw())

    def needs_teacher(self, step: int, total_steps: int) -> bool:
        """Whether the trainer must run the teacher at this step (lambda > 0)."""
        return teacher_active(self.cfg.teacher_schedule, step, total_steps, **self._schedule_kw())

    def _check_inputs(self, eps_true: Tensor, eps_student: Tensor, eps_teacher: Tensor | None, timesteps: Tensor):
        if eps_true.ndim < 2 or eps_student.shape != eps_true.shape:
            raise ValueError(
                f"eps_true and eps_student must share a shape [B, ...], got {tuple(eps_true.shape)} "
                f"and {tuple(eps_student.shape)}"
            )
        if eps_teacher is not None and eps_teacher.shape != eps_true.shape:
            raise ValueError(f"eps_teacher has shape {tuple(eps_teacher.shape)}, expected {tuple(eps_true.shape)}")
        if timesteps.shape != (eps_true.shape[0],) or timesteps.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"timesteps must be integer indices of shape [B]=({eps_true.shape[0]},), "
                f"got {timesteps.dtype} {tuple(timesteps.shape)}"
            )
        num_t = self.data_weights.numel()
        if int(timesteps.min()) < 0 or int(timesteps.max()) >= num_t:
            raise ValueError(f"timesteps must lie in [0, {num_t}), got {timesteps.tolist()}")

    def forward(
        self,
        eps_true: Tensor,
        eps_student: Tensor,
        eps_teacher: Tensor | None,
        timesteps: Tensor,
        step: int,
        total_steps: int,
    ) -> tuple[Tensor, dict[str, float]]:
        """Return the scalar float32 loss and float-only logs.

        All tensors are [B, ...] in epsilon space; `eps_teacher` may be None only when
        `needs_teacher(step, total_steps)` is False. Logs: "loss/data", "loss/teacher"
        (the teacher term before lambda, 0 while inactive), "loss/total" = data + lambda *
        teacher, "lambda", "gate_rate" (mean gate, 0 while inactive), "weight_mean" (mean
        w(t) of the batch) and, with learned weighting, "learned_u_mean". The per-sample
        total is kept in `last_per_sample` so the trainer can name the samples of a
        non-finite step.
        """
        self._check_inputs(eps_true, eps_student, eps_teacher, timesteps)
        t = timesteps.long()
        w = self.data_weights.to(t.device)[t]
        err_student = _per_sample_mse(eps_student, eps_true)
        data_terms = w * err_student
        logs: dict[str, float] = {}
        if self.learned is not None:
            u = self.learned(t)
            data_terms = data_terms * torch.exp(-u) + u
            logs["learned_u_mean"] = float(u.detach().mean())
        loss_data = data_terms.mean()

        lam = self.teacher_lambda(step, total_steps)
        teacher_terms = torch.zeros_like(data_terms)
        gate_rate = 0.0
        if lam > 0:
            if eps_teacher is None:
                raise ValueError(
                    f"the teacher term is active at step {step} of {total_steps} (lambda={lam:.4g}) but "
                    "eps_teacher is None; run the teacher whenever loss.needs_teacher(step, total) is True"
                )
            eps_teacher = eps_teacher.detach()  # sg(eps_T): the teacher only supervises
            g = gate(err_student, _per_sample_mse(eps_teacher, eps_true), self.cfg.teacher_gate,
                     tau_scale=self.cfg.teacher_gate_tau_scale)
            teacher_terms = g * self.teacher_weights.to(t.device)[t] * _per_sample_mse(eps_teacher, eps_student)
            gate_rate = float(g.mean())
        loss_teacher = teacher_terms.mean()
        loss = loss_data + lam * loss_teacher

        self.last_per_sample = (data_terms + lam * teacher_terms).detach()
        logs.update({
            "loss/data": float(loss_data.detach()),
            "loss/teacher": float(loss_teacher.detach()),
            "loss/total": float(loss.detach()),
            "lambda": lam,
            "gate_rate": gate_rate,
            "weight_mean": float(w.mean()),
        })
        return loss, logs


# ----------------------------------------------------------------------------------------
# Teacher-context distillation (captions only: no images, no UNet).
# ----------------------------------------------------------------------------------------

def distillation_loss(student: Tensor, teacher: Tensor, cosine_weight: float = 0.1) -> tuple[Tensor, Tensor, Tensor]:
    """Regress a context onto the teacher's: per-slot MSE plus `cosine_weight` x (1 - cosine per slot).

    student, teacher: [B, N, C] (or [B, C] for a pooled vector). Every slot counts, padding and EOS slots
    included: the frozen UNet attends to all N of them. Returns (loss, mse, 1 - cosine), each a scalar
    mean over batch and slots. The MSE fixes each slot's size and offset, the cosine term its direction,
    which a plain MSE neglects on small-norm slots."""
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must have the same shape")
    if cosine_weight < 0:
        raise ValueError(f"cosine_weight must be >= 0, got {cosine_weight}")
    s, t = student.float(), teacher.float()
    mse = (s - t).pow(2).mean()
    cos_gap = (1 - torch.nn.functional.cosine_similarity(s, t, dim=-1, eps=1e-8)).mean()
    return mse + cosine_weight * cos_gap, mse.detach(), cos_gap.detach()
