"""Claimed instructions on the GPU (plan policy "queue", option claim_tail): SMs take records
of Program.claim with an atomic at run time. The steps match the fp32 oracle, every record
runs exactly once, a stuck wait among them is reported, and a kernel built without the claim
code (the default build: Decoder adds -DMK_CLAIMS=1 for them) is not handed such programs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megakernel import Decoder, ModelConfig, Weights, plan
from megakernel.scheduler import isa

from test_gpu_decoder import RANDOM_CONFIGS, assert_within_bf16, relative_errors

pytestmark = pytest.mark.gpu

QUEUE = {"policy": "queue"}
TAIL = {"claim_tail": "lmhead"}


@pytest.mark.parametrize("rec", [(), ("-DMK_CLAIM_REC=0",)], ids=["rec_smem", "rec_l2"])
@pytest.mark.parametrize("batch", [1, 2, 8])
@pytest.mark.parametrize("opts", [QUEUE, TAIL], ids=["queue", "lmhead_tail"])
@pytest.mark.parametrize("cfg", [ModelConfig.preset("tiny"), RANDOM_CONFIGS[1]],
                         ids=lambda c: c.name)
def test_claims_match_fp32(cfg, opts, batch, rec):
    """Batch 1-2 run the b1 build, 8 the default one (tensor cores); three positions, three
    steps each: the claim list starts over at every launch. rec_l2: the consumers read a
    claimed record from L2 (-DMK_CLAIM_REC=0), not from the copy the loader left in shared
    memory."""
    err_mk, err_bf = relative_errors(cfg, batch, positions=[0, 37, 1000], build_flags=rec,
                                     **opts)
    assert_within_bf16(err_mk, err_bf, f"{cfg.name} B={batch} {opts} {rec}")


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("opts", [QUEUE, {**TAIL, "lmhead_slices": 528}],
                         ids=["queue", "lmhead_tail"])
def test_llama_1b_claims_match_fp32(opts, batch):
    cfg = ModelConfig.preset("llama-3.2-1b")
    err_mk, err_bf = relative_errors(cfg, batch, positions=[5, 4090], steps=2, **opts)
    assert_within_bf16(err_mk, err_bf, f"llama-3.2-1b B={batch} {opts}")


@pytest.mark.parametrize("opts", [QUEUE, TAIL], ids=["queue", "lmhead_tail"])
@pytest.mark.parametrize("batch", [1, 8])
def test_every_claim_runs_once(batch, opts):
    """The timing build records who claimed what (Runtime.claimed): over two steps, each
    SM's row is increasing claim indices, then the dry claim's -1, then what the poison left;
    together the rows hold every claim index exactly once, and the queues as executed
    (Program.as_executed) validate."""
    cfg = ModelConfig.preset("tiny")
    w = Weights.random(cfg, seed=5, dtype=torch.bfloat16, device="cuda")
    dec = Decoder(cfg, w, batch=batch, max_seq=32, timing=True, **opts)
    prog, claimed = dec.program, dec.runtime.claimed
    assert prog.claim_len > 0 and claimed is not None
    for step in range(2):
        claimed.fill_(-7)                     # poison: every claim must be written
        dec.step(torch.arange(1, batch + 1, device="cuda") + step)
        rows = claimed.cpu().numpy()
        taken = []
        for sm, row in enumerate(rows):
            n = int(np.argmax(row < 0)) if (row < 0).any() else len(row)
            mine = row[:n]
            assert (np.diff(mine) > 0).all(), f"SM {sm}: claims out of order {mine}"
            if n < len(row):
                assert row[n] == -1, f"SM {sm}: no dry claim after {mine}"
                assert (row[n + 1:] == -7).all(), f"SM {sm}: writes past its dry claim"
            taken.extend(mine.tolist())
        assert sorted(taken) == list(range(prog.claim_len)), "claims not taken exactly once"
        masked = dec.runtime.claim_map()     # the poison past the dry claim masked
        assert np.array_equal(masked, np.where(np.cumsum(rows < 0, axis=1) > 0, -1, rows))
        executed = prog.as_executed(masked)
        assert executed.claim_len == 0
        assert sorted(executed.table().uid.tolist()) == list(range(prog.num_instructions))


def test_watchdog_reports_a_claimed_wait():
    """A claimed instruction whose counter never completes: the kernel names the counter,
    and check() puts the claim list back (claim_next 0) with the rest of the sync state."""
    cfg = ModelConfig.preset("tiny")
    w = Weights.random(cfg, seed=3, dtype=torch.bfloat16, device="cuda")
    broken = plan(cfg, batch=2, num_sms=8, policy="queue")
    waiting = broken.claim[broken.claim[:, isa.HEADER.index("wait0_count")] > 0]
    c = int(waiting[-1, isa.HEADER.index("wait0_first")])
    broken.counter_targets = broken.counter_targets.copy()
    broken.counter_targets[c] += 1
    dec = Decoder(cfg, w, batch=2, max_seq=16, program=broken, watchdog_ms=300)
    with pytest.raises(RuntimeError, match=f"counter {c}"):
        dec.step(torch.arange(1, 3, device="cuda"))
    assert int(dec.runtime.buffers.claim_next.item()) == 0


def test_claims_need_the_claim_build():
    """-DMK_CLAIMS=1 (Decoder adds it for a Program with claims; the ablate row MK_CLAIMS=1
    times what the claim code costs the static plans): static plans match in that build too,
    and a Runtime given a Program with claims but not the flag refuses it before a launch."""
    from megakernel.packing import pack_weights
    from megakernel.runtime import Runtime
    cfg = ModelConfig.preset("tiny")
    err_mk, err_bf = relative_errors(cfg, 2, positions=[0, 200], build_flags=("-DMK_CLAIMS=1",))
    assert_within_bf16(err_mk, err_bf, "tiny static plan, MK_CLAIMS=1")
    packed = pack_weights(Weights.random(cfg, seed=0, dtype=torch.bfloat16, device="cuda"))
    with pytest.raises(ValueError, match="MK_CLAIMS=1"):
        Runtime(packed, plan(cfg, num_sms=8, policy="queue"), 16)
