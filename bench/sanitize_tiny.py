"""A few megakernel steps on `tiny`, checked against the fp32 reference: the program
compute-sanitizer (memcheck, racecheck) runs on the device."""
import sys

import torch

from megakernel import Decoder, ModelConfig, ReferenceModel, Weights

cfg = ModelConfig.preset("tiny")
w = Weights.random(cfg, seed=0, dtype=torch.bfloat16, device="cuda")
dec = Decoder(cfg, w, batch=2, max_seq=32, num_sms=int(sys.argv[1]) if len(sys.argv) > 1 else 16)
ref = ReferenceModel(cfg, w, batch=2, max_seq=32, dtype=torch.float32)
worst = 0.0
for t in range(4):
    tok = torch.tensor([3 + t, 100 + t], device="cuda")
    a, b = dec.step(tok), ref.step(tok)
    worst = max(worst, ((a - b).abs().max() / b.abs().max()).item())
print(f"tiny: 4 steps, max relative error vs fp32 {worst:.2e}")
sys.exit(0 if worst < 0.05 else 1)
