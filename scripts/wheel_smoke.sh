#!/usr/bin/env bash
# The package as a user gets it: build a wheel (`pip wheel . --no-deps --no-build-isolation`), install it with
# `pip install --no-deps --target DIR`, make DIR read-only and, from an empty folder with PYTHONPATH=DIR, check
# that fewbit_dist is imported from DIR, converts a model with every shipped preset by name, JIT-builds its native
# CPU op from the installed sources (FEWBIT_NATIVE=1, a fresh TORCH_EXTENSIONS_DIR) and uses it (the second
# install finds the first one's build: same sources, same build hash), keeps a forward
# hook registered before `convert`, and that `python -m fewbit_dist.report` lists every registered native op.
# Then the same from a plain (non-editable) `pip install .` into another folder.
# Everything happens in temporary folders; the sources are copied first, so no build/ of the checkout is used.
# FEWBIT_VENV chooses the environment (default .venv); it needs torch, deepspeed (or ninja), setuptools.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${FEWBIT_VENV:-$root/.venv}/bin/python"
log() { printf '[wheel-smoke] %s\n' "$*" >&2; }

work="$(mktemp -d)"
cleanup() { chmod -R u+w "$work" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
mkdir -p "$work/src" "$work/wheels" "$work/empty" "$work/ext"

# The sources a checkout has (tracked and untracked, minus what git ignores), or the folder as it is.
if git -C "$root" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  (cd "$root" && git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
     [ -e "$f" ] && printf '%s\0' "$f"; done | tar --null -T - -cf -) | tar -xf - -C "$work/src"
else
  tar -C "$root" --exclude=.venv --exclude=build --exclude='*.egg-info' -cf - . | tar -xf - -C "$work/src"
fi

pip() { "$py" -m pip --disable-pip-version-check -q "$@"; }
log "building the wheel"
(cd "$work/src" && pip wheel . --no-deps --no-build-isolation -w "$work/wheels")
wheel="$(ls "$work"/wheels/fewbit_dist-*.whl)"
log "installing $(basename "$wheel") into a temporary folder"
pip install --no-deps --target "$work/wheel-site" "$wheel"
log "installing the sources with a plain (non-editable) pip install"
pip install --no-deps --no-build-isolation --target "$work/pip-site" "$work/src"
rm -rf "$work/src"  # nothing of the sources is left to find

cat > "$work/checks.py" <<'EOF'
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

import fewbit_dist

site = Path(os.environ["FEWBIT_SMOKE_SITE"]).resolve()
pkg = Path(fewbit_dist.__file__).resolve().parent
assert pkg == site / "fewbit_dist", f"fewbit_dist imported from {pkg}, not from the install in {site}"

# The native sources are package data, and the builder finds them there.
from fewbit_dist.ops import builder, native

assert builder.find_csrc() == pkg / "csrc", builder.find_csrc()
for src in builder.cpu_sources() + builder.cuda_sources():
    assert Path(src).is_file() and Path(src).is_relative_to(pkg), src


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(
        fc1=nn.Linear(16, 32), act=nn.GELU(), drop=nn.Dropout(0.1), fc2=nn.Linear(32, 16), classifier=nn.Linear(16, 3)))


# Every shipped preset converts a model by name, and the converted model trains.
from fewbit_dist import presets

names = presets.list_presets()
expected = {"exact", "safe", "max-saving", "fewbit-paper"}
assert expected <= set(names), f"shipped presets {names} lack {sorted(expected - set(names))}"
for name in names:
    model = fewbit_dist.convert(small_model(), name)
    model(torch.randn(5, 16)).sum().backward()
    assert all(p.grad is not None for p in model.parameters()), name

# FEWBIT_NATIVE=1: the CPU op is JIT-built from the installed sources and used.
x = torch.randn(1001)
borders = torch.tensor([-1.0, 0.0, 1.0])
packed = torch.ops.fewbit.encode_pack(x, borders, 2)
state = native.native_state("cpu")
assert state["loaded"] and state["source"] == "jit", state
# Both installs share one TORCH_EXTENSIONS_DIR: the first builds, the second (the same sources) finds that build.
assert state["compiled"] == (os.environ["FEWBIT_SMOKE_EXPECT_BUILD"] == "1"), state
assert torch.equal(packed, native.reference_encode_pack(x, borders, 2))
built = list(Path(os.environ["TORCH_EXTENSIONS_DIR"]).rglob(f"{builder.CPU_NAME}*.so"))
assert built, f"no {builder.CPU_NAME} module was built under TORCH_EXTENSIONS_DIR"

# A forward hook registered before convert still fires after it, on the replacement.
model = small_model()
seen = []
model.act.register_forward_hook(lambda module, args, output: seen.append((type(module), output.shape)))
fewbit_dist.convert(model, activation_bits=3, linear_bits=8)
model(torch.randn(4, 16))
assert seen == [(fewbit_dist.GELU, torch.Size([4, 32]))], seen

# The report lists every native op registered with torch.library, each in use from the built module.
ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fewbit::"))
assert ops, "no fewbit:: op is registered"
out = subprocess.run([sys.executable, "-m", "fewbit_dist.report"], capture_output=True, text=True, check=True).stdout
print(out)
for op in ops:
    line = next((ln for ln in out.splitlines() if op in ln and ln.lstrip().startswith("cpu")), None)
    assert line is not None and "native" in line, f"the report does not list {op} as native on cpu:\n{out}"
print(f"ok: {len(names)} presets, native {', '.join(ops)} built from {pkg / 'csrc'}")
EOF

expect_build=1
for site in "$work/wheel-site" "$work/pip-site"; do
  log "checking the install in $(basename "$site") (read-only) from an empty folder"
  chmod -R a-w "$site"
  (cd "$work/empty" && env PYTHONPATH="$site" FEWBIT_SMOKE_SITE="$site" FEWBIT_NATIVE=1 DS_ACCELERATOR=cpu \
     TORCH_EXTENSIONS_DIR="$work/ext" FEWBIT_SMOKE_EXPECT_BUILD=$expect_build PYTHONDONTWRITEBYTECODE=1 \
     "$py" "$work/checks.py")
  expect_build=0
done
log "passed"
