"""The Triton kernels under Triton's CPU interpreter, against their torch paths.

The kernels (the sink-column sums behind `column_sums`, the ASD decode attention) normally run
only on CUDA (tests/test_mds.py, tests/test_asd.py and tests/test_gpu.py check them there); the
interpreter runs the same programs on numpy, so CI checks their tiling, causal edges, padding and
options on any machine with triton installed. Each case runs in a subprocess because
``TRITON_INTERPRET`` is read when a kernel is defined.
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
from analyses import column_math as attn

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


def interpret(script: str, argument: object) -> dict[str, float]:
    """Run ``script`` (which prints a JSON dict last) with Triton's interpreter on."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", script, json.dumps(argument)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "+".join(o) or "plain")
def test_column_kernel_matches_torch_path_in_interpreter(options):
    errors = interpret(CHECK, options)
    for case, error in errors.items():
        # float16: rounding of q, k and the probabilities; float32: exact up to summation order.
        assert error < (2e-3 if "float16" in case else 1e-5), (case, error)


DECODE = r"""
import json, sys
import torch
from analyses.asd import decode_attention

multiplicative = json.loads(sys.argv[1])
torch.manual_seed(0)
errors = {}
# 150 keys: a partial last block, 30 generated keys after the prompt (3 key splits); 2300 keys: 18 splits of
# 2 blocks each, the last split partly empty; with a fill level (static cache) of 1000 the splits past it are empty
for t, tp, length in ((150, 120, None), (2300, 900, None), (2300, 900, 1000)):
    b, h, kv, d = 3, 4, 2, 24
    q, k, v = torch.randn(b, h, 1, d), torch.randn(b, kv, t, d), torch.randn(b, kv, t, d)
    flag = (torch.rand(tp) < 0.2).float()
    boost = torch.tensor([0.0, 0.5, 2.0])
    weights = torch.rand(tp, 8) * (torch.rand(tp, 8) < 0.3)
    fill = None if length is None else torch.tensor(length)
    for dtype in (torch.float16, torch.float32):
        args = (q.to(dtype), k.to(dtype), v.to(dtype), d ** -0.5, flag, boost, weights, multiplicative)
        out_t, sums_t = decode_attention(*args, backend="triton", length=fill)
        out_r, sums_r = decode_attention(*args, backend="torch", length=fill)
        errors[f"{t}-{length}-{dtype}-out"] = float((out_t.float() - out_r.float()).abs().max())
        errors[f"{t}-{length}-{dtype}-sums"] = float((sums_t - sums_r).abs().max())
print(json.dumps(errors))
"""


@pytest.mark.parametrize("multiplicative", [False, True], ids=["pre-softmax", "multiplicative"])
def test_asd_decode_kernel_matches_torch_path_in_interpreter(multiplicative):
    errors = interpret(DECODE, multiplicative)
    for case, error in errors.items():
        # float16: the output is stored in float16; the statistics are float32 throughout.
        assert error < (2e-3 if "float16-out" in case else 1e-5), (case, error)
