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
