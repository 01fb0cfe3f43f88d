#!/usr/bin/env bash
# Run one fuzz target for SECONDS on the ASan+UBSan build (fuzz/build.sh).
#
# Usage: fuzz/run.sh TARGET SECONDS [libFuzzer options...]
#        TARGET: core | attention | search   (fuzz/fuzz_TARGET.py)
# Seeds come from fuzz/corpus/TARGET (committed); new inputs go to fuzz/corpus-work/TARGET;
# a crashing input is written to fuzz/findings/ and the exit status is non-zero.
# fuzz/run.sh TARGET 0 FILE... reruns saved inputs (e.g. a finding) only.
# Env: PYTHON (default python3; needs numpy, atheris, mpmath), CC (default clang),
#      FUZZ_BUILD (build directory, default fuzz/.build),
#      FUZZ_WORK (where new inputs collect, default fuzz/corpus-work; TARGET/ below it)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[ "$#" -ge 2 ] || { sed -n 4,11p "$0"; exit 2; }
target="$1"; seconds="$2"; shift 2
script="$here/fuzz_$target.py"
[ -f "$script" ] || { echo "fuzz/run.sh: no target '$target' ($script)" >&2; exit 2; }
PYTHON="${PYTHON:-python3}"
build="$(PYTHON="$PYTHON" "$here/build.sh" "${FUZZ_BUILD:-$here/.build}")"
runtime="$("$PYTHON" -c 'import atheris, os; print(os.path.join(atheris.path(), "asan_with_fuzzer.so"))')"
[ -f "$runtime" ] || { echo "fuzz/run.sh: atheris has no $runtime" >&2; exit 2; }
work="${FUZZ_WORK:-$here/corpus-work}/$target"
mkdir -p "$work" "$here/findings" "$here/corpus/$target"
export TOPKATTN_FUZZ_BUILD="$build" TOPKATTN_NUM_THREADS="${TOPKATTN_NUM_THREADS:-2}"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
export ASAN_OPTIONS="detect_leaks=0:quarantine_size_mb=64:allocator_may_return_null=1:abort_on_error=0:halt_on_error=1:handle_abort=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
# given input files (a finding to reproduce), run just those instead of the corpus
dirs=("$work" "$here/corpus/$target")
for a in "$@"; do [ -f "$a" ] && dirs=(); done
LD_PRELOAD="$runtime" exec "$PYTHON" "$script" \
    -max_total_time="$seconds" -timeout=30 -rss_limit_mb=3072 -malloc_limit_mb=3072 \
    -max_len=4096 -print_final_stats=1 -artifact_prefix="$here/findings/$target-" \
    "$@" "${dirs[@]}"
