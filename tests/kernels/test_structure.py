"""The packed decode kernel as the compiler builds it for sm_90, on any machine (no GPU):
with prefetch 2 the packed bytes stream through multi-buffered asynchronous copies and no
unpacked float16 tile goes through shared memory; the register-prefetch form (1) round-trips
every unpacked tile (what ncu showed limits it, bench/NOTES-decode.md)."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

triton = pytest.importorskip("triton")
if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
    pytest.skip("Triton's NVIDIA backend (ptxas) is not installed", allow_module_level=True)

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402


def _s(variant: str, tmp_path, asym: bool = True, kernel: str = "per-token", **extra_env) -> dict:
    """Compile in a process of its own: the tests run kernels under the Triton interpreter,
    whose functions cannot be compiled (``extra_env``: kernel_structure's KS_* switches)."""
    tag = "_".join(f"{k}{v}" for k, v in extra_env.items())
    out = tmp_path / f"{kernel}_{variant.replace(',', '_')}{'' if asym else '_sym'}{tag}.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | extra_env
    env["PYTHONPATH"] = str(ROOT / "kernels")
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "kernel_structure.py"), "--kernel", kernel, "--kv", "4,4",
                        *(["--asym"] if asym else []), "--variants", variant, "--out", str(out)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert "error" not in row, row
    return row


def test_prefetch2_streams_packed_bytes_multi_buffered(tmp_path):
    s = _s("64,2,4,3", tmp_path)
    assert s["async_copies"] > 0
    assert s["packed_buffers"] and all(b[0] >= 2 for b in s["packed_buffers"])  # num_stages - 1 tiles in flight
    # only the two query chunks (one per 4-bit field), written once before the loop
    assert s["f16_tiles_via_shared"] == 2
    assert s["spill_bytes"] in (0, None)


def test_register_prefetch_round_trips_unpacked_tiles(tmp_path):
    s = _s("128,1,4,2", tmp_path)
    assert s["async_copies"] == 0 and s["f16_tiles_via_shared"] > 2


def test_v_transposed_pages_stream_both_operands_without_byte_loads(tmp_path):
    """The experimental paged form (V transposed within pages of 64): both packed tiles come by
    asynchronous copies, the P x V operand is read without single-byte shared-memory loads, and
    no unpacked float16 tile goes through shared memory: only the query's chunks, written once (int4
    keys of head_dim 128 are read as 32-bit words there, ``K_WORDS``: one query chunk per bit field
    and byte of a word, 2 x 4)."""
    s = _s("0,0,4,3,64", tmp_path)
    assert s["v_page"] == 64 and s["block_n"] == 64
    assert s["async_copies"] > 0 and s["f16_tiles_via_shared"] == 8
    if s.get("loop_instructions"):  # nvdisasm present: the loop itself
        assert s["loop_lds_bytes"] == 0 and s["loop_mma"] > 0
    ref = _s("64,0,4,2", tmp_path)  # token-major V: the operand is gathered byte by byte
    if ref.get("loop_instructions"):
        assert ref["loop_lds_bytes"] > 0


def test_paged_default_keeps_a_tile_of_copies_in_flight(tmp_path):
    """The paged form as launched (the slot index a tile ahead, 3 stages, capped at 128): the loop's
    top waits only for the older tile's copies, the newer stay in flight; with the index loaded in
    the iteration and 2 stages (the earlier default) it waits for every copy issued before it."""
    s = _s("0,0,4,3,64,1,1,128", tmp_path)
    assert s["idx_ahead"] and s["async_copies"] > 0 and s["spill_bytes"] in (0, None)
    if s.get("loop_instructions"):
        assert s["loop_copy_wait"] and s["loop_copy_wait"] > 0
    old = _s("0,0,4,2,64,1,1,128,0", tmp_path)
    if old.get("loop_instructions"):
        assert old["loop_copy_wait"] == 0


def test_one_warp_keeps_the_probabilities_in_registers(tmp_path):
    """The one-warp launch of the usual form (one warp a program, sums every tile, 255 registers; the
    default for symmetric low-bit formats on a full grid until the swapped form replaced it): no spills, copies in flight, and fewer barriers a tile than the
    4-warp form, whose warps exchange the probabilities through shared memory (Triton 3.6, the GPU
    host's: 2 against 7 and no shared-memory store in the loop; CI's 3.8: 2 against 6)."""
    s = _s("0,0,1,3,64,1,0,255", tmp_path, asym=False)
    assert s["num_warps"] == 1 and s["async_copies"] > 0 and s["spill_bytes"] in (0, None)
    four = _s("0,0,4,3,64,1,1,128", tmp_path, asym=False)  # the 4-warp default
    if s.get("loop_instructions") and four.get("loop_instructions"):
        assert s["loop_copy_wait"] and s["loop_barriers"] <= 2 < four["loop_barriers"]


def test_swapped_form_halves_the_mmas_of_one_warp(tmp_path):
    """Tokens on the MMA's M side (``swap``, ``decode_swapped``): with 7 query heads a KV head on N in a
    block of 8, a 64-token tile of int4 takes half the MMAs of the one-warp usual form (64 against 128:
    its heads fill rows of 16), streams both packed tiles multi-buffered, and sends only the query's
    chunks through shared memory as float16, once; no spills (Triton 3.6, strides as the JIT
    specializes them: 196 registers against 255)."""
    s = _s("0,0,1,3,64,1,0,0", tmp_path, asym=False, kernel="swapped")
    assert s["async_copies"] > 0 and all(b[0] >= 2 for b in s["packed_buffers"])
    assert s["f16_tiles_via_shared"] == 2 and s["spill_bytes"] in (0, None)
    one = _s("0,0,1,3,64,1,0,255", tmp_path, asym=False)
    if s.get("loop_mma") and one.get("loop_mma"):
        assert 2 * s["loop_mma"] == one["loop_mma"]


def test_swapped_meta_rows_come_by_async_copies(tmp_path):
    """The swapped form's meta rows (two float16 a token and head, symmetric int4) read as 32-bit words
    (``meta_words``, its default): the pipeliner stages them with the packed bytes, so no global load
    narrower than 32 bits is left in the loop; read as float16 (meta_words off) they are 16-bit loads
    in the iteration, which ncu found every tile waiting on (H100, session 32)."""
    s = _s("0,0,1,3,64,1,0,0", tmp_path, asym=False, kernel="swapped")
    old = _s("0,0,1,3,64,1,0,0", tmp_path, asym=False, kernel="swapped", KS_META_WORDS="0")
    assert s["async_copies"] > old["async_copies"] and s["spill_bytes"] in (0, None)
    if s.get("loop_instructions") and old.get("loop_instructions"):
        assert s["loop_ldg_narrow"] == 0 < old["loop_ldg_narrow"]


def test_swapped_slot_chunks_leave_no_load_in_the_loop(tmp_path):
    """With the tiles' first slots loaded 32 at a time before their loop (``idx_ahead=2``) the swapped
    form's inner loop has no global load into registers left (its copies stay async, its slots come
    from a register vector); loaded a tile ahead (1) the slot is one such load, which ncu found 40%
    of the int4 loop's stall samples waiting on (H100, session 33)."""
    one = _s("0,0,1,3,64,1,0,0,1", tmp_path, asym=False, kernel="swapped")
    chunk = _s("0,0,1,3,64,1,0,0,2", tmp_path, asym=False, kernel="swapped")
    assert chunk["async_copies"] == one["async_copies"] > 0 and chunk["spill_bytes"] in (0, None)
    if one.get("loop_instructions") and chunk.get("loop_instructions"):
        assert chunk["loop_mma"] == one["loop_mma"] > 0
        assert chunk["loop_ldg"] == 0 < one["loop_ldg"]


def test_bias_forms_take_the_subtraction_out_of_the_loop(tmp_path):
    """``v_bias`` (values converted under a field's own exponent, the bias off once a tile) and, for
    per-channel keys, ``key_bias``: fewer loop instructions than the subtraction a pair of codes, the
    same MMAs, no spills (offline Triton 3.6, int4 sym swapped 1,278 -> 1,251; K4V4 per-channel
    1,584 -> 1,459)."""
    for kernel, asym, variant, env in (("swapped", False, "0,0,1,3,64,1,0,0,1", {"KS_V_BIAS": "1"}),
                                       ("kivi-swapped", True, "64,0,1,3,64,1", {"KS_V_BIAS": "1", "KS_KEY_BIAS": "1"})):
        old = _s(variant, tmp_path, asym=asym, kernel=kernel)
        new = _s(variant, tmp_path, asym=asym, kernel=kernel, **env)
        assert new["spill_bytes"] in (0, None) and new["async_copies"] == old["async_copies"] > 0
        if old.get("loop_instructions") and new.get("loop_instructions"):
            assert new["loop_mma"] == old["loop_mma"] > 0
            assert new["loop_instructions"] < old["loop_instructions"]
