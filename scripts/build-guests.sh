#!/usr/bin/env bash
# Builds the example guests examples/wasm/*.wasm from their WAT sources in
# examples/wasm/src/ with wasmtime's own wat2wasm (the `wasmtime` Python package
# the project already depends on), so no compiler or Debian package is needed.
# Also writes the sample inputs vecadd.in.bin and mlp.in.bin.
# The built files are committed; run this after editing a source:
#     ./scripts/build-guests.sh          # uses .venv/bin/python, or $PYTHON
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
if ! "$PY" -c "import wasmtime" 2>/dev/null; then
  echo "build-guests: $PY cannot import wasmtime; create the venv first (./scripts/test.sh does) or set PYTHON" >&2
  exit 1
fi
"$PY" - <<'PYEOF'
import pathlib, wasmtime
out = pathlib.Path("examples/wasm")
for src in sorted((out / "src").glob("*.wat")):
    wasm = wasmtime.wat2wasm(src.read_text())
    wasmtime.Module.validate(wasmtime.Engine(), wasm)
    dest = out / (src.stem + ".wasm")
    dest.write_bytes(wasm)
    print(f"built {dest} ({len(wasm)} bytes)")
PYEOF
"$PY" examples/wasm/guest_io.py make-inputs examples/wasm
