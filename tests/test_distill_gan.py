"""DMD2's optional GAN head (Yin et al., 2024, section 4.3) on the fake score's bottleneck: the softplus losses on
the features the network computes, off by default without a trace, exact resume, and bad input. Exact ring2d
teacher (MLP generator and fake score) and a tiny digits UNet for the hook."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_exact_resume

import fewstep
from fewstep.distill import Teacher, distill_config
from fewstep.distill.dmd import data_prediction
from fewstep.distill.gan import BottleneckHead, bottleneck_module
from fewstep.nets import build_model
from fewstep.train import Trainer
from fewstep.train.checkpoint import CheckpointError
from fewstep.train.config import ConfigError, TrainConfig

RING = fewstep.ring2d()
FLOW = fewstep.RectifiedFlow()
DATA = RING.sample(2000, torch.Generator().manual_seed(0), dtype=torch.float32)
NET = {"type": "mlp", "dim": 2, "width": 32, "depth": 2}


def teacher() -> Teacher:
    return Teacher(RING.model(FLOW, "velocity"), FLOW, "velocity", name="ring2d-exact")


def trainer(tmp_path, steps: int = 4, data=DATA, batch_size: int = 32, **distill) -> Trainer:
    cfg = distill_config("dmd", teacher(), distill=distill, net=NET, data="ring", prediction="velocity", steps=steps,
                         batch_size=batch_size, checkpoint_every=0, progress=False, out_dir=str(tmp_path))  # fmt: skip
    return Trainer(cfg, data=data, teacher=teacher())


def softplus(x: torch.Tensor) -> torch.Tensor:
    return torch.log1p(torch.exp(x))  # log(1 + e^x), written out


class Features:
    """An independent hook on the fake score's last residual block: the features the head must see."""

    def __init__(self, fake):
        self.seen: list[torch.Tensor] = []
        fake.net.blocks[-1].register_forward_hook(lambda m, i, out: self.seen.append(out.detach().clone()))


def test_gan_weight_zero_changes_nothing_and_stores_nothing(tmp_path):
    runs = {name: trainer(tmp_path / name, **kw) for name, kw in
            (("default", {}), ("zero", {"gan_weight": 0.0}), ("on", {"gan_weight": 0.5}))}  # fmt: skip
    assert runs["default"].objective.gan is None and runs["zero"].objective.gan is None
    assert runs["on"].objective.gan is not None
    g = [torch.Generator().manual_seed(1) for _ in runs]
    draws = [r.objective.draw(DATA[:32], gen, 0) for r, gen in zip(runs.values(), g, strict=True)]
    assert draws[0].keys() == draws[1].keys() and draws[2].keys() - draws[0].keys() == {f"gan_eps{j}" for j in range(5)}
    assert all(torch.equal(draws[0][k], draws[2][k]) for k in draws[0])  # the GAN's noise is drawn last
    for r in runs.values():
        for _ in range(3):
            r.train_step()
    params = {name: torch.cat([p.flatten() for p in r.model.parameters()]) for name, r in runs.items()}
    assert torch.equal(params["default"], params["zero"]) and not torch.equal(params["default"], params["on"])
    assert runs["default"].loss_history == runs["zero"].loss_history
    tensors, _ = runs["zero"].objective.state()
    assert not any(k.startswith("gan.") for k in tensors)
    tensors, values = runs["on"].objective.state()
    head = runs["on"].objective.gan
    assert {k[4:] for k in tensors if k.startswith("gan.")} == set(head.state_dict())
    groups = values["fake_optimizer"]["param_groups"]
    assert [len(g["params"]) for g in groups] == [len(list(runs["on"].objective.fake.parameters())), len(list(head.parameters()))]
    assert [g["lr"] for g in groups] == [runs["on"].config.lr] * 2  # gan_lr defaults to the fake score's
    own = trainer(tmp_path / "lr", gan_weight=0.1, fake_lr=1e-4, gan_lr=1e-3).objective.fake_optimizer
    assert [g["lr"] for g in own.param_groups] == [1e-4, 1e-3]


def test_the_losses_are_the_softplus_losses_on_the_bottleneck_features(tmp_path):
    run = trainer(tmp_path, gan_weight=0.5, gan_fake_weight=0.1, fake_steps=1)
    obj = run.objective
    seen = Features(obj.fake)
    g = torch.Generator().manual_seed(3)
    x0, eps = DATA[:32], torch.randn(32, 2, generator=g)
    draws = obj.draw(x0, g, 0)
    t = draws["fake_t0"]
    with torch.no_grad():  # the discriminator's inputs: generator samples and real data at the same noise level
        x_g = obj.generate(run.model, draws["fake_z0"])
        obj.fake(FLOW.add_noise(x_g, t, draws["fake_eps0"]), t)
        obj.fake(FLOW.add_noise(x0, t, draws["gan_eps0"]), t)
        fake_logits, real_logits = (obj.gan.head(f).squeeze(1) for f in seen.seen)
    expected_disc = float((softplus(-real_logits) + softplus(fake_logits)).mean())
    seen.seen.clear()
    losses = run.objective.loss(run.model, x0, eps, draws)
    last = obj._last
    assert last["gan_disc_loss"] == pytest.approx(expected_disc, rel=1e-6)
    assert 1.0 < expected_disc < 1.8  # about 2 log 2 = 1.386 for a fresh head: the numbers are not both zero
    # The generator's term: softplus(-D) at the distribution-matching x_t, with the head after its update.
    x_gen = data_prediction(run.model, "velocity", FLOW)(
        eps * FLOW.sigma(FLOW.t_max), torch.full((32,), FLOW.t_max, dtype=torch.float64)
    )
    with torch.no_grad():
        obj.fake(FLOW.add_noise(x_gen, draws["t"], draws["eps_dm"]), draws["t"])
        expected_gen = float(softplus(-obj.gan.head(seen.seen[-1]).squeeze(1)).mean())
    assert last["gan_generator_loss"] == pytest.approx(expected_gen, rel=1e-5)
    total = last["generator_loss"] + 0.5 * last["gan_generator_loss"]
    assert float(losses.detach().mean()) == pytest.approx(total, rel=1e-5)
    # Its gradient reaches the generator, never the fake score or the head (both frozen outside their own update:
    # their .grad stays that of the last fake step).
    others = [*obj.fake.parameters(), *obj.gan.parameters()]
    kept = [p.grad.clone() for p in others]
    losses.mean().backward()
    assert all(torch.equal(p.grad, k) for p, k in zip(others, kept, strict=True))
    assert all(p.grad is not None for p in run.model.parameters())


def test_the_head_learns_to_tell_real_from_generated(tmp_path):
    # The generator stays where it starts (fake_warmup: its loss is multiplied by 0): G(z) = z, a standard normal
    # (the fresh MLP's velocity is 0), against the ring's eight modes; the head and the fake score's trunk train on the
    # discriminator loss inside the fake-score steps, at noise levels t in [0.02, 0.3].
    run = trainer(tmp_path, steps=60, batch_size=128, gan_weight=0.1, gan_fake_weight=1.0, fake_steps=2, fake_lr=3e-3,
                  fake_warmup=60, t_high=0.3)  # fmt: skip
    losses = []
    for _ in range(60):
        run.train_step()
        losses.append(run.objective._last["gan_disc_loss"])
    obj, g = run.objective, torch.Generator().manual_seed(9)
    real, z = RING.sample(1000, g, dtype=torch.float32), torch.randn(1000, 2, generator=g)
    t = torch.full((1000,), 0.05, dtype=torch.float64)
    with torch.no_grad():
        x_g = obj.generate(run.model, z)
        d_real, d_fake = (obj.gan(obj.gan.features(obj.fake, FLOW.add_noise(x, t, torch.randn(1000, 2, generator=g)), t))
                          for x in (real, x_g))  # fmt: skip
    accuracy = 0.5 * float((d_real > 0).float().mean() + (d_fake < 0).float().mean())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    # measured: 1.37 over the first 10 steps (2 log 2 = 1.386: chance), 1.09 over the last 10; accuracy 0.80 at
    # t = 0.05 (chance 0.5)
    assert first == pytest.approx(1.386, abs=0.03) and last < 1.2, (first, last)
    assert accuracy > 0.7, accuracy


def test_resume_is_exact_with_the_gan_head(tmp_path):
    def make(folder: str) -> Trainer:
        return trainer(tmp_path / folder, gan_weight=0.3, fake_steps=2)

    straight, resumed = assert_exact_resume(make)
    assert all(torch.equal(p, q) for p, q in zip(straight.objective.gan.parameters(), resumed.objective.gan.parameters(),
                                                 strict=True))  # fmt: skip
    tensors, values = straight.objective.state()
    without = {k: v for k, v in tensors.items() if not k.startswith("gan.")}
    with pytest.raises(CheckpointError, match="GAN head in ckpt"):
        resumed.objective.load_state(without, values, "ckpt")


def test_the_hook_reads_the_unet_bottleneck_without_changing_the_network():
    net = {"type": "unet", "in_channels": 1, "channels": [8, 16], "mid_attention": False, "emb_features": 16}
    torch.manual_seed(0)
    model = build_model({"net": net, "prediction": "velocity"}, FLOW)
    x, t = torch.randn(5, 1, 8, 8), torch.rand(5, dtype=torch.float64)
    before = model(x, t)
    outputs = []
    model.net.mid[-1].register_forward_hook(lambda m, i, out: outputs.append(out))
    head = BottleneckHead(model, lambda: model(x[:1], t[:1]))
    feature = head.features(model, x, t)
    assert feature.shape == (5, 16, 4, 4) and torch.equal(feature, outputs[-1])
    assert torch.equal(model(x, t), before) and head(feature).shape == (5,)
    with pytest.raises(RuntimeError, match="no bottleneck feature"):
        head.take()
    with pytest.raises(ConfigError, match="known bottleneck") as info:
        bottleneck_module(torch.nn.Linear(2, 2))
    assert info.value.key == "distill.gan_weight"


BAD_TABLES = [
    ({"method": "dmd", "gan_weight": -0.1}, "distill.gan_weight", r"\[0.0, inf\]"),
    ({"method": "sid", "gan_fake_weight": 0.0, "gan_weight": 0.1}, "distill.gan_fake_weight", r"\(0.0, inf\]"),
    ({"method": "dmd", "gan_fake_weight": 0.1}, "distill.gan_fake_weight", "set distill.gan_weight > 0"),
    ({"method": "dmd", "gan_lr": 1e-3}, "distill.gan_lr", "GAN head, which is off"),
    ({"method": "dmd", "gan_lr": 0.0, "gan_weight": 0.1}, "distill.gan_lr", r"\(0.0, inf\]"),
    ({"method": "cd", "gan_weight": 0.1}, "distill", r"option\(s\) gan_weight not known for method 'cd'"),
]


@pytest.mark.parametrize("table, key, message", BAD_TABLES)
def test_bad_gan_tables_name_the_key(table, key, message):
    with pytest.raises(ConfigError, match=message) as info:
        TrainConfig(data="ring", distill=table)
    assert info.value.key == key


def test_a_gan_head_without_real_data_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="trains a GAN head on real data, but the run has none") as info:
        trainer(tmp_path, data=DATA[:0], gan_weight=0.1)
    assert info.value.key == "distill.gan_weight"
