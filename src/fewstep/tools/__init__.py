"""Benchmarks, demos and evaluation built on the library core (nothing in the core imports this package).

- `bench`: `fewstep bench accuracy` / `overhead` — solver error against exact Gaussian-mixture answers, solver overhead
- `peers`: the diffusers / k-diffusion adapter behind `fewstep bench accuracy --peers` and `fewstep bench learned`
- `bench_learned`: `fewstep bench learned` — the defaults against the sweep and the peers on the shipped models
- `bench_steer`: `fewstep bench steer` — FK steering of the digits model to a class, the exact bed, inversion errors
- `evaluate`: `fewstep eval` — sample metrics (FD, precision / recall, classifier statistics) on the digits models
- `classifier`: the small digits classifier whose features the digits metrics use (`python -m fewstep.tools.classifier`)
- `demo`, `digits_demo`: `fewstep demo`
"""
