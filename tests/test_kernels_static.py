"""The attention kernel compiles for Hopper (sm_90a) without a GPU, without spills, within shared memory.

`triton.compile` with an explicit GPUTarget needs no driver; registers and spills come from
`ptxas -v` on the PTX (benchmarks/kernel_static.py). CI compiles the first autotune config of each
SD head dim in fp16 (~15-25 s each on 2 cores). `invedit bench kernel --static` sweeps every
candidate for sm_80 and sm_90a and writes kernel-static.json (recorded in benchmarks/results/) and
autotune.json, the record the kernel reads (shipped as kernels/data/autotune.json): the shipped
record must be exactly what the sweep command makes of the recorded sweep and of
kernel-static-triton3.6.json, the autotune configs compiled by Triton 3.6 (the GPU machines'
version), whose failures are excluded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.kernel_static import SHARED_LIMIT, compile_config, exclusions_from, make_autotune_record
from kernels import triton_attention
from kernels.triton_attention import STATIC_EXCLUDED, STATIC_OK, autotune_configs

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "kernel-static.json"
RESULTS_36 = RESULTS.with_name("kernel-static-triton3.6.json")


@pytest.mark.parametrize("head_dim", [40, 64, 80, 160])  # 64: SD-2, on the d=40 list
def test_first_autotune_config_compiles_for_sm90a_without_spills(head_dim):
    config = autotune_configs(head_dim, torch.float16)[0]
    result = compile_config(head_dim, torch.float16, config, 90)
    assert result.registers <= 255
    assert (result.spill_stores, result.spill_loads) == (0, 0), result
    assert 0 < result.shared_bytes <= SHARED_LIMIT[90], result


def test_shipped_autotune_record_is_what_the_sweep_command_writes_from_the_recorded_results():
    recorded = json.loads(RESULTS.read_text())
    recorded_36 = json.loads(RESULTS_36.read_text())
    assert triton_attention.autotune_record() == make_autotune_record(recorded, exclusions_from(recorded_36))


def test_autotune_lists_are_the_configs_the_recorded_sweep_passed():
    recorded = json.loads(RESULTS.read_text())["passing"]
    assert {f"d{head_dim}-{dtype}" for head_dim, dtype in STATIC_OK} == set(recorded)
    for (head_dim, dtype), names in STATIC_OK.items():
        assert list(names) == recorded[f"d{head_dim}-{dtype}"], (head_dim, dtype)
    for head_dim in (40, 80, 160):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            tuned = autotune_configs(head_dim, dtype)
            key = "fp32" if dtype == torch.float32 else "fp16"
            allowed = [n for n in STATIC_OK[(head_dim, key)] if f"d{head_dim}-{key}-{n}" not in STATIC_EXCLUDED]
            assert len(tuned) == min(6, len(allowed))
            assert {str(c) for c in tuned} <= set(allowed)
            assert tuned, (head_dim, dtype)  # every SD head dim keeps a spill-free config


def test_configs_that_spill_under_triton_3_6_are_the_recorded_ones():
    """The GPU machines compile with Triton 3.6: its recorded failures are exactly the exclusions."""
    assert set(json.loads(RESULTS_36.read_text())["failing"]) == STATIC_EXCLUDED
