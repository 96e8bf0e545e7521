"""The fused decode-step kernels (normalised_hebbian_step, bsbr_rows_step) compile for an H100
(sm_90: Triton's frontend, its passes and ptxas) on a machine without a GPU. The interpreter,
which runs them everywhere else in the tests, accepts Python the compiler refuses (a variable
that changes type, constexpr arithmetic), so this is the check that they build for the GPU."""
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from kernels.bsbr import decode_rows_triton as rows
    from kernels.hebbian import normalised_step_triton as heb

    POINTERS = dict(q="*bf16", k="*bf16", v="*bf16", kbuf="*bf16", vbuf="*bf16", o="*bf16",
                    s="*fp32", F="*fp32", hs="*fp32", sal="*fp32", fill="*i32", counts="*i32",
                    slot_level="*i32", slot_pos="*i32", caps="*i32", starts="*i32",
                    valid="*i8")
    FLOATS = ("eps", "scale", "long_scale", "inv_sqrt_k", "decay", "inv_c")

    def build(fn, **consts):
        sig = {a: "constexpr" if a in consts else POINTERS.get(a, "fp32" if a in FLOATS
                                                                 else "i32")
               for a in fn.arg_names}
        triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                       target=GPUTarget("cuda", 90, 32))
        print("built", fn.__name__, consts)

    build(heb.normalised_step_kernel, BK=64, BV=64, RELU=False)
    for L, bounded, valid in ((3, True, True), (1, False, False)):
        build(rows._rows_attend, L=L, BK=64, BV=64, BJ=64, BS=32, TOPK=8, BOUNDED=bounded,
              HAS_VALID=valid)
        build(rows._rows_advance, L=L, BK=64, BV=64, BJ=64, BC=16, BOUNDED=bounded,
              HAS_VALID=valid, PREC="tf32")
''')


def test_the_decode_step_kernels_compile_for_sm90(tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)           # a fresh build, not a cached one
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("built") == 5, done.stdout
