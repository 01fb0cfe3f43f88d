#!/usr/bin/env bash
# Build topkattn._core with clang, AddressSanitizer + UBSan and libFuzzer coverage
# instrumentation (-fsanitize=fuzzer-no-link) into a copy of the repository, for the
# atheris targets in fuzz/. The in-place build of the checkout is never touched.
#
# Usage: fuzz/build.sh [DIR]   (default: fuzz/.build; prints DIR on success)
# Env:   PYTHON (default python3), CC (default clang)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$repo/fuzz/.build}"
PYTHON="${PYTHON:-python3}"
CC="${CC:-clang}"
command -v "$CC" >/dev/null || { echo "fuzz/build.sh: $CC not found (apt-get install clang)" >&2; exit 2; }
stamp="$out/.stamp"
# rebuild only when a build input changed
want="$(cd "$repo" && cat setup.py csrc/*.c csrc/*.h csrc/cpu/* fuzz/build.sh | sha1sum | cut -c1-40)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && ls "$out"/topkattn/_core*.so >/dev/null 2>&1; then
    cp "$repo"/topkattn/*.py "$out/topkattn/"   # the Python layer as it is now
    echo "$out"; exit 0
fi
rm -rf "$out"; mkdir -p "$out"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard -- setup.py pyproject.toml csrc topkattn \
    | tar --null --no-recursion --ignore-failed-read -T - -cf - 2>/dev/null) | tar -xf - -C "$out"
san="-fsanitize=address,undefined,fuzzer-no-link -fno-sanitize-recover=all -fno-omit-frame-pointer -g"
(cd "$out" && CC="$CC" LDSHARED="$CC -shared" CFLAGS="$san" LDFLAGS="$san" TOPKATTN_CUDA=0 \
    "$PYTHON" setup.py -q build_ext --inplace) >"$out/build.log" 2>&1 \
    || { tail -n 40 "$out/build.log" >&2; echo "fuzz/build.sh: build failed" >&2; exit 1; }
echo "$want" > "$stamp"
echo "$out"
