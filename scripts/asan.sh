#!/usr/bin/env bash
# Sanitizer run of the compiled kernels (`make asan`; not part of the default test suite).
# Builds tramontane.quant._kernels with AddressSanitizer + UndefinedBehaviorSanitizer into a separate
# folder (the in-place module is left alone), then runs pytest on the given tests (default: the
# kernel and compiled-step tests) with that build loaded in place of the in-place one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${ASAN_BUILD:-/tmp/tramontane-asan}
[ -x "$PY" ] || { echo "asan: $PY not found (make setup-test first)" >&2; exit 2; }
[ $# -gt 0 ] || set -- tests/test_quant_kernels.py tests/test_compiled_step.py

rm -rf "$OUT"
TRAMONTANE_KERNELS_CFLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -g -O1" \
  "$PY" setup.py -q build_ext --build-lib "$OUT/lib" --build-temp "$OUT/tmp"
SO=$(ls "$OUT"/lib/tramontane/quant/_kernels*.so)

# The runtimes must come first in the process (python itself is not instrumented); Python's
# allocations live until exit by design, hence no leak report.
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export LD_PRELOAD ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
# The kernels read the activations setting at import, before conftest.py could set the suite's default.
export TRAMONTANE_ACTIVATIONS=${TRAMONTANE_ACTIVATIONS:-f32}

# Register the sanitized module under the package's name before anything imports it.
exec "$PY" -c '
import importlib.util, sys
spec = importlib.util.spec_from_file_location("tramontane.quant._kernels", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
sys.modules[spec.name] = module
from tramontane.quant import kernels
assert kernels.extension() is module, "the sanitized build was not the one imported"
print("sanitized kernels:", module.__file__, module.isas())
import pytest
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", *sys.argv[2:]]))
' "$SO" "$@"
