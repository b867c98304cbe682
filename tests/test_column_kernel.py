"""The fused Triton column kernel under Triton's CPU interpreter: every option against the torch path.

The kernel normally runs only on CUDA (tests/test_mds.py checks it there); the interpreter runs
the same program on numpy, so CI checks its tiling, causal edges, padding and options on any
machine with triton installed. Each case runs in a subprocess because ``TRITON_INTERPRET`` is
read when the kernel is defined.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]

CHECK = r"""
import json, sys
import torch
from analyses import attention as attn

options = json.loads(sys.argv[1])
torch.manual_seed(0)
b, h, kv, t, d = 2, 4, 2, 100, 16       # t is not a multiple of the tiles: partial last tiles
q, k = torch.randn(b, h, t, d), torch.randn(b, kv, t, d)
scale = d ** -0.5
lse = attn.attention_lse(q, k, scale)
cols = torch.stack([torch.sort(torch.randperm(t)[:45]).values for _ in range(b)]).int()
cols[0, -1] = t - 1                     # a column with no later row
cols[1, 30:] = -1                       # padding
groups = torch.randint(-1, 3, (b, t)).int()
config = {"block_s": 16, "block_q": 16, "num_warps": 4, "num_stages": 1, **options}
attn.TRITON_CONFIG = dict(config)
attn.TRITON_CONFIG_WIDE = dict(config)
errors = {}
for dtype in (torch.float16, torch.float32):
    qd, kd = q.to(dtype), k.to(dtype)
    for strict in (True, False):
        fused = attn._column_sums_triton(qd, kd, lse, cols, groups, 3, scale, strict)
        plain = attn._column_sums_torch(qd.float(), kd.float(), lse, cols.long(), groups.long(), 3, scale, strict)
        errors[f"{dtype}-{strict}"] = float((fused - plain).abs().max() / plain.abs().max())
print(json.dumps(errors))
"""

OPTIONS = [{}, {"fma_exp": 1}, {"trans_q": 1}, {"reverse": 1}, {"heads_first": 1},
           {"fma_exp": 1, "trans_q": 1, "reverse": 1, "heads_first": 1}]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "+".join(o) or "plain")
def test_column_kernel_matches_torch_path_in_interpreter(options):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", CHECK, json.dumps(options)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    for case, error in errors.items():
        # float16: rounding of q, k and the probabilities; float32: exact up to summation order.
        assert error < (2e-3 if "float16" in case else 1e-5), (case, error)
