"""The patch series and apply_patches.sh: validation, strict application, tamper refusal,
the rebase report and the repacked wheel.  Uses the pinned wheel from cache/wheels (which
`make test` downloads before pytest runs); skips where it is absent."""

import base64
import csv
import io
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "ci"))
import validate_series  # noqa: E402


def lock() -> dict:
    out = {}
    for line in (ROOT / "upstream.lock").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            out[k] = v
    return out


def pytag() -> str:
    return f"cp{sys.version_info.major}{sys.version_info.minor}"


@pytest.fixture(scope="module")
def pinned_wheel() -> Path:
    name = lock().get(f"SGLANG_WHEEL_{pytag()}")
    if not name:
        pytest.skip(f"no wheel pinned for {pytag()}")
    p = ROOT / "cache" / "wheels" / name
    if not p.exists():
        pytest.skip("pinned wheel not cached (run ./apply_patches.sh once)")
    return p


def run(*args, env=None, cwd=ROOT):
    e = dict(os.environ, PYTHON=sys.executable, **(env or {}))
    return subprocess.run(["bash", str(ROOT / "apply_patches.sh"), *args], cwd=cwd, env=e,
                          capture_output=True, text=True, timeout=600)


def sandbox(tmp_path, pinned_wheel, patches=None):
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(pinned_wheel, cache / pinned_wheel.name)
    env = {"KVTUNER_CACHE": str(cache), "KVTUNER_BUILD_DIR": str(tmp_path / "build"),
           "KVTUNER_DIST": str(tmp_path / "dist")}
    if patches:
        env["KVTUNER_PATCHES"] = str(patches)
    return cache, env


def test_upstream_lock_pins_three_wheels():
    lk = lock()
    assert lk["SGLANG_VERSION"] == "0.5.17" and lk["SGLANG_TAG"] == "v0.5.17"
    for tag in ("cp310", "cp311", "cp312"):
        assert lk[f"SGLANG_WHEEL_{tag}"].startswith(f"sglang-0.5.17-{tag}-{tag}-")
        assert len(lk[f"SGLANG_SHA256_{tag}"]) == 64


def test_series_is_valid():
    assert validate_series.validate(ROOT / "patches") == []


def test_validator_catches_problems(tmp_path):
    d = tmp_path / "patches"
    shutil.copytree(ROOT / "patches", d)
    listed = validate_series.read_series(d / "series")
    (d / "stray.patch").write_text("Description: x\nAuthor: y\nForwarded: no\n\n--- a/f\n+++ b/f\n")
    (d / "series").write_text((d / "series").read_text() + "missing.patch\n")
    first = d / listed[0]
    (d / (listed[0] + "~")).write_text(first.read_text())  # what `quilt refresh --backup` leaves
    first.write_text(first.read_text().replace("Forwarded: no", "Forwarded: yes"))
    problems = "\n".join(validate_series.validate(d))
    assert "stray.patch: not listed" in problems
    assert f"{listed[0]}~: not a patch of the series" in problems
    assert "lists missing.patch, which does not exist" in problems
    assert "Forwarded must be 'no'" in problems


def test_every_patch_has_dep3_header():
    for name in validate_series.read_series(ROOT / "patches" / "series"):
        fields = validate_series.header_fields((ROOT / "patches" / name).read_text())
        assert fields["Description"] and fields["Author"] and fields["Forwarded"] == "no", name


def test_check_mode_passes(tmp_path, pinned_wheel, quilt):
    _, env = sandbox(tmp_path, pinned_wheel)
    r = run("--check", "--offline", env=env)
    assert r.returncode == 0, r.stderr
    assert "no fuzz and no offset" in r.stderr
    assert not (tmp_path / "dist").exists()


def test_tampered_wheel_refused_nothing_left(tmp_path, pinned_wheel, quilt):
    cache, env = sandbox(tmp_path, pinned_wheel)
    with open(cache / pinned_wheel.name, "ab") as f:
        f.write(b"tampered")
    r = run("--offline", env=env)
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "sha256 mismatch" in err[0], r.stderr
    assert not (cache / pinned_wheel.name).exists()
    assert not (tmp_path / "dist").exists()
    assert not list((tmp_path / "build").glob("*")) if (tmp_path / "build").exists() else True


def _fuzzed_series(tmp_path, how):
    d = tmp_path / "patches"
    shutil.copytree(ROOT / "patches", d)
    name = validate_series.read_series(d / "series")[-1]
    p = d / name
    text = p.read_text()
    if how == "offset":  # move the first hunk's target line numbers
        import re

        text = re.sub(r"^@@ -(\d+)", lambda m: f"@@ -{int(m.group(1)) + 7}", text, count=1, flags=re.M)
    elif how == "fuzz":  # the first hunk's top context line changed: lands only with fuzz 1
        lines = text.splitlines(keepends=True)
        first_hunk = next(i for i, ln in enumerate(lines) if ln.startswith("@@"))
        assert lines[first_hunk + 1].startswith(" ") and lines[first_hunk + 2].startswith(" ")
        lines[first_hunk + 1] = " # a line edited after review\n"
        text = "".join(lines)
    elif how == "reject":  # a context line that is not in the source
        lines = text.splitlines(keepends=True)
        first_hunk = next(i for i, ln in enumerate(lines) if ln.startswith("@@"))
        i = next(i for i, ln in enumerate(lines) if i > first_hunk and ln.startswith(" ") and ln.strip())
        lines[i] = " this line is not in upstream\n"
        lines[i + 1] = " neither is this one\n" if lines[i + 1].startswith(" ") else lines[i + 1]
        text = "".join(lines)
    p.write_text(text)
    return d


def test_offset_fails_check(tmp_path, pinned_wheel, quilt):
    _, env = sandbox(tmp_path, pinned_wheel, _fuzzed_series(tmp_path, "offset"))
    r = run("--check", "--offline", env=env)
    assert r.returncode != 0 and "--check" in r.stderr and "offset" in r.stderr, r.stderr


def test_rejected_patch_leaves_nothing_half_applied(tmp_path, pinned_wheel, quilt):
    _, env = sandbox(tmp_path, pinned_wheel, _fuzzed_series(tmp_path, "reject"))
    r = run("--offline", env=env)
    assert r.returncode != 0 and "does not apply" in r.stderr, r.stderr
    assert not (tmp_path / "dist").exists()
    assert list((tmp_path / "build").iterdir()) == []


def test_rebase_report_table(tmp_path, pinned_wheel, quilt):
    _, env = sandbox(tmp_path, pinned_wheel)
    r = run("--upstream", "0.5.17", "--report", "--offline", env=env)
    assert r.returncode == 0, r.stderr
    rows = [ln.split() for ln in r.stdout.splitlines() if ln.startswith("kvtuner/")]
    series = validate_series.read_series(ROOT / "patches" / "series")
    assert [row[0] for row in rows] == series and all(row[1] == "clean" for row in rows)
    assert (ROOT / "patches" / "series").read_text().count(".patch") == len(series)  # untouched


def test_repacked_wheel(tmp_path, pinned_wheel, quilt):
    _, env = sandbox(tmp_path, pinned_wheel)
    r = run("--offline", env=env)
    assert r.returncode == 0, r.stderr
    whl = Path(r.stdout.strip().splitlines()[-1])
    assert whl.name.startswith("sglang-0.5.17+kvtuner.") and whl.name.endswith(pinned_wheel.name.split("0.5.17-", 1)[1])
    with zipfile.ZipFile(whl) as zf:
        names = zf.namelist()
        di = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        assert di.startswith("sglang-0.5.17+kvtuner.")
        assert "Version: 0.5.17+kvtuner." in zf.read(f"{di}/METADATA").decode()
        assert b"kvtuner_nbits_key" in zf.read("sglang/srt/server_args.py")
        assert not any(n.startswith((".pc/", "patches/")) or n.endswith((".orig", ".rej")) for n in names)
        rows = list(csv.reader(io.StringIO(zf.read(f"{di}/RECORD").decode())))
        assert len(rows) == len([n for n in names if not n.endswith("/")])
        assert any("," in r[0] for r in rows)  # sglang ships file names with commas
        for path, digest, size in rows:
            if not digest:
                continue
            data = zf.read(path)
            want = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert digest == f"sha256={want}" and int(size) == len(data), path
    # idempotent: a second run gives the same bytes
    first = whl.read_bytes()
    r2 = run("--offline", env=env)
    assert r2.returncode == 0 and whl.read_bytes() == first


# --- tamper refusal: what the "patch integrity" asks, each with the message it got ------
sys.path.insert(0, str(ROOT / "bench"))
from reliability_cpu import record  # noqa: E402


def _snapshot(d: Path) -> dict:
    """Every file under d (hidden ones included) with its bytes' sha256."""
    if not d.exists():
        return {}
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(d.rglob("*"))}


def _refused(tmp_path, env, what, *args):
    """Run a build that must fail; a wheel built earlier must survive byte for byte, and no
    scratch tree, partial wheel or quilt state may be left."""
    dist = tmp_path / "dist"
    dist.mkdir(exist_ok=True)
    prior = dist / "sglang-0.5.17+kvtuner.0-earlier-build.whl"
    prior.write_bytes(b"a wheel from an earlier good build")
    before = {"dist": _snapshot(dist), "build": _snapshot(tmp_path / "build")}
    r = run(*args, "--offline", env=env)
    err = r.stderr.strip().splitlines()
    msg = next((ln for ln in reversed(err) if ln.startswith("apply_patches.sh: error:")), err[-1] if err else "")
    record({"test": "test_apply_patches", "id": what, "argv": ["apply_patches.sh", *args, "--offline"],
            "exit_code": r.returncode, "message": msg})
    assert r.returncode != 0, r.stderr
    assert _snapshot(dist) == before["dist"], "dist/ changed"
    assert _snapshot(tmp_path / "build") == before["build"], "a scratch tree was left under build/"
    return msg


def test_fuzz_refused_nothing_half_applied(tmp_path, pinned_wheel, quilt):
    _, env = sandbox(tmp_path, pinned_wheel, _fuzzed_series(tmp_path, "fuzz"))
    msg = _refused(tmp_path, env, "patch_needs_fuzz")
    assert "does not apply" in msg, msg


def test_offset_refused_in_build_mode(tmp_path, pinned_wheel, quilt):
    """Not only --check: a plain build refuses a patch that lands at another line."""
    _, env = sandbox(tmp_path, pinned_wheel, _fuzzed_series(tmp_path, "offset"))
    msg = _refused(tmp_path, env, "patch_with_offset")
    assert "only with offset" in msg and "nothing was built" in msg, msg


def test_tampered_wheel_keeps_earlier_build(tmp_path, pinned_wheel, quilt):
    """sha256 mismatch of the cached wheel (one byte flipped, same size): refused before unpacking."""
    cache, env = sandbox(tmp_path, pinned_wheel)
    w = cache / pinned_wheel.name
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0xFF
    w.write_bytes(bytes(data))
    msg = _refused(tmp_path, env, "wheel_one_byte_flipped")
    assert "sha256 mismatch" in msg and not w.exists(), msg


@pytest.mark.parametrize("how", ["missing", "garbage"])
def test_broken_series_refused(tmp_path, pinned_wheel, quilt, how):
    d = tmp_path / "patches"
    shutil.copytree(ROOT / "patches", d)
    if how == "missing":  # series names a patch that is not there
        (d / "series").write_text((d / "series").read_text() + "kvtuner/9999-not-there.patch\n")
    else:  # a listed patch replaced by text that is not a diff
        last = validate_series.read_series(d / "series")[-1]
        (d / last).write_text("Description: x\nAuthor: y\nForwarded: no\n\nthis is not a diff\n")
    _, env = sandbox(tmp_path, pinned_wheel, d)
    msg = _refused(tmp_path, env, f"series_{how}_patch")
    assert "apply_patches.sh: error:" in msg, msg
