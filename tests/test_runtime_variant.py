"""Which interpreter build a Program fits (megakernel/runtime.py b1_misfit), on the CPU: the
GPU tests (test_gpu_decoder.py test_variant_choice) check the same through the Decoder."""
from __future__ import annotations

import numpy as np
import pytest

from megakernel import ModelConfig, plan
from megakernel.runtime import accumulator_floats, b1_misfit, choose_variant
from megakernel.scheduler.isa import Op

LIMITS = {"max_batch": 2, "acc_floats": 4096, "max_group": 4}   # csrc/megakernel_b1.cu


def rows_of(program, op):
    ins = program.instructions
    live = np.arange(ins.shape[1])[None] < program.queue_len[:, None]
    return ins[..., 9][live & (ins[..., 0] == int(op))]      # nrows: word 9 of every matvec


@pytest.mark.parametrize("batch", [1, 2])
def test_llama_1b_fits_the_b1_build(batch):
    p = plan(ModelConfig.preset("llama-3.2-1b"), batch=batch, num_sms=132)
    need = accumulator_floats(p)
    # the LM head's slices are the widest: 128256 rows over 132 SMs
    assert need == rows_of(p, Op.LMHEAD).max() * batch == 972 * batch
    assert b1_misfit(p, LIMITS) is None


def test_misfits_name_the_limit():
    cfg = ModelConfig.preset("llama-3.2-1b")
    assert "batches up to 2" in b1_misfit(plan(cfg, batch=3, num_sms=132), LIMITS)
    # fewer SMs: wider LM head slices than the b1 build's accumulators hold
    few = plan(cfg, batch=2, num_sms=16)
    assert accumulator_floats(few) > 4096
    assert "accumulators" in b1_misfit(few, LIMITS)
    g8 = ModelConfig("g8", vocab_size=4096, hidden_size=576, intermediate_size=1536,
                     num_layers=2, num_heads=8, num_kv_heads=1, head_dim=64)
    assert "groups of up to 4" in b1_misfit(plan(g8, batch=1, num_sms=132), LIMITS)


def test_choose_variant():
    cfg = ModelConfig.preset("llama-3.2-1b")
    b1, b2, b3 = (plan(cfg, batch=b, num_sms=132) for b in (1, 2, 3))
    assert choose_variant(b1, "auto", LIMITS) == "b1"
    assert choose_variant(b2, "auto", LIMITS) == "b1"
    assert choose_variant(b2, "b1", LIMITS) == "b1"
    assert choose_variant(b3, "auto", LIMITS) == "default"
    assert choose_variant(b1, "default", LIMITS) == "default"
    with pytest.raises(ValueError, match="batches up to 2"):
        choose_variant(b3, "b1", LIMITS)
    with pytest.raises(ValueError, match="variant must be one of"):
        choose_variant(b1, "small", LIMITS)
