#!/usr/bin/env bash
# Build the C core with AddressSanitizer + UndefinedBehaviorSanitizer and run the test
# suite against it.
#
# The build happens in a throwaway copy of the repository (tracked files plus untracked
# files git does not ignore), so the developer's in-place build is never touched. The
# script fails (non-zero exit) on a build failure, a test failure, or any sanitizer report,
# including reports from subprocesses the tests start (every report is also written to a
# log directory that is checked at the end).
#
# Usage:   scripts/sanitize.sh [pytest arguments...]      (default: -q tests)
# Env:     PYTHON   interpreter with numpy, setuptools, pytest (default: python3)
#          CC       compiler (default: gcc; its ASan runtime is preloaded)
#          KEEP=1   keep the temporary copy and the sanitizer logs
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
CC="${CC:-gcc}"
export CC

say() { printf 'sanitize: %s\n' "$*" >&2; }
die() { say "$*"; exit 2; }

work="$(mktemp -d "${TMPDIR:-/tmp}/topkattn-sanitize.XXXXXX")"
cleanup() {
    if [ "${KEEP:-0}" = 1 ]; then say "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
src="$work/src"
logs="$work/logs"
mkdir -p "$src" "$logs"

# ---------------------------------------------------------------- copy the sources
if git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # --ignore-failed-read: a tracked file deleted in the working tree is skipped.
    (cd "$repo" && git ls-files -z --cached --others --exclude-standard \
        | tar --null --no-recursion --ignore-failed-read -T - -cf - 2>/dev/null) \
        | tar -xf - -C "$src"
else
    tar -C "$repo" --exclude=./build --exclude='*.so' --exclude='*.o' --exclude='./.venv*' \
        --exclude=./.git -cf - . | tar -xf - -C "$src"
fi
[ -f "$src/setup.py" ] || die "copy of $repo has no setup.py"

# ---------------------------------------------------------------- sanitized build
say "building with TOPKATTN_SANITIZE=1 in $src"
(cd "$src" && TOPKATTN_SANITIZE=1 "$PYTHON" setup.py -q build_ext --inplace) \
    || die "sanitized build failed"

so="$(ls "$src"/topkattn/_core*.so 2>/dev/null | head -n 1)"
[ -n "$so" ] || die "the build produced no topkattn/_core*.so"
case "$(ldd "$so")" in
    *libasan*) ;;
    *) die "$so is not linked against libasan (does setup.py honour TOPKATTN_SANITIZE=1?)" ;;
esac

libasan="$("$CC" -print-file-name=libasan.so)"
case "$libasan" in
    /*) libasan="$(readlink -f "$libasan")" ;;
    *) die "$CC does not know where libasan.so is (gcc -print-file-name=libasan.so)" ;;
esac
[ -f "$libasan" ] || die "ASan runtime $libasan does not exist"
# libstdc++ must be loaded when ASan starts, or its __cxa_throw interceptor finds no real
# function and aborts the first time a C++ extension (e.g. matplotlib's) throws.
preload="$libasan"
libstdcxx="$("$CC" -print-file-name=libstdc++.so.6)"
case "$libstdcxx" in /*) [ -f "$libstdcxx" ] && preload="$preload:$(readlink -f "$libstdcxx")" ;; esac

# ---------------------------------------------------------------- run the tests
# detect_leaks=0: CPython keeps allocations alive until exit by design.
# allocator_may_return_null=1: huge allocations fail with NULL (exercising the error
# paths) instead of aborting. PYTHONMALLOC=malloc routes Python's small objects through
# malloc as well, so overruns into them are caught.
export LD_PRELOAD="$preload${LD_PRELOAD:+:$LD_PRELOAD}"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:allocator_may_return_null=1:log_path=$logs/asan"
# UBSan (a separate runtime with gcc) ignores log_path: its reports go to stderr, which
# is kept out of pytest's capture (--capture=sys) and scanned below; abort_on_error makes
# a report in a test's subprocess fail that subprocess visibly (SIGABRT).
export UBSAN_OPTIONS="halt_on_error=1:abort_on_error=1:print_stacktrace=1"
export PYTHONMALLOC=malloc
export PYTHONPATH="$src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONFAULTHANDLER=1

(cd "$src" && "$PYTHON" -c '
import sys, topkattn._core as c
assert c.__file__.startswith(sys.argv[1]), c.__file__
' "$src") || die "cannot import the sanitized build from $src"

if [ "$#" -eq 0 ]; then set -- -q tests; fi
say "running pytest $* (LD_PRELOAD=$LD_PRELOAD)"
set +e
(cd "$src" && "$PYTHON" -m pytest -p no:cacheprovider --capture=sys "$@") 2>&1 \
    | tee "$work/pytest.log"
rc=${PIPESTATUS[0]}
set -e

reports=("$logs"/*)
if [ -e "${reports[0]}" ]; then
    say "sanitizer reports:"
    for f in "${reports[@]}"; do
        printf '==== %s\n' "$(basename "$f")" >&2
        cat "$f" >&2
    done
    say "FAILED: ${#reports[@]} sanitizer report(s)"
    exit 1
fi
if grep -Eq 'runtime error:|ERROR: [A-Za-z]+Sanitizer|SUMMARY: [A-Za-z]+Sanitizer' \
        "$work/pytest.log"; then
    say "FAILED: sanitizer report in the test output (see above)"
    exit 1
fi
if [ "$rc" -eq 5 ]; then
    say "FAILED: pytest collected no tests"
    exit 1
fi
if [ "$rc" -ne 0 ]; then
    say "FAILED: pytest exited with status $rc"
    exit "$rc"
fi
say "passed: no sanitizer reports"
