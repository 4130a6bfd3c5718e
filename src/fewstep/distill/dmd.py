"""Distribution matching: a 1-step generator trained so that the distribution of its samples matches the teacher's,
with a fake-score network that follows the generator's distribution online; one objective, pluggable generator loss.

Yin et al., "One-step Diffusion with Distribution Matching Distillation", CVPR 2024 (DMD: the generator's gradient is
the difference of the fake and real data predictions at a noised generator sample; optional regression on teacher
(noise, sample) pairs); Yin et al., "Improved Distribution Matching Distillation for Fast Image Synthesis", NeurIPS
2024 (DMD2: normalised by mean |x_g - x0_real| per sample, noise levels in [t_low, t_high], two-time-scale updates
with several fake-score steps per generator step, no regression); Zhou et al., "Score identity Distillation:
Exponentially Fast Distillation of Pretrained Diffusion Models for One-Step Generation", ICML 2024 (SiD: loss
(x0_real - x0_fake) . ((x0_real - x_g) - alpha (x0_real - x0_fake)) / mean |x_g - x0_real|, whose gradient also flows
through both score networks' inputs).

The triple, on the Trainer's single loop (no second training loop):
- generator G = the Trainer's model (the teacher's architecture and prediction, initialised from its weights; or
  with `init_generator`, the architecture and weights of another checkpoint on the same process, e.g. a consistency
  student, whose stored 1-step start time t_gen replaces t_max): G(z) = its data prediction at (sigma(t_gen) z, t_gen),
  i.e. the consistency sampler's one step, so the student is an ordinary fewstep checkpoint that `sample_student` /
  `fewstep bench distill` run with its stored times [t_gen, t_min];
- real score = the frozen teacher;
- fake score = a copy of the teacher (or `distill.fake_score`, a checkpoint of the same architecture) that the
  objective owns with its own AdamW: inside `loss`, before the generator's loss is built, it takes `fake_steps`
  denoising steps on fresh generator samples (the two-time-scale rule). The Trainer's optimizer only ever sees the
  generator; the fake score, its optimizer state and the metrics are checkpointed as the objective's state, so a
  resume is exact. All randomness (the fake steps' noise and times included) comes from `draw`, i.e. the trainer's
  noise generator, and is sharded like the batch; under DDP the fake score is wrapped in its own
  DistributedDataParallel. The generator's input noise is the trainer's eps.
With `probe_every` K > 0 a quality probe scores the EMA generator every K steps (`fewstep.distill.probe`: metrics.json
and metrics.png in the run's folder, beside the per-step generator and fake-score losses), and the student of the best
probe so far is kept as best.json (for sampling and `fewstep bench distill`: it was written inside its step, so a
resume from it repeats that step; resume from checkpoint.json).
During the first `fake_warmup` steps only the fake score trains (the generator's loss is multiplied by 0): for a
fake score that does not start at the generator's distribution (a fresh network, an exact teacher without weights).
Multi-step generators (DMD2, section 4.4; `fewstep.distill.backsim`): with `generator_times` [t_0, ..., t_{K-1}] (or
`generator_steps` K, the times then taken from the init_generator's stored K-step times) each sample of the
generator's loss and of every fake-score step draws a step index k and its input x_{t_k} is built by backward
simulation: the current generator (not its EMA: the inputs must be those of the weights being trained, as in DMD2)
run without gradient through its first k steps with fresh noise; x_g = G(x_{t_k}, t_k) with gradient and the loss
above applies unchanged. The student stores the sub-grids of the trained times for 1..K steps (`backsim.sub_grids`);
the probe scores the full K-step sample. With K = 1 nothing is drawn beyond the 1-step run's randomness.
GAN head (DMD2, section 4.3; `fewstep.distill.gan`) with `gan_weight` > 0: a classifier on the fake score's bottleneck
feature, trained inside each fake-score step on the Trainer's real batch x0 (the digits) and that step's generator
samples, noised to the same level (the fake step's t; the generator samples' noise is the denoising loss's, so one
forward of [x_g, x0] serves both), loss = denoising + gan_fake_weight * (softplus(-D(real_t)) + softplus(D(fake_t)));
the generator adds gan_weight * softplus(-D(x_t)) at the distribution-matching loss's x_t. The head is optimised with
the fake score (same AdamW, its own parameter group with learning rate `gan_lr`, default the fake score's) and
checkpointed with it. With gan_weight = 0 (the default) nothing of it exists and the
run is bit for bit the one without it.
Shapes: z, x_g, x_t [batch, ...]; t [batch] float64; losses [batch].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..nets import build_model
from ..processes import Process
from ..train.checkpoint import CheckpointError, flatten_optimizer, load_state, section, unflatten_optimizer
from ..train.config import ConfigError, TrainConfig
from ..train.losses import diffusion_loss
from ..train.objective import Objective
from .backsim import backward_simulate, path_draws, path_noises, resolve_generator_times, sub_grids
from .clock import TrainClock
from .consistency import resolve_teacher
from .gan import BottleneckHead, discriminator_loss, generator_gan_loss
from .options import MatchingOptions, parse_table
from .pairs import PairError, load_pairs
from .probe import MetricsLog, QualityProbe
from .student import initialise_from_teacher, inner_config, stored_times, student_record
from .targets import prediction_pair
from .teacher import check_data_shape, check_process, same_process

if TYPE_CHECKING:
    from ..train.trainer import Trainer

X0Fn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t float64 [batch]) -> data prediction
MODEL_KEYS = ("net", "prediction", "precond", "sigma_data")


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in float32 at least (bf16 under autocast -> float32; float64 stays)."""
    return x if x.dtype == torch.float64 else x.float()


def _per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(len(x), -1).mean(1)


def _normaliser(x_g: torch.Tensor, x0_real: torch.Tensor) -> torch.Tensor:
    """mean |x_g - x0_real| per sample, >= 1e-5, shaped to broadcast over x_g (no gradient)."""
    w = _per_sample_mean(_wide(x_g.detach() - x0_real.detach()).abs()).clamp_min(1e-5)
    return w.reshape(-1, *([1] * (x_g.ndim - 1)))


def dmd_gradient(x_g: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """DMD2's generator gradient (x0_fake - x0_real) / mean |x_g - x0_real| per sample: [batch, ...]."""
    return (_wide(x0_fake) - _wide(x0_real)) / _normaliser(x_g, x0_real)


def dmd_loss(x_g: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, real: X0Fn, fake: X0Fn, options: Any) -> torch.Tensor:
    """0.5 mean (x_g - stopgrad(x_g - g))^2 per sample, g = `dmd_gradient` at x_t: its gradient in x_g is g / numel."""
    with torch.no_grad():
        x_in = x_t.detach()
        grad = dmd_gradient(x_g, real(x_in, t), fake(x_in, t))
    target = (_wide(x_g) - grad).detach()
    return 0.5 * _per_sample_mean((_wide(x_g) - target).pow(2))


def sid_loss(x_g: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, real: X0Fn, fake: X0Fn, options: Any) -> torch.Tensor:
    """SiD: (r - f) . ((r - x_g) - alpha (r - f)) / mean |x_g - r| per sample (mean over features), r and f the real and
    fake data predictions at x_t with gradients through x_t (the score networks' weights stay frozen)."""
    r, f = _wide(real(x_t, t)), _wide(fake(x_t, t))
    diff = r - f
    return _per_sample_mean(diff * ((r - _wide(x_g)) - options.alpha * diff) / _normaliser(x_g, r))


GENERATOR_LOSSES: dict[str, Callable[..., torch.Tensor]] = {"dmd": dmd_loss, "sid": sid_loss}


def data_prediction(model: Callable, prediction: str, process: Process) -> X0Fn:
    """`model(x, t) -> prediction` as `(x, t) -> x0` (t float64 [batch])."""
    pair = prediction_pair(model, prediction, process)
    return lambda x, t: pair(x, t)[0]


class DistributionMatchingObjective(Objective):
    """DMD / SiD (method of the distill table) on the Trainer: the Trainer's model is the 1- or K-step generator."""

    def __init__(self, config: TrainConfig, process: Process, data: torch.Tensor, teacher: Any = None):
        options = parse_table(config.distill)
        assert isinstance(options, MatchingOptions)
        self.options, self.config, self.process, self.name = options, config, process, options.method
        if options.gan_weight > 0 and len(data) == 0:
            raise ConfigError("distill.gan_weight", "distill.gan_weight > 0 trains a GAN head on real data, but the run has "
                              "none: give config.data (e.g. 'digits', the teacher's data set) or Trainer(data=...)")  # fmt: skip
        self.teacher = resolve_teacher(teacher, options, required=True)
        check_process(self.teacher, process)
        check_data_shape(self.teacher, data)
        span = process.t_max - process.t_min
        self.t_low, self.t_high = process.t_min + options.t_low * span, process.t_min + options.t_high * span
        self.t_gen = process.t_max
        self.generator_loss = GENERATOR_LOSSES[options.method]
        self.shape = tuple(data.shape[1:])
        self.fake_config = inner_config(config, self.teacher, self.shape)  # the teacher's architecture
        self.init_state: dict[str, torch.Tensor] | None = None
        self.init_times: dict[int, list[float]] = {}
        self.generator_config = self._generator_config()
        what = f"distill.init_generator={options.init_generator!r}" if options.init_generator else "no init_generator"
        times = resolve_generator_times(options.generator_steps, options.generator_times, self.init_times, process, what)
        self.times = times or [self.t_gen]  # the generator's K step times; K = 1: its start time
        self.t_gen, self.gen_steps = self.times[0], len(self.times)
        self.probe_noises: list[torch.Tensor] = []
        self.pairs = self._load_pairs() if options.regression_pairs and options.regression_weight > 0 else None
        self.generator: nn.Module | None = None
        self.fake: nn.Module | None = None
        self.fake_train: nn.Module | None = None
        self.fake_optimizer: torch.optim.Optimizer | None = None
        self.gan: BottleneckHead | None = None
        self.probe: QualityProbe | None = None
        self.step = 0
        self.metrics = MetricsLog()
        self.best_probe = math.inf
        self.clock = TrainClock()
        self._last: dict[str, float] = {}

    def _load_pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            noise, x, settings = load_pairs(self.options.regression_pairs)
        except PairError as err:
            raise ConfigError("distill.regression_pairs", f"distill.regression_pairs: {err}") from err
        if tuple(noise.shape[1:]) != self.shape or not same_process(_process_of(settings), self.process):
            raise ConfigError(
                "distill.regression_pairs",
                f"distill.regression_pairs={self.options.regression_pairs!r} holds pairs of shape {tuple(noise.shape[1:])} "
                f"on process {settings.get('process')}; the run needs shape {self.shape} on {self.process!r}",
            )
        return noise, x

    # Model -----------------------------------------------------------------------------------------------------

    def _generator_config(self) -> dict[str, Any]:
        """The generator's model config: the teacher's, or that of `init_generator` (whose weights and 1-step start
        time it keeps for `setup`)."""
        spec = self.options.init_generator
        if spec is None:
            return self.fake_config
        from ..shipped import load_model

        try:
            loaded = load_model(spec)
        except ValueError as err:
            raise ConfigError("distill.init_generator", f"distill.init_generator={spec!r}: {err}") from err
        if not same_process(loaded.process, self.process):
            raise ConfigError(
                "distill.init_generator",
                f"distill.init_generator={spec!r} runs on {loaded.process!r}, the teacher on {self.process!r}",
            )
        self.init_state = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
        self.init_times = stored_times(loaded.meta)
        one = self.init_times.get(1)
        if one:
            self.t_gen = float(one[0])
        return dict(loaded.config["model"])

    def model_config(self, config: TrainConfig, data_shape: tuple[int, ...]) -> dict[str, Any]:
        return self.generator_config

    def setup(self, trainer: Trainer) -> None:
        self.generator = trainer.model
        self.teacher.freeze(trainer.device)
        if self.init_state is not None:
            load_state(trainer.model, self.init_state, f"distill.init_generator={self.options.init_generator!r}")
        else:
            initialise_from_teacher(trainer.model, self.teacher, self.options.init_from_teacher)
        self.fake = build_fake_score(trainer, self.fake_config, self.teacher, self.options.fake_score)
        self.fake_train = self.fake
        if trainer.dist.enabled:
            self.fake_train = torch.nn.parallel.DistributedDataParallel(self.fake)
        c = self.config
        self.fake_params, groups = list(self.fake.parameters()), None
        if self.options.gan_weight > 0:  # the head: a second parameter group (its own learning rate)
            self.gan = self._build_gan(trainer)
            lr = self.options.gan_lr or self.options.fake_lr or c.lr
            groups = [{"params": self.fake_params}, {"params": list(self.gan.parameters()), "lr": lr}]
            self.fake_params = self.fake_params + groups[1]["params"]
        self.fake_optimizer = torch.optim.AdamW(groups or self.fake_params, lr=self.options.fake_lr or c.lr,
                                                weight_decay=c.weight_decay, foreach=True)  # fmt: skip
        self.real = data_prediction(self.teacher.model, self.teacher.prediction, self.process)
        self.fake_x0 = data_prediction(self.fake, self.fake.prediction, self.process)
        self.dist, self.out_dir = trainer.dist, c.out_dir
        if self.options.probe_every:
            self.probe = QualityProbe(self.options.probe, self.options.probe_count, self.shape, self.teacher, c.seed)
            g = torch.Generator().manual_seed(c.seed + 104729)  # the probe's fixed re-noising (no training draw)
            self.probe_noises = [torch.randn(self.probe.noise.shape, generator=g) for _ in range(self.gen_steps - 1)]

    def _build_gan(self, trainer: Trainer) -> BottleneckHead:
        """The GAN head on the fake score's bottleneck (sized by one forward at t_gen); its DDP wrapper as gan_train."""
        device = trainer.device
        x = torch.zeros((1, *self.shape), device=device)
        t = torch.full((1,), self.t_gen, dtype=torch.float64, device=device)
        gan = BottleneckHead(self.fake, lambda: self.fake(x, t)).to(device)
        self.gan_train = torch.nn.parallel.DistributedDataParallel(gan) if trainer.dist.enabled else gan
        return gan

    def generate(self, model: Callable, z: torch.Tensor) -> torch.Tensor:
        """G(z): the model's data prediction at (sigma(t_gen) z, t_gen) for standard normal z [batch, ...] (step 0)."""
        t = torch.full((len(z),), self.t_gen, dtype=torch.float64, device=z.device)
        x = z * float(self.process.sigma(self.t_gen))
        return data_prediction(model, self.generator.prediction, self.process)(x, t)

    def generator_input(self, model: Callable, z: torch.Tensor, k: torch.Tensor | None, noises: list[torch.Tensor]):
        """(x_{t_k}, t_k) of each sample: (sigma(t_gen) z, t_gen) where k is None (one step), else backward simulation
        by `model` without gradient (its DDP wrapper's module: no collectives in a per-rank loop)."""
        if k is None:
            return z * float(self.process.sigma(self.t_gen)), torch.full((len(z),), self.t_gen, dtype=torch.float64,
                                                                         device=z.device)  # fmt: skip
        own = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
        x0_fn = data_prediction(own, self.generator.prediction, self.process)
        return backward_simulate(x0_fn, self.process, self.times, z, k, noises)

    def sample_steps(self, model: Callable, z: torch.Tensor, noises: list[torch.Tensor]) -> torch.Tensor:
        """The K-step sample of noise z [batch, ...] with re-noising `noises` (K - 1 tensors like z): no gradient."""
        if self.gen_steps == 1:
            return self.generate(model, z)
        k = torch.full((len(z),), self.gen_steps - 1, dtype=torch.int64, device=z.device)
        x, t = self.generator_input(model, z, k, noises)
        with torch.no_grad():
            return data_prediction(model, self.generator.prediction, self.process)(x, t)

    def _path(self, draws: dict[str, torch.Tensor], prefix: str) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """(k, re-noising) of the draws under `prefix`; (None, []) for a 1-step generator."""
        if self.gen_steps == 1:
            return None, []
        return draws[f"{prefix}k"], path_noises(draws, prefix, self.gen_steps)

    # Randomness of a global batch ------------------------------------------------------------------------------

    def _times(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return self.t_low + (self.t_high - self.t_low) * torch.rand(n, generator=generator, dtype=torch.float64)

    def draw(self, x0: torch.Tensor, generator: torch.Generator, step: int) -> dict[str, torch.Tensor]:
        """t and eps_dm (the generator loss's noise level and noise), fake_z/t/eps<j> for the fake-score steps,
        pair_index (regression), for a K-step generator the backward simulations' step indices and re-noising
        (`backsim.path_draws`, prefixes gen_ and fake<j>_), and with the GAN head gan_eps<j> (the real batch's noise
        in fake step j): [N] or [N, ...] each."""
        n = len(x0)
        out = {"t": self._times(n, generator), "eps_dm": torch.randn(x0.shape, generator=generator, dtype=x0.dtype)}
        for j in range(self.options.fake_steps):
            out[f"fake_z{j}"] = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
            out[f"fake_t{j}"] = self._times(n, generator)
            out[f"fake_eps{j}"] = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        if self.pairs is not None:
            out["pair_index"] = torch.randint(0, len(self.pairs[0]), (n,), generator=generator)
        if self.gen_steps > 1:
            for prefix in ("gen_", *(f"fake{j}_" for j in range(self.options.fake_steps))):
                out.update(path_draws(prefix, n, x0.shape[1:], x0.dtype, self.gen_steps, generator))
        if self.gan is not None:  # the real batch's noise per fake step, drawn last: all other draws as without GAN
            for j in range(self.options.fake_steps):
                out[f"gan_eps{j}"] = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        return out

    # Loss ------------------------------------------------------------------------------------------------------

    def _fake_losses(self, x_g: torch.Tensor, x0: torch.Tensor, draws: dict[str, torch.Tensor], j: int):
        """(denoising loss, discriminator loss or None) of fake step j: scalars. With the GAN head one forward of
        [x_g, x0] noised at the same t (x_g with the denoising noise, x0 with gan_eps<j>) gives both."""
        c, t, eps = self.config, draws[f"fake_t{j}"], draws[f"fake_eps{j}"]
        kw = dict(process=self.process, prediction=self.fake.prediction, weighting=c.weighting, gamma=c.min_snr_gamma,
                  sigma_data=c.sigma_data)  # fmt: skip
        if self.gan is None:
            return diffusion_loss(self.fake_train, x_g, t, eps, **kw).mean(), None
        n = len(x_g)
        with self.gan.capture():
            both = diffusion_loss(self.fake_train, torch.cat([x_g, x0.to(x_g)]), torch.cat([t, t]),
                                  torch.cat([eps, draws[f"gan_eps{j}"]]), **kw)  # fmt: skip
            feature = self.gan.take()
        logits = self.gan_train(feature)
        return both[:n].mean(), discriminator_loss(logits[n:], logits[:n]).mean()

    def _train_fake(self, model: nn.Module, x0: torch.Tensor, draws: dict[str, torch.Tensor]) -> dict[str, float]:
        """`fake_steps` denoising steps of the fake score on generator samples (with the GAN head: plus its
        discriminator loss on the real batch x0); their mean losses. A non-finite loss raises NonFiniteLossError naming
        the step, before the fake score changes."""
        from ..train.trainer import NonFiniteLossError

        c, fake, head = self.config, self.fake, self.gan
        fake.requires_grad_(True)
        if head is not None:
            head.requires_grad_(True)
        total, total_gan = 0.0, 0.0
        for j in range(self.options.fake_steps):
            z = draws[f"fake_z{j}"]
            x, t = self.generator_input(model, z, *self._path(draws, f"fake{j}_"))
            with torch.no_grad():
                x_g = data_prediction(model, self.generator.prediction, self.process)(x, t).to(z.dtype)
            loss, disc = self._fake_losses(x_g, x0, draws, j)
            value = float(self.dist.mean(loss.detach()))
            gan_value = 0.0 if disc is None else float(self.dist.mean(disc.detach()))
            if not (math.isfinite(value) and math.isfinite(gan_value)):
                which = "fake-score" if not math.isfinite(value) else "GAN discriminator"
                raise NonFiniteLossError(
                    f"the {self.name} {which} loss is {value if which == 'fake-score' else gan_value} at step "
                    f"{self.step + 1}: training stopped before the weights changed; the last checkpoint written (if "
                    f"any, in {self.out_dir}) is kept"
                )
            self.fake_optimizer.zero_grad(set_to_none=True)
            (loss if disc is None else loss + self.options.gan_fake_weight * disc).backward()
            if c.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.fake_params, c.grad_clip)
            self.fake_optimizer.step()
            total, total_gan = total + value, total_gan + gan_value
        fake.requires_grad_(False)  # the generator's loss below differentiates through it, never into it
        values = {"fake_loss": total / self.options.fake_steps}
        if head is not None:
            head.requires_grad_(False)
            values["gan_disc_loss"] = total_gan / self.options.fake_steps
        return values

    def loss(self, model: nn.Module, x0: torch.Tensor, eps: torch.Tensor, draws: dict[str, torch.Tensor]) -> torch.Tensor:
        fake_values = self._train_fake(model, x0, draws)
        x, t = self.generator_input(model, eps, *self._path(draws, "gen_"))
        if self.pairs is not None:  # one generator pass for both (DDP allows one forward per backward); pairs: step 0
            index = draws["pair_index"].cpu()
            x_pair, t_pair = self.generator_input(model, self.pairs[0][index].to(eps), None, [])
            x, t = torch.cat([x, x_pair]), torch.cat([t, t_pair])
        x_all = data_prediction(model, self.generator.prediction, self.process)(x, t)
        x_g = x_all[: len(eps)]
        x_t = self.process.add_noise(x_g, draws["t"], draws["eps_dm"])
        losses = self.generator_loss(x_g, x_t, draws["t"], self.real, self.fake_x0, self.options)
        self._last = {"generator_loss": float(losses.detach().mean()), **fake_values}
        if self.gan is not None:  # through the frozen fake score and head into x_g
            gan = generator_gan_loss(self.gan(self.gan.features(self.fake, x_t, draws["t"])))
            self._last["gan_generator_loss"] = float(gan.detach().mean())
            losses = losses + self.options.gan_weight * gan
        if self.pairs is not None:
            target = self.pairs[1][draws["pair_index"].cpu()].to(x_all)
            regression = _per_sample_mean((_wide(x_all[len(eps) :]) - _wide(target)).pow(2))
            self._last["regression_loss"] = float(regression.detach().mean())
            losses = losses + self.options.regression_weight * regression
        if self.step < self.options.fake_warmup:
            losses = losses * 0.0
        return losses

    # Steps, diagnostics ----------------------------------------------------------------------------------------

    def begin_step(self, trainer: Trainer) -> None:
        self.clock.tick()
        self.step = trainer.step

    def after_step(self, trainer: Trainer) -> None:
        self.clock.tick()
        done = trainer.step + 1  # the Trainer counts the step after this hook
        values = dict(self._last)
        last = done == self.config.steps
        key = f"probe_{self.options.probe}"
        if self.probe is not None and (done % self.options.probe_every == 0 or last):
            ema = trainer.ema.module
            noises = [z.to(trainer.device) for z in self.probe_noises]
            values[key] = self.probe.measure(lambda z: self.sample_steps(ema, z.to(trainer.device), noises))
        self.metrics.add(done, **values)
        if key in values and values[key] < self.best_probe and done > self.options.fake_warmup:
            self.best_probe = values[key]
            trainer.save(trainer.out_dir / "best.json")
        if trainer.dist.is_main and (key in values or last):
            self.metrics.write(trainer.out_dir)

    # State -----------------------------------------------------------------------------------------------------

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        opt_tensors, opt_meta = flatten_optimizer(self.fake_optimizer)
        tensors = {f"fake.{k}": v.detach().cpu().clone() for k, v in self.fake.state_dict().items()}
        tensors.update({f"fake_opt.{k}": v.cpu() for k, v in opt_tensors.items()})
        if self.gan is not None:
            tensors.update({f"gan.{k}": v.detach().cpu().clone() for k, v in self.gan.state_dict().items()})
        values = {"fake_optimizer": opt_meta, "metrics": self.metrics.state(), **self.clock.state()}
        if math.isfinite(self.best_probe):
            values["best_probe"] = self.best_probe
        return tensors, values

    def load_state(self, tensors: dict[str, torch.Tensor], values: dict[str, Any], where: str) -> None:
        self.clock.load(values, where)
        load_state(self.fake, section(tensors, "fake"), f"fake score in {where}")
        if self.gan is not None:
            load_state(self.gan, section(tensors, "gan"), f"GAN head in {where} (a run with distill.gan_weight > 0)")
        unflatten_optimizer(self.fake_optimizer, section(tensors, "fake_opt"), values.get("fake_optimizer"), where)
        self.metrics.load(values.get("metrics"))
        best = values.get("best_probe", math.inf)
        self.best_probe = float(best) if isinstance(best, (int, float)) and not isinstance(best, bool) else math.inf

    def checkpoint_extra(self) -> dict[str, Any]:
        return {**student_record(sub_grids(self.times, self.process.t_min), 1.0), **self.clock.extra()}

    def sampling(self, config: TrainConfig) -> dict[str, Any]:
        schedule = torch.tensor([*self.times, self.process.t_min], dtype=torch.float64)
        return {"solver": "consistency", "steps": self.gen_steps, "schedule": schedule, "gamma": 1.0}


def _process_of(settings: dict[str, Any]) -> Process:
    from ..train.process_config import build_process

    try:
        return build_process(settings.get("process") or {})
    except (ValueError, TypeError) as err:
        message = f"the pair set's process {settings.get('process')} is not valid: {err}"
        raise ConfigError("distill.regression_pairs", message) from err


def build_fake_score(trainer: Trainer, config: dict[str, Any], teacher: Any, spec: str | None) -> nn.Module:
    """The fake-score network: the teacher's architecture `config` with the weights of `spec` (a checkpoint of the
    same architecture and process), else of the teacher, else (a teacher without weights) of the generator's
    initialisation where it has that architecture (a fresh network otherwise). ConfigError("distill.fake_score") when
    the weights do not fit."""
    fake = build_model(config, trainer.process).to(trainer.device)
    if spec is not None:
        from ..shipped import load_model

        try:
            loaded = load_model(spec)
        except ValueError as err:
            raise ConfigError("distill.fake_score", f"distill.fake_score={spec!r}: {err}") from err
        theirs = {k: loaded.config["model"].get(k) for k in MODEL_KEYS}
        ours = {k: config.get(k) for k in MODEL_KEYS}
        if theirs != ours or not same_process(loaded.process, trainer.process):
            raise ConfigError(
                "distill.fake_score",
                f"distill.fake_score={spec!r} is incompatible: its model {theirs} on {loaded.process!r}; the fake score "
                f"must be a copy of the teacher, {ours} on {trainer.process!r}",
            )
        state, what = loaded.model.state_dict(), f"distill.fake_score={spec!r}"
    elif teacher.module is not None:
        state, what = teacher.module.state_dict(), "the teacher"
    elif trainer.full_config["model"] == config:
        state, what = trainer.model.state_dict(), "the generator"
    else:
        return fake.train()
    try:
        load_state(fake, {k: v.detach().clone() for k, v in state.items()}, f"weights of {what}")
    except CheckpointError as err:
        raise ConfigError("distill.fake_score", f"the fake score cannot start from {what}: {err}") from None
    return fake.train()
