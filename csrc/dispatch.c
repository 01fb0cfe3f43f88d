/*
 * dispatch.c - pick the kernel set once at import: on x86-64 from CPUID and XGETBV, on
 * aarch64 NEON (baseline there). A set is one tka_kernels table per instruction set; the
 * certified search reaches its own kernels through that table (tka_kernels.search), so
 * every kernel follows the same choice. Compiled for the baseline of the target: nothing
 * here may use an instruction the CPU lacks.
 */
#include <stdatomic.h>
#include <string.h>

#include "internal.h"
#include "search.h"

#ifdef TKA_HAVE_X86
#include <cpuid.h>

static uint64_t xgetbv0(void)
{
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}
#endif

typedef struct {
    int avx2, fma, avx512f, avx512bw, avx512ifma, avx512vnni, f16c;
    char names[128];
} cpu_info;

static cpu_info detect(void)
{
    cpu_info c;
    memset(&c, 0, sizeof c);
    strcpy(c.names, "");
#ifdef TKA_HAVE_X86
    unsigned a, b, cx, d;
    if (!__get_cpuid(1, &a, &b, &cx, &d)) return c;
    int sse2 = (d >> 26) & 1, fma = (cx >> 12) & 1, osxsave = (cx >> 27) & 1, avx = (cx >> 28) & 1,
        f16c = (cx >> 29) & 1;
    /* The OS must save the wide registers: XCR0 bits 1,2 (SSE, AVX) and 5,6,7 (opmask, ZMM). */
    uint64_t xcr0 = osxsave ? xgetbv0() : 0;
    int ymm_ok = (xcr0 & 0x6) == 0x6, zmm_ok = (xcr0 & 0xe6) == 0xe6;
    int avx2 = 0, avx512f = 0, avx512bw = 0, avx512ifma = 0, avx512vnni = 0;
    if (__get_cpuid_max(0, 0) >= 7) {
        __cpuid_count(7, 0, a, b, cx, d);
        avx2 = (b >> 5) & 1;
        avx512f = (b >> 16) & 1;
        avx512ifma = (b >> 21) & 1;
        avx512bw = (b >> 30) & 1;
        avx512vnni = (cx >> 11) & 1;
    }
    c.fma = fma && avx && ymm_ok;
    c.avx2 = avx2 && avx && ymm_ok;
    c.avx512f = avx512f && zmm_ok;
    c.avx512ifma = avx512ifma && zmm_ok;
    c.avx512bw = avx512bw && zmm_ok;
    c.avx512vnni = avx512vnni && zmm_ok;
    c.f16c = f16c && avx && ymm_ok;
    if (sse2) strcat(c.names, "sse2,");
    if (avx && ymm_ok) strcat(c.names, "avx,");
    if (c.avx2) strcat(c.names, "avx2,");
    if (c.fma) strcat(c.names, "fma,");
    if (c.f16c) strcat(c.names, "f16c,");
    if (c.avx512f) strcat(c.names, "avx512f,");
    if (c.avx512bw) strcat(c.names, "avx512bw,");
    if (c.avx512ifma) strcat(c.names, "avx512ifma,");
    if (c.avx512vnni) strcat(c.names, "avx512vnni,");
    size_t len = strlen(c.names);
    if (len) c.names[len - 1] = '\0';
#elif defined(TKA_HAVE_NEON)
    /* Advanced SIMD (with float64 lanes and FMA) and the float16 conversions are part of
     * the aarch64 base architecture: nothing to ask. */
    strcpy(c.names, "neon,fp16-convert");
#endif
    return c;
}

static cpu_info g_cpu;
static int g_cpu_done;
static _Atomic(const tka_kernels *) g_active;

static const cpu_info *cpu(void)
{
    if (!g_cpu_done) {  /* first call happens at module import, under the GIL */
        g_cpu = detect();
        g_cpu_done = 1;
    }
    return &g_cpu;
}

static const tka_kernels *table(tka_simd which)
{
    switch (which) {
    case TKA_SIMD_SCALAR: return &tka_kernels_scalar;
#ifdef TKA_HAVE_X86
    case TKA_SIMD_AVX2: return &tka_kernels_avx2;
    case TKA_SIMD_AVX512: return &tka_kernels_avx512;
#endif
#ifdef TKA_HAVE_NEON
    case TKA_SIMD_NEON: return &tka_kernels_neon;
#endif
    default: return NULL;
    }
}

int tka_simd_compiled(tka_simd which) { return table(which) != NULL; }

int tka_simd_supported(tka_simd which)
{
    const cpu_info *c = cpu();
    if (!tka_simd_compiled(which)) return 0;
    switch (which) {
    case TKA_SIMD_SCALAR: return 1;
    /* F16C for the float16 loads: every CPU with AVX2 we know of has it, but ask */
    case TKA_SIMD_AVX2: return c->avx2 && c->fma && c->f16c;
    /* AVX-512BW for the search's 512-bit integer code products (every AVX-512 CPU but the
     * first Xeon Phi has it) */
    case TKA_SIMD_AVX512: return c->avx512f && c->avx512bw && c->avx2 && c->fma && c->f16c;
    case TKA_SIMD_NEON: return 1; /* compiled only for aarch64, where it is baseline */
    default: return 0;
    }
}

tka_status tka_simd_select(tka_simd which)
{
    if (which < 0 || which >= TKA_SIMD_COUNT || !tka_simd_supported(which)) return TKA_ERR_ARG;
    atomic_store(&g_active, table(which));
    return TKA_OK;
}

const tka_kernels *tka_kernels_active(void)
{
    const tka_kernels *k = atomic_load(&g_active);
    if (!k) {
        /* NEON on aarch64. On x86-64, AVX-512 is the default only on CPUs that also have
         * AVX-512 IFMA: the generations with it (Intel from Ice Lake, AMD from Zen 4) run
         * 512-bit code without the deep clock drop of the first AVX-512 parts, and on such
         * an AMD EPYC the AVX-512 set was measured 1.3-1.5x faster than AVX2 on k_eps and
         * tail_mass and no slower on attention and search (README, Threads and SIMD). Elsewhere AVX2;
         * TOPKATTN_SIMD overrides. */
        if (tka_simd_supported(TKA_SIMD_NEON)) k = table(TKA_SIMD_NEON);
        else if (tka_simd_supported(TKA_SIMD_AVX512) && cpu()->avx512ifma) k = table(TKA_SIMD_AVX512);
        else if (tka_simd_supported(TKA_SIMD_AVX2)) k = table(TKA_SIMD_AVX2);
        else k = table(TKA_SIMD_SCALAR);
        atomic_store(&g_active, k);
    }
    return k;
}

tka_simd tka_simd_active(void) { return tka_kernels_active()->id; }

const char *tka_simd_name(tka_simd which)
{
    static const char *names[] = {"scalar", "avx2", "avx512", "neon"};
    return (which >= 0 && which < TKA_SIMD_COUNT) ? names[which] : "unknown";
}

const char *tka_cpu_features(void) { return cpu()->names; }

/* AVX512-VNNI inside the AVX-512 set (its int8 code products; the same exact sums without
 * it): on where the CPU has it, unless switched off (the tests run both ways). */
static _Atomic int g_vnni_off;

int tka_avx512vnni(void) { return cpu()->avx512vnni && !g_vnni_off; }

void tka_avx512vnni_disable(int off) { g_vnni_off = off != 0; }

void tka_vexp(const double *x, int64_t n, double *out)
{
    if (n > 0) tka_kernels_active()->exp_shift[TKA_F64](x, n, 0.0, out);
}

const double *tka_exp2_table(void) { return tka_exp2_32; }

void tka_mass_bounds(double *ub, const double *rad, const double *mom, int64_t m,
                     const tka_mass_consts *c, double *um)
{
    if (m > 0) tka_kernels_active()->search->mass_bounds(ub, rad, mom, m, c, um);
}
