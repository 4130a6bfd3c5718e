"""No host-device synchronisation inside the sampling loop, for every registered solver.

A sync happens when a device value is read on the host: Tensor.item(), bool(tensor), float(tensor), int(tensor),
.tolist(), .numpy(). On CPU nothing stalls, so the test makes those calls raise while the loop runs (from the
first network evaluation to the callback of the last step) and samples with every solver. The samples are float32
and only float32 tensors are trapped: the solvers' coefficients are float64 host scalars by design, and reading
those is not a device sync.
"""

import pytest
import torch

import fewstep
from fewstep.solvers import solver_specs

# Solvers whose algorithm needs a host decision per step, by design (documented in their modules).
NEEDS_HOST_DECISION = {
    "dpm_adaptive": "adaptive step-size control accepts or rejects a step from the error norm",
}


class _Trap:
    """Makes host reads of tensors raise while armed."""

    NAMES = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__")

    def __init__(self, monkeypatch):
        self.armed = False
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(original, name))

    def _wrap(self, original, name):
        trap = self

        def guarded(tensor, *args, **kwargs):
            if trap.armed and tensor.dtype == torch.float32:
                raise AssertionError(f"host sync via Tensor.{name} inside the sampling loop")
            return original(tensor, *args, **kwargs)

        return guarded


def solver_options(name, process, model):
    if name == "dpm_solver_v3":
        return {"statistics": fewstep.v3_statistics(model, process, fewstep.ring2d().sample(64), grid_size=100)}
    return {}


@pytest.mark.parametrize("name", [n for n in solver_specs() if n not in NEEDS_HOST_DECISION])
def test_solver_loop_never_reads_device_values(name, monkeypatch):
    process = fewstep.DiscreteVP.linear()
    exact = fewstep.ring2d().model(process, "eps")  # computes in float64, reads nothing on the host
    options = solver_options(name, process, exact)
    steps = 6
    trap = _Trap(monkeypatch)

    def model(x, t):  # armed from the first network evaluation
        trap.armed = True
        return exact(x, t)

    def callback(info):
        if info["step"] == steps - 1:
            trap.armed = False

    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(4, 2, generator=generator)
    x = fewstep.sample(model, noise, process=process, solver=name, steps=steps, schedule="logsnr",
                       generator=generator, callback=callback, **options)  # fmt: skip
    trap.armed = False
    assert x.shape == noise.shape


def test_trap_catches_a_syncing_solver(monkeypatch):
    """The check can fail: a solver that reads a device value in its loop is caught."""
    from fewstep.solvers import _core, register

    @register("_test_syncing_ddim", order=1)
    def syncing(run, x):
        for i in run.range():
            pred = run.denoise(x, i)
            if pred.x0.abs().max().item() > 1e9:  # a host read of device data
                break
            x = run.ddim_step(i, pred)
            run.report(i, x, pred)
        return x

    try:
        with pytest.raises(AssertionError, match="host sync via Tensor.item"):
            test_solver_loop_never_reads_device_values("_test_syncing_ddim", monkeypatch)
    finally:
        del _core._REGISTRY["_test_syncing_ddim"]
