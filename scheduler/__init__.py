"""The megakernel scheduler: instruction set, lowering, SM assignment, counters, validation,
cost model. numpy only: it imports neither torch nor CUDA. Installed as megakernel.scheduler.

    plan(cfg, batch, num_sms, policy, tp, granularity, attn_splits, gpu, **options) -> Program
                                  (tp > 1: a TpProgram, one Program per rank)
    validate(program)             raises ValueError on an unsafe or wrong plan
    simulate(program, gpu) -> Timeline   predicted per-SM timeline (Chrome trace export)
"""
from .cost import GpuSpec
from .isa import Op, WORDS
from .plan import plan
from .program import Program, TpProgram
from .simulate import Timeline, simulate
from .validate import validate

__all__ = ["GpuSpec", "Op", "WORDS", "Program", "Timeline", "TpProgram", "plan", "simulate",
           "validate"]
