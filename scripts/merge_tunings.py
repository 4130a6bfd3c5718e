"""Merge tuning artefacts of one model (later files' entries win): python scripts/merge_tunings.py OUT IN1 IN2 ..."""

import sys

from fewstep.tuning import Tuning

out, first, *rest = sys.argv[1:]
t = Tuning.load(first)
for path in rest:
    other = Tuning.load(path)
    if (other.model, other.process, other.prediction) != (t.model, t.process, t.prediction):
        sys.exit(f"{path} is a tuning of another model, process or prediction than {first}")
    t.entries.update(other.entries)
t.entries = dict(sorted(t.entries.items()))
t.save(out)
print("wrote", out, sorted(t.entries))
