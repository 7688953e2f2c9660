"""Native builds never collide: the JIT folder is named by a hash of what the build depends on, two source trees
with the same content share one build, a later load starts no compiler, a changed source gets a new hash, a
build lock is never taken over while its holder lives, and a stale prebuilt module is not loaded."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types
from pathlib import Path

import pytest

from fewbit_dist.ops import builder, buildinfo, loader

from utils import in_ci

LOAD = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from fewbit_dist.ops import builder
    start = time.perf_counter()
    module, info = builder.jit_load("cpu", csrc=Path(sys.argv[1]))
    seconds = time.perf_counter() - start
    assert module.bit_position(9, 3) == (3, 3) and module.build_hash == info["build_hash"]
    print(json.dumps({"name": info["name"], "compiled": info["compiled"], "seconds": seconds}))
""")


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    """Two copies of csrc in different folders, one TORCH_EXTENSIONS_DIR, and a CXX that logs each call."""
    import shutil

    root = tmp_path_factory.mktemp("native_build")
    copies = []
    for name in ("a", "b"):
        shutil.copytree(builder.find_csrc(), root / name / "csrc")
        copies.append(root / name / "csrc")
    log = root / "compiler.log"
    cxx = root / "counting-c++"
    cxx.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\nexec c++ "$@"\n')
    cxx.chmod(0o755)
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(root / "ext"), CXX=str(cxx), MAX_JOBS="2")
    return copies, env, log


def _load(tree, env) -> dict:
    out = subprocess.run([sys.executable, "-c", LOAD, str(tree)], env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _compiler_calls(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_two_trees_share_one_build_and_later_loads_start_no_compiler(trees):
    (a, b), env, log = trees
    first = _load(a, env)
    assert first["compiled"] and _compiler_calls(log) > 0  # the one build
    calls = _compiler_calls(log)
    for tree in (b, a, b):  # the other tree, then each again: all cache hits
        again = _load(tree, env)
        assert again["name"] == first["name"] and not again["compiled"]
        assert again["seconds"] < 5, again
    assert _compiler_calls(log) == calls  # no compiler started after the build


def test_a_changed_source_gets_a_new_hash_and_folder(trees, monkeypatch):
    (a, b), env, _ = trees
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", env["TORCH_EXTENSIONS_DIR"])
    monkeypatch.setenv("CXX", env["CXX"])
    before = builder.jit_plan("cpu", csrc=b)
    header = b / "include" / "fewbit" / "core.h"
    text = header.read_text()
    try:
        header.write_text(text + "\n// a changed header\n")
        after = builder.jit_plan("cpu", csrc=b)
    finally:
        header.write_text(text)
    assert after["build_hash"] != before["build_hash"] and after["folder"] != before["folder"]
    assert not after["built"]  # a load would build anew, in its own folder
    assert builder.jit_plan("cpu", csrc=a)["build_hash"] == before["build_hash"]  # only content counts


def test_the_hash_covers_flags_route_compiler_and_device(tmp_path, monkeypatch):
    csrc = builder.find_csrc()
    base = buildinfo.build_hash(csrc, "cpu", "torch", ["-O3"])
    assert len(base) == buildinfo.HASH_CHARS and base == buildinfo.build_hash(csrc, "cpu", "torch", ["-O3"])
    assert buildinfo.build_hash(csrc, "cpu", "torch", ["-O2"]) != base
    assert buildinfo.build_hash(csrc, "cpu", "deepspeed", ["-O3"]) != base
    assert buildinfo.build_hash(csrc, "cuda", "torch", ["-O3"]) != base
    monkeypatch.setenv("CXX", "clang++")
    assert buildinfo.build_hash(csrc, "cpu", "torch", ["-O3"]) != base
    with pytest.raises(ValueError, match="device must be one of"):
        buildinfo.build_hash(csrc, "tpu", "torch")


def test_a_build_lock_is_held_until_its_holder_dies(tmp_path):
    folder = tmp_path / "build"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from fewbit_dist.ops.builder import build_lock
        with build_lock(Path({str(folder)!r})):
            print("held", flush=True)
            time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert (folder / builder.LOCK_NAME).read_text() == str(holder.pid)  # whoever waits is told whom for
        acquired = threading.Event()

        def take():
            with builder.build_lock(folder):
                acquired.set()

        waiter = threading.Thread(target=take, daemon=True)
        waiter.start()
        assert not acquired.wait(2.0)  # the holder lives: the lock is not taken over, whatever its age
        os.kill(holder.pid, signal.SIGKILL)
        assert acquired.wait(10.0)  # the kernel released it with its holder
        waiter.join(10)
        assert (folder / builder.LOCK_NAME).read_text() == str(os.getpid())
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_builds_torch_lock_does_not_hang_the_next_build(tmp_path, monkeypatch):
    """torch's own lock file in the folder (left by a build killed inside torch's load) is removed by the next
    builder, which holds the flock, so it cannot belong to a live build; the next build then runs."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    plan = builder.jit_plan("cpu")
    plan["folder"].mkdir(parents=True)
    (plan["folder"] / "lock").write_text("")
    fake = types.SimpleNamespace(build_hash=plan["build_hash"])

    def compile_(p, staged, verbose):
        assert not (p["folder"] / "lock").exists()
        assert (staged / "cpu" / "fewbit_cpu.cpp").is_file() and staged.is_relative_to(p["folder"])
        p["library"].write_bytes(b"")
        return fake

    monkeypatch.setattr(builder, "_compile", compile_)
    module, info = builder.jit_load("cpu")
    assert module is fake and info["compiled"] and builder.jit_plan("cpu")["built"]


def test_a_stale_prebuilt_module_is_not_loaded(monkeypatch):
    stale = types.ModuleType("fewbit_dist._fewbit_cpu")
    stale.build_hash, stale.__file__ = "000000000000", "/elsewhere/_fewbit_cpu.so"
    monkeypatch.setitem(sys.modules, "fewbit_dist._fewbit_cpu", stale)
    with pytest.warns(RuntimeWarning, match="built from other sources or for another torch"):
        assert loader._load_prebuilt("cpu") is None
    stale.build_hash = loader.prebuilt_hash("cpu")
    assert loader._load_prebuilt("cpu") is stale


def test_the_environment_loads_the_module_built_at_setup():
    """scripts/setup.sh builds the CPU kernels at install time (FEWBIT_BUILD_OPS=1): the suite loads that module,
    whose build hash matches the package's sources, and starts no compiler. Elsewhere (an install that
    skipped the build) the JIT build is the fallback."""
    import importlib.util

    from fewbit_dist.ops import native

    if importlib.util.find_spec("fewbit_dist._fewbit_cpu") is None:
        if in_ci():
            pytest.fail("scripts/setup.sh did not build fewbit_dist._fewbit_cpu")
        pytest.skip("this environment was installed without FEWBIT_BUILD_OPS=1")
    native.native_module("cpu")
    state = native.native_state("cpu")
    assert state["source"] == "prebuilt" and not state["compiled"], state
    assert state["build_hash"] == loader.prebuilt_hash("cpu")
