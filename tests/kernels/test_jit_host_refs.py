"""No ``@triton.jit`` function of the package calls a host helper of the ``triton`` module
(``triton.next_power_of_2``, ``triton.cdiv``, ...).  Triton 3.6, the GPU hosts' version, refuses such a
reference when it hashes a kernel ("Unsupported function referenced"), which fails every launch that
reaches the function; the interpreter and newer Tritons accept it, so the CPU tests would not see it
(session 39: the fused merge's ``triton.next_power_of_2`` failed every swapped decode on the H100)."""

import ast
from pathlib import Path

OPS = Path(__file__).resolve().parents[2] / "kernels" / "kvtuner" / "ops"


def _is_jit(dec: ast.expr) -> bool:
    d = dec.func if isinstance(dec, ast.Call) else dec
    return isinstance(d, ast.Attribute) and d.attr == "jit" and isinstance(d.value, ast.Name) and d.value.id == "triton"


def test_jit_functions_reference_no_triton_host_helper():
    bad = []
    for f in sorted(OPS.glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.FunctionDef) and any(_is_jit(d) for d in node.decorator_list):
                for sub in (n for stmt in node.body for n in ast.walk(stmt)):
                    if (isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name)
                            and sub.value.id == "triton"):
                        bad.append(f"{f.name}:{sub.lineno} {node.name}: triton.{sub.attr}")
    assert not bad, "host helpers referenced inside Triton kernels (pass a constexpr instead):\n" + "\n".join(bad)
