"""Distillation on the existing Trainer: consistency distillation / training (CD, CT, iCT, ECT) as one objective with
orthogonal options, and progressive distillation (PD); students are ordinary fewstep models.

A method is an objective of `fewstep.train.Trainer` (no second training loop: checkpoints, exact resume, EMA, DDP and
bf16 are the Trainer's), selected by the config table `distill = {method = ..., teacher = ..., <options>}`
(`fewstep.distill.options` lists them with their defaults):

    cfg = distill_config("cd", "digits_flow", steps=4000, out_dir="runs/cd")  # process, net, data: the teacher's
    Trainer(cfg).train()
    student = fewstep.train.load_checkpoint("runs/cd")           # a consistency DiffusionModel predicting "x0"
    x = sample_student(student, torch.randn(16, 1, 8, 8), steps=1)          # its stored times: 1 step, 1 NFE

or `fewstep distill --method cd --teacher digits_flow --steps 4000 --out runs/cd`. A teacher in memory (the exact
mixture): `teacher = Teacher(fewstep.ring2d().model(process, "x0"), process, "x0")`, then
`Trainer(distill_config("cd", teacher, net={...}, data="ring"), teacher=teacher)`. The student is built around the
teacher's network and starts from its weights; with an eps teacher the student's data prediction divides by alpha
(errors x 80 at s = 80): on ring2d a fresh MLP student with inner eps had map error 2.2 after 500 CD steps, with
inner x0 0.16, so prefer a v, velocity or x0 teacher. Without a teacher (CT, ECT from scratch) the
student's inner network is the config's `net`, `prediction`, `precond` (prediction="x0", precond="edm" is the
parameterization of the consistency papers).
Papers: Song et al. (2023), Song & Dhariwal (2024), Geng et al. (2024), Salimans & Ho (2022), Kim et al. (2024).
"""

from ..train.objective import TABLE_CHECKS, register_objective
from .config import distill_config
from .consistency import ConsistencyObjective, l2_distance, pseudo_huber_distance
from .dmd import DistributionMatchingObjective, dmd_gradient, dmd_loss, sid_loss
from .options import (
    METHODS,
    ConsistencyOptions,
    MatchingOptions,
    ProgressiveOptions,
    ReflowOptions,
    check_config_table,
    parse_table,
)
from .pairs import PairError, load_pairs, write_pairs
from .progressive import ProgressiveObjective, truncated_snr
from .reflow import ReflowObjective, straightness
from .schedules import (
    draw_continuous,
    draw_discrete,
    ect_gap,
    ict_intervals,
    karras_sigmas,
    scaled_sigma,
    time_of,
)
from .student import consistency_config, sample_student, stored_times, student_plan
from .targets import ddim_step, prediction_pair, progressive_target, teacher_step
from .teacher import Teacher, load_teacher

for _method in ("cd", "ct", "ect"):
    register_objective(_method, ConsistencyObjective)
register_objective("pd", ProgressiveObjective)
for _method in ("dmd", "sid"):
    register_objective(_method, DistributionMatchingObjective)
register_objective("reflow", ReflowObjective)
if check_config_table not in TABLE_CHECKS:
    TABLE_CHECKS.append(check_config_table)

__all__ = [
    "METHODS",
    "ConsistencyObjective",
    "ConsistencyOptions",
    "DistributionMatchingObjective",
    "MatchingOptions",
    "PairError",
    "ProgressiveObjective",
    "ProgressiveOptions",
    "ReflowObjective",
    "ReflowOptions",
    "Teacher",
    "consistency_config",
    "ddim_step",
    "distill_config",
    "dmd_gradient",
    "dmd_loss",
    "draw_continuous",
    "draw_discrete",
    "ect_gap",
    "ict_intervals",
    "karras_sigmas",
    "l2_distance",
    "load_pairs",
    "load_teacher",
    "parse_table",
    "prediction_pair",
    "progressive_target",
    "pseudo_huber_distance",
    "sample_student",
    "scaled_sigma",
    "sid_loss",
    "stored_times",
    "straightness",
    "student_plan",
    "teacher_step",
    "time_of",
    "truncated_snr",
    "write_pairs",
]
