#!/usr/bin/env bash
# Build tests/c/test_simd_sets.c with the C core's sources (no Python) and run it:
#   native   with $CC (default gcc) on this machine: on x86-64 the AVX2 and AVX-512 sets
#            (where the CPU has them) against scalar;
#   clang    the same with clang, when it is installed;
#   aarch64  cross-compiled with aarch64-linux-gnu-gcc and run under qemu-aarch64: the NEON
#            set against scalar.
# Usage: scripts/check_simd_sets.sh [--quick] [--werror] [--install] [native|clang|aarch64 ...]
#   (no target: all three; a missing tool skips its target with a note, unless the target
#   was named). --install apt-gets the cross compiler and qemu when they are missing.
#   --quick leaves out the longest rows; --werror makes compiler warnings errors.
# Portable to macOS (bash 3.2, Apple clang: CC=clang ... native).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
quick=""
install=0
werror=""
targets=()
for a in "$@"; do
    case "$a" in
        --quick) quick="--quick" ;;
        --install) install=1 ;;
        --werror) werror="-Werror" ;;
        native|clang|aarch64) targets+=("$a") ;;
        *) echo "usage: $0 [--quick] [--werror] [--install] [native|clang|aarch64 ...]" >&2
           exit 2 ;;
    esac
done
named=${#targets[@]}
[ "$named" -gt 0 ] || targets=(native clang aarch64)

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

cflags=(-std=c11 -O2 -fno-math-errno -ffp-contract=off -Wall -Wextra -Wno-unused-parameter
        -Wno-missing-field-initializers -I"$repo/csrc")
[ -n "$werror" ] && cflags+=("$werror")

# build CC OUT X86: compile every core file (in parallel) and the test, link to OUT
build() {
    local cc="$1" out="$2" x86="$3" dir="$work/$(basename "$2").obj" defs="" pids=()
    mkdir -p "$dir"
    [ "$x86" = 1 ] && defs="-DTKA_HAVE_X86=1"
    # the core: every C file of csrc/ but the CPython wrappers; from csrc/cpu/ the portable
    # files and, on x86, the per-ISA ones with their flags (as setup.py does)
    local files=() f
    for f in "$repo"/csrc/*.c; do
        case "$(basename "$f")" in module.c|pyutil.c|pyerr.c|py_*.c) ;; *) files+=("$f:") ;; esac
    done
    for f in "$repo"/csrc/cpu/*.c; do
        case "$f" in
            *_avx2.c) [ "$x86" = 1 ] && files+=("$f:-mavx2 -mfma -mf16c") ;;
            *_avx512.c) [ "$x86" = 1 ] && files+=("$f:-mavx512f -mavx512bw -mavx2 -mfma -mf16c") ;;
            *) files+=("$f:") ;;
        esac
    done
    files+=("$repo/tests/c/test_simd_sets.c:")
    for spec in "${files[@]}"; do
        local src="${spec%%:*}" extra="${spec#*:}"
        # shellcheck disable=SC2086
        "$cc" "${cflags[@]}" $defs $extra -c "$src" -o "$dir/$(basename "$src" .c).o" &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p"; done
    "$cc" -o "$out" "$dir"/*.o -lm -pthread
}

have() { command -v "$1" > /dev/null 2>&1; }
is_x86() { case "$(uname -m)" in x86_64|amd64|i?86) return 0 ;; *) return 1 ;; esac; }
status=0
run_target() {  # run_target NAME CMD...: time it, keep going on failure
    local name="$1"; shift
    local t0=$SECONDS
    if "$@"; then
        echo "simd-sets[$name]: passed in $((SECONDS - t0)) s"
    else
        echo "simd-sets[$name]: FAILED"
        status=1
    fi
}

for t in "${targets[@]}"; do
    case "$t" in
    native)
        cc="${CC:-gcc}"
        x86=0; is_x86 && x86=1
        echo "simd-sets[native]: $($cc --version | head -n 1), $(uname -m)"
        build "$cc" "$work/native" "$x86"
        run_target native "$work/native" $quick
        ;;
    clang)
        if ! have clang; then
            [ "$named" -gt 0 ] && { echo "simd-sets[clang]: clang not found"; status=1; } \
                || echo "simd-sets[clang]: skipped (clang not installed)"
            continue
        fi
        x86=0; is_x86 && x86=1
        echo "simd-sets[clang]: $(clang --version | head -n 1)"
        build clang "$work/clang" "$x86"
        run_target clang "$work/clang" $quick
        ;;
    aarch64)
        if [ "$(uname -m)" = aarch64 ]; then
            echo "simd-sets[aarch64]: this machine is aarch64: see the native run"
            continue
        fi
        if ! have aarch64-linux-gnu-gcc || ! have qemu-aarch64; then
            if [ "$install" = 1 ]; then
                apt-get install -y -q gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user \
                    > "$work/apt.log" 2>&1 || { tail -n 20 "$work/apt.log"; exit 1; }
            elif [ "$named" -gt 0 ]; then
                echo "simd-sets[aarch64]: needs aarch64-linux-gnu-gcc and qemu-aarch64" \
                     "(Debian: gcc-aarch64-linux-gnu qemu-user; or pass --install)"
                status=1; continue
            else
                echo "simd-sets[aarch64]: skipped (no aarch64-linux-gnu-gcc or qemu-aarch64)"
                continue
            fi
        fi
        echo "simd-sets[aarch64]: $(aarch64-linux-gnu-gcc --version | head -n 1)," \
             "$(qemu-aarch64 --version | head -n 1)"
        build aarch64-linux-gnu-gcc "$work/aarch64" 0
        run_target aarch64 qemu-aarch64 -L /usr/aarch64-linux-gnu "$work/aarch64" $quick
        ;;
    esac
done
exit "$status"
