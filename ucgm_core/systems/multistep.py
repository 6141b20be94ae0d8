"""Multistep Consistency Models (Heek, Hoogeboom, Salimans 2024, arXiv 2403.06807), Algorithm 1.

Time is cut into T equal segments (T = `student_steps`); a point at time t in the segment
(t_step, t_step + 1/T] is trained to land, by one DDIM step, where the teacher trajectory reaches
the segment start t_step. With N teacher steps in all (annealed from 64 to 1280) and
n = round(N / T) of them per segment:

    step ~ U{0..T-1}, t_step = step / T, j ~ U{1..n},  t = t_step + j / (T n),  s = t - 1 / (T n)
    z_t    = alpha(t) z + gamma(t) x
    x_tea  = x (training) or the teacher's data prediction at (z_t, t) (distillation: true)
    z_s    = aDDIM_{t->s}(x_tea, z_t)                        one teacher step
    x_self = stopgrad f(z_s, s)                              the model's own data prediction
    z_self = DDIM_{s->t_step}(x_self, z_s)                   (= z_s when s = t_step)
    x_tgt  = invDDIM_{t->t_step}(z_self, z_t)                the x whose DDIM step from t lands on z_self
    loss   = w(t) * pseudo_huber(f(z_t, t) - x_tgt)

in our coefficients (alpha the noise coefficient, gamma the data one; the paper's alpha_t, sigma_t are
our gamma, alpha). f is evaluated with theta-, the live weights under stop-gradient by default
(`target_network`). Everything is written against the transport, so any transport works; the paper's
is vp_cosine (x-prediction), the default.

aDDIM (sec. 3.2): eps_hat = (z_t - gamma(t) x_tea) / alpha(t),
    z_s = gamma(s) x_tea + sqrt(alpha(s)^2 + (D / |eps_hat|^2) (gamma(s) - gamma(t) alpha(s)/alpha(t))^2 x_var) eps_hat,
with x_var = eta |x_tea - x|^2 / D per sample (0 for consistency training, where aDDIM is DDIM).
Algorithm 1 writes x_var without eta; sec. 3.2 sets eta = 0.75; we use eta (0 gives plain DDIM).

Teacher steps: N(i) = round(N0 (N1 / N0)^min(1, i / K)), exponential in the step i (sec. 5.1:
"anneals from 64 to 1280 in 100.000 train steps with an exponential schedule").

Loss weight: the paper uses the v-loss, "SNR(t) + 1" weighting, with a non-squared Euclidean
distance. For a non-squared distance the v-loss is sqrt(SNR + 1) |x_diff| = |v_diff| (vp_cosine),
the default `loss_weighting = "v_loss"`; "snr_plus_one" applies SNR + 1 to the distance as written.
The distance is the pseudo-Huber sqrt(mean(d^2) + c^2) - c per sample (mean over the D dims).

T = N (one teacher step per segment) with eta = 0 makes x_tgt the teacher's own data prediction:
distillation is then exactly the teacher's N-step DDIM, and training is diffusion x-prediction.

Sampling (Algorithm 2): T deterministic DDIM steps on the uniform grid t = 1, (T-1)/T, ..., 1/T,
returning the last data prediction: UCGM-S with stochasticity 0 and boundary_gaps (0, 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter
from typing import Literal

import torch
from torch import nn

from ucgm_core.ema import TargetNetwork
from ucgm_core.labels import null_label_of
from ucgm_core.sampler import SamplerSettings
from ucgm_core.transports import Transport, broadcast_time

from ucgm_core.systems.checks import (
    check_bool,
    check_choice,
    check_fraction,
    check_kind,
    check_nonnegative_int,
    check_teacher,
)
from ucgm_core.systems.common import (
    Network,
    ObjectiveOutput,
    RandomStateReplay,
    ddim_step,
    inverse_ddim,
    noised_batch,
    pseudo_huber,
    live_or_target,
    replaying,
    row_mask,
    time_dtype,
)
from ucgm_core.systems.registry import SystemRecord, SystemSettings

Tensor = torch.Tensor


@dataclass(frozen=True)
class MultistepConsistencySettings(SystemSettings):
    """Multistep CM settings, consistency training or (distillation: true) distillation from a
    teacher; defaults are the paper's ImageNet ones (8 student steps).

    student_steps: T, the number of segments and of sampling steps.
    teacher_steps_start/end, teacher_anneal_steps: N annealed exponentially from start to end
        over that many training steps (0: always the end value).
    addim_eta: eta of the aDDIM teacher step (0: DDIM).
    loss_constant: c of the pseudo-Huber distance (per-dimension units; iCT's 0.00054 sqrt(D) / sqrt(D)).
    target_network: theta- for x_self; "live" (stop-gradient of the online weights) as in the paper.
    """

    kind: Literal["multistep_cm"] = "multistep_cm"
    distillation: bool = False
    student_steps: int = 8
    teacher_steps_start: int = 64
    teacher_steps_end: int = 1280
    teacher_anneal_steps: int = 100_000
    addim_eta: float = 0.75
    loss_constant: float = 0.00054
    loss_weighting: Literal["v_loss", "snr_plus_one", "none"] = "v_loss"
    target_network: Literal["live", "ema", "frozen"] = "live"
    target_ema_decay: float = 0.999
    label_dropout: float = 0.0

    def __post_init__(self) -> None:
        check_kind(self, "multistep_cm")
        check_bool(self, "distillation")
        check_choice(self, "loss_weighting", ("v_loss", "snr_plus_one", "none"))
        check_choice(self, "target_network", ("live", "ema", "frozen"))
        check_nonnegative_int(self, "student_steps", "the paper uses 2-16 (1 is a consistency model)", minimum=1)
        check_nonnegative_int(self, "teacher_steps_start", "the paper anneals from 64", minimum=1)
        check_nonnegative_int(self, "teacher_steps_end", "the paper anneals to 1280", minimum=1)
        check_nonnegative_int(self, "teacher_anneal_steps", "the paper uses 100000 (0: no annealing)")
        if self.teacher_steps_end < self.student_steps:
            raise ValueError(
                f"teacher_steps_end ({self.teacher_steps_end}) must be >= student_steps ({self.student_steps}); "
                "each segment needs at least one teacher step"
            )
        if not 0.0 <= self.addim_eta <= 1.0:
            raise ValueError(f"addim_eta must be in [0, 1], got {self.addim_eta}; the paper uses 0.75 (0 is DDIM)")
        if not (isinstance(self.loss_constant, (int, float)) and self.loss_constant >= 0):
            raise ValueError(f"loss_constant must be >= 0, got {self.loss_constant!r}; use 0.00054 (iCT) or 0")
        check_fraction(self, "target_ema_decay", "use 0.999")
        check_fraction(self, "label_dropout", "use 0, or 0.1 for classifier-free guidance", closed_top=False)

    def teacher_steps(self, step: int | None) -> int:
        """N at training step `step` (None: the end value)."""
        start, end = self.teacher_steps_start, self.teacher_steps_end
        if step is None or self.teacher_anneal_steps == 0:
            return end
        progress = min(1.0, max(0, step) / self.teacher_anneal_steps)
        return int(round(start * (end / start) ** progress))

    def steps_per_segment(self, step: int | None) -> int:
        """n = max(1, round(N / T))."""
        return max(1, int(round(self.teacher_steps(step) / self.student_steps)))


def adjusted_ddim_step(
    transport: Transport, x_hat: Tensor, x_time: Tensor, time: Tensor, end_time: Tensor, data_variance: Tensor
) -> Tensor:
    """aDDIM_{t->s}: gamma(s) x_hat + sqrt(alpha(s)^2 + (D/|eps_hat|^2) (gamma(s) - gamma(t) alpha(s)/alpha(t))^2 x_var) eps_hat,
    eps_hat = (x_t - gamma(t) x_hat) / alpha(t); x_var (B,) per-dimension variance. x_var = 0 is DDIM."""
    now = transport.coefficients(broadcast_time(time, x_time))
    end = transport.coefficients(broadcast_time(end_time, x_time))
    noise_hat = (x_time - now.gamma * x_hat) / now.alpha
    dims = noise_hat[0].numel()
    noise_norm = noise_hat.pow(2).flatten(1).sum(dim=1)
    shaped_variance = broadcast_time(data_variance, x_time)
    jump_variance = (end.gamma - now.gamma * end.alpha / now.alpha) ** 2 * shaped_variance
    scale = torch.sqrt(end.alpha**2 + dims / broadcast_time(noise_norm, x_time).clamp(min=1e-30) * jump_variance)
    return end.gamma * x_hat + scale * noise_hat


def multistep_target(
    transport: Transport,
    target_network: Network,
    x_time: Tensor,
    time: Tensor,
    teacher_time: Tensor,
    segment_start: Tensor,
    teacher_data: Tensor,
    labels: Tensor,
    *,
    data_variance: Tensor | None = None,
    random_state: RandomStateReplay | None = None,
) -> Tensor:
    """x_tgt = invDDIM_{t->t_step}(DDIM_{s->t_step}(x_self, z_s), z_t) with z_s = aDDIM_{t->s}(x_tea, z_t),
    x_self = data prediction of target_network (theta-) at (z_s, s); rows with s = t_step use
    z_self = z_s. Call under torch.no_grad."""
    variance = torch.zeros_like(time) if data_variance is None else data_variance
    z_teacher = adjusted_ddim_step(transport, teacher_data, x_time, time, teacher_time, variance)
    at_start = teacher_time <= segment_start
    # x_self is not needed (and den may vanish) where s = t_step; evaluate there at t rather than s
    evaluation_time = torch.where(at_start, time, teacher_time)
    with replaying(random_state):
        self_output = target_network(z_teacher, transport.network_time(evaluation_time), labels)
    self_data = transport.predictions(self_output.to(z_teacher.dtype), z_teacher, evaluation_time)[0]
    z_self = ddim_step(transport, self_data, z_teacher, evaluation_time, segment_start)
    z_self = torch.where(row_mask(at_start, x_time), z_teacher, z_self)
    return inverse_ddim(transport, z_self, x_time, time, segment_start)


class MultistepConsistencyObjective:
    """Multistep consistency training / distillation (module docstring; `TrainingObjective`)."""

    def __init__(
        self, transport: Transport, settings: MultistepConsistencySettings | None = None, *, teacher: Network | None = None
    ) -> None:
        self.settings = settings if settings is not None else MultistepConsistencySettings()
        check_teacher(self.settings.distillation, teacher, "Multistep CM")
        self.transport = transport
        self.teacher = teacher

    @property
    def needs_target_network(self) -> bool:
        return self.settings.target_network != "live"

    def create_target_network(self, model: nn.Module) -> TargetNetwork:
        return TargetNetwork.create(self.settings.target_network, model, self.settings.target_ema_decay, True)

    def extra_modules(self) -> list[nn.Module]:
        return []

    def draw_times(
        self, batch: int, generator: torch.Generator, device: torch.device, dtype: torch.dtype, step: int | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(t, s, t_step), each (B,): segment index and teacher step drawn from `generator`."""
        segments = self.settings.student_steps
        per_segment = self.settings.steps_per_segment(step)
        segment = torch.randint(0, segments, (batch,), generator=generator, device=device)
        within = torch.randint(1, per_segment + 1, (batch,), generator=generator, device=device)
        fine = segments * per_segment  # teacher steps on the whole path
        start_index = segment * per_segment
        time = ((start_index + within).to(torch.float64) / fine).to(dtype)
        teacher_time = ((start_index + within - 1).to(torch.float64) / fine).to(dtype)
        segment_start = (segment.to(torch.float64) / segments).to(dtype)
        return time, teacher_time, segment_start

    def loss_weight(self, time: Tensor) -> Tensor:
        """(SNR + 1) = (gamma^2 + alpha^2) / alpha^2, or its square root for the v-loss, or 1."""
        if self.settings.loss_weighting == "none":
            return torch.ones_like(time)
        c = self.transport.coefficients(time)
        snr_plus_one = (c.gamma**2 + c.alpha**2) / c.alpha**2
        return snr_plus_one.sqrt() if self.settings.loss_weighting == "v_loss" else snr_plus_one

    def __call__(
        self,
        network: Network,
        target_network: Network | None,
        x: Tensor,
        labels: Tensor,
        *,
        generator: torch.Generator,
        num_classes: int | None = None,
        step: int | None = None,
    ) -> ObjectiveOutput:
        settings, transport = self.settings, self.transport
        self_target_network = live_or_target(network, target_network, settings.target_network)
        time, teacher_time, segment_start = self.draw_times(x.shape[0], generator, x.device, time_dtype(x), step)
        batch = noised_batch(
            transport, x, labels, time,
            generator=generator, null_label=null_label_of(network, num_classes), label_dropout=settings.label_dropout,
        )
        x_time, dropped = batch.x_time, batch.labels

        random_state = RandomStateReplay(x.device)
        output = network(x_time, transport.network_time(time), dropped)
        data_prediction = transport.predictions(output, x_time, time)[0]
        with torch.no_grad():
            if settings.distillation:
                teacher_output = self.teacher(x_time, transport.network_time(time), dropped)
                teacher_data = transport.predictions(teacher_output.to(x_time.dtype), x_time, time)[0]
                variance = settings.addim_eta * (teacher_data - x).pow(2).flatten(1).mean(dim=1)
            else:
                teacher_data, variance = x, torch.zeros_like(time)
            target = multistep_target(
                transport, self_target_network, x_time, time, teacher_time, segment_start, teacher_data, dropped,
                data_variance=variance, random_state=random_state,
            )

        distance = pseudo_huber(data_prediction, target, settings.loss_constant)
        loss = (self.loss_weight(time).to(distance.dtype) * distance).mean()
        metrics = {
            "loss": loss.detach(),
            "mse_to_target": (data_prediction.detach() - target).pow(2).mean(),
            "teacher_steps": torch.tensor(float(settings.student_steps * settings.steps_per_segment(step))),
            "mean_time": time.mean(),
        }
        return ObjectiveOutput(loss=loss, metrics=metrics)


def sampler_settings(student_steps: int = 8) -> SamplerSettings:
    """Algorithm 2 as UCGM-S: `student_steps` deterministic DDIM steps on t = 1, (T-1)/T, ..., 1/T."""
    return SamplerSettings(steps=student_steps, boundary_gaps=(0.0, 0.0), stochasticity=0.0)


SYSTEM = SystemRecord(
    kind="multistep_cm",
    settings=MultistepConsistencySettings,
    objective=MultistepConsistencyObjective,
    default_transport="vp_cosine",
    needs_teacher=attrgetter("distillation"),
)
