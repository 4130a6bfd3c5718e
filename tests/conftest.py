import torch
from hypothesis import settings

import fewstep

torch.set_default_dtype(torch.float32)
# One thread: the tests use small tensors, where two OpenMP threads fighting over a loaded 2-core machine cost far
# more than they gain (the whole suite ran 1.5x faster with one thread; one training test went from seconds to minutes).
torch.set_num_threads(1)


def all_processes():
    """One instance of every process, for parametrised tests."""
    return [
        fewstep.DiscreteVP.linear(),
        fewstep.DiscreteVP.scaled_linear(),
        fewstep.DiscreteVP.cosine(),
        fewstep.VP("linear"),
        fewstep.VP("cosine"),
        fewstep.VE(),
        fewstep.EDM(),
        fewstep.RectifiedFlow(),
    ]


def assert_exact_resume(make, steps: int = 4) -> tuple:
    """`make(folder)` builds a Trainer whose objective owns a `fake` network: `steps` steps straight equal steps / 2,
    save, resume in a fresh Trainer, steps / 2 more (generator, fake score and losses bit for bit). Returns the two
    trainers (straight, resumed)."""
    straight = make("a")
    for _ in range(steps):
        straight.train_step()
    first = make("b")
    for _ in range(steps // 2):
        first.train_step()
    path = first.save()
    resumed = make("b")
    assert resumed.resume(path) == steps // 2
    for _ in range(steps - steps // 2):
        resumed.train_step()
    for a, b in ((straight.model, resumed.model), (straight.objective.fake, resumed.objective.fake)):
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert resumed.loss_history == straight.loss_history
    return straight, resumed


# Hypothesis profiles for the property-based suite (tests/test_properties.py): "ci" is the default, derandomised
# with a fixed budget; "long" for local runs: `pytest tests/test_properties.py --hypothesis-profile=long`.
settings.register_profile("ci", max_examples=300, derandomize=True, database=None, deadline=None, print_blob=True)
settings.register_profile("long", max_examples=3000, deadline=None)
settings.load_profile("ci")


TINY_UNET = {"type": "unet", "in_channels": 1, "channels": [8], "mid_attention": False, "emb_features": 16}


def digits_pair(tmp_path) -> tuple:
    """A tiny random digits-shaped flow teacher and a 'student' storing times for 1 and 2 steps (90 s of training),
    saved under tmp_path as teacher.json / student.json; returns both loaded checkpoints."""
    from fewstep.distill.student import student_record
    from fewstep.nets import build_model
    from fewstep.train import load_checkpoint, save_checkpoint

    process = fewstep.RectifiedFlow()
    config = {"model": {"net": TINY_UNET, "prediction": "velocity"}, "process": {"type": "rectified_flow"},
              "train": {"data": "digits"}}  # fmt: skip
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "teacher", model=build_model(config["model"], process), config=config)
    config["train"]["distill"] = {"method": "ect", "teacher": "digits_flow"}  # continuous schedule: any time
    extra = {**student_record({1: [1.0, 0.0], 2: [1.0, 0.4, 0.0]}, 0.0), "train_seconds": 90.0}
    save_checkpoint(tmp_path / "student", model=build_model(config["model"], process), config=config, extra=extra)
    return load_checkpoint(tmp_path / "teacher.json"), load_checkpoint(tmp_path / "student.json")
