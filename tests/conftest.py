import torch

import fewstep

torch.set_default_dtype(torch.float32)


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
