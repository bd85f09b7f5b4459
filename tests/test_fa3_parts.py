"""FA3's flash_ops library travels in parts that each fit one device call: ci/fa3_parts.sh
splits and records checksums, bench/fa3_host.sh stages the parts one call at a time and
installs the verified library (round trip on a small stand-in file)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("xz") is None or shutil.which("split") is None, reason="needs xz and split")
def test_parts_round_trip(tmp_path):
    so = tmp_path / "flash_ops.abi3.so"
    so.write_bytes(os.urandom(3 * 1024 * 1024 + 123))  # incompressible: 4 parts of 1 MiB
    out = tmp_path / "parts"
    env = dict(os.environ, FA3_SO=str(so), FA3_OUT=str(out), FA3_PART_MIB="1", FA3_XZ="-0")
    subprocess.run([str(ROOT / "ci" / "fa3_parts.sh")], check=True, env=env, capture_output=True)
    parts = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert parts == ["p00", "p01", "p02", "p03"]
    assert all((out / p / "flash_ops.xz.part").stat().st_size <= 1024 * 1024 for p in parts)
    host = dict(os.environ, FA3_SRC=str(out), FA3_STAGE=str(tmp_path / "stage"), SITE=str(tmp_path / "site"))
    script = str(ROOT / "bench" / "fa3_host.sh")
    for i in (0, 1, 2):
        subprocess.run([script, "stage", str(i)], check=True, env=host, capture_output=True)
    r = subprocess.run([script, "install"], env=host, capture_output=True, text=True)
    assert r.returncode == 1 and "3 of 4 parts staged" in r.stderr
    subprocess.run([script, "stage", "03"], check=True, env=host, capture_output=True)
    subprocess.run([script, "install"], check=True, env=host, capture_output=True)
    assert (tmp_path / "site" / "sgl_kernel" / "flash_ops.abi3.so").read_bytes() == so.read_bytes()
    # a damaged part is caught before anything is installed over
    (tmp_path / "stage" / "part.p01").write_bytes(b"x")
    r = subprocess.run([script, "install"], env=host, capture_output=True, text=True)
    assert r.returncode == 1 and "do not match the manifest" in r.stderr
