"""A few megakernel steps on `tiny`, checked against the fp32 reference: the program
compute-sanitizer (memcheck, racecheck) runs on the device.
Usage: sanitize_tiny.py [num_sms=16] [batch=2] [plan options as key=int ...]
(batch >= 3 runs the tensor-core matvec), e.g. fuse_reduce=1. SAN_BUILD_FLAGS (environment):
extra kernel build flags, space-separated, e.g. "-DMK_POLLERS=3"."""
import os
import sys

import torch

from megakernel import Decoder, ModelConfig, ReferenceModel, Weights
from megakernel.scheduler.plan import parse_options

cfg = ModelConfig.preset("tiny")
B = int(sys.argv[2]) if len(sys.argv) > 2 else 2
w = Weights.random(cfg, seed=0, dtype=torch.bfloat16, device="cuda")
options = parse_options(",".join(sys.argv[3:]))
flags = tuple(os.environ.get("SAN_BUILD_FLAGS", "").split())
dec = Decoder(cfg, w, batch=B, max_seq=32, num_sms=int(sys.argv[1]) if len(sys.argv) > 1 else 16,
              build_flags=flags, **options)
ref = ReferenceModel(cfg, w, batch=B, max_seq=32, dtype=torch.float32)
worst = 0.0
for t in range(4):
    tok = torch.tensor([(3 + 97 * b + t) % cfg.V for b in range(B)], device="cuda")
    a, b = dec.step(tok), ref.step(tok)
    worst = max(worst, ((a - b).abs().max() / b.abs().max()).item())
print(f"tiny {options} {' '.join(flags)}: 4 steps, max relative error vs fp32 {worst:.2e}")
sys.exit(0 if worst < 0.05 else 1)
