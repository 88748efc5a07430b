"""The megakernel scheduler: instruction set, lowering, SM assignment, counters, validation,
cost model. numpy only: it imports neither torch nor CUDA. Installed as megakernel.scheduler."""
from .isa import Op, WORDS
