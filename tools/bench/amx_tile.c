/*
 * The ceiling of fewstep's AMX tile kernel (crates/fewstep/src/kernels/matmul.rs, mod amx) on one core,
 * by where its operands come from. The same loop as the kernel: a 32×32 block of C in tmm0..3, two
 * 16-row tiles of A (tmm4/5, packed 1 KiB a tile) and two 16-column tiles of B (tmm6/7, a panel of 32
 * columns, 128 bytes a row of pairs) a step of 16 bf16 pairs. A task's tile is MC × NC = 96 × 128 of C
 * over kp pairs of K, as in Product::run.
 *
 *     gcc -O2 -mamx-tile -mamx-bf16 tools/bench/amx_tile.c -o /tmp/amx_tile && /tmp/amx_tile
 *
 * Prints GFLOP/s for: tdpbf16ps alone (the compute peak); operands in L1; a task's tile with its
 * operands in L2; and with A streamed from a 17 MiB set (a weight read from L3), for both loop orders
 * (panels of B outside the row groups of A, or inside). Linux only (AMX needs arch_prctl).
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

enum { MC = 96, NC = 128, KP = 1440 /* a 3x3 convolution of 320 channels */ };

struct tile_config {
    uint8_t palette, start;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static int setup(void) {
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */)) {
        fprintf(stderr, "amx_tile: the kernel refuses the AMX tile state\n");
        return 0;
    }
    struct tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) {
        c.colsb[t] = 64;
        c.rows[t] = 16;
    }
    _tile_loadconfig(&c);
    return 1;
}

/* One 32x32 block of C over kp pairs: a at the group's first tile, b at the panel's first row. */
static void block(const uint32_t *a, const uint32_t *b, float *c, int kp, int ldc) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int s = 0; s < kp / 16; s++) {
        _tile_loadd(4, a + s * 256, 64);
        _tile_loadd(5, a + 16 * kp + s * 256, 64);
        _tile_loadd(6, b + s * 512, 128);
        _tile_loadd(7, b + s * 512 + 16, 128);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, c, ldc * 4);
    _tile_stored(1, c + 16, ldc * 4);
    _tile_stored(2, c + 16 * ldc, ldc * 4);
    _tile_stored(3, c + 16 * ldc + 16, ldc * 4);
}

/* A task's MC x NC tile; groups_outside: each group of A meets every panel of B before the next. */
static void task(const uint32_t *a, const uint32_t *b, float *c, int kp, int groups_outside) {
    for (int i = 0; i < (MC / 32) * (NC / 32); i++) {
        int g = groups_outside ? i / (NC / 32) : i % (MC / 32);
        int p = groups_outside ? i % (NC / 32) : i / (MC / 32);
        block(a + g * 32 * kp, b + p * kp * 32, c + g * 32 * NC + p * 32, kp, NC);
    }
}

static uint32_t *filled(size_t n) {
    uint32_t *v = aligned_alloc(64, n * 4);
    for (size_t i = 0; i < n; i++) v[i] = 0x3f803f80; /* a pair of bf16 ones */
    return v;
}

int main(void) {
    if (!setup()) return 1;
    const double tdp = 2.0 * 16 * 16 * 32;
    long n = 1000000;
    double t = now();
    for (long i = 0; i < n; i++) {
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    printf("tdpbf16ps alone:               %7.1f GFLOP/s\n", 4 * n * tdp / (now() - t) / 1e9);

    float *c = aligned_alloc(64, MC * NC * 4);
    uint32_t *small_a = filled(32 * 128), *small_b = filled(32 * 128);
    n = 100000;
    t = now();
    for (long i = 0; i < n; i++) block(small_a, small_b, c, 128, NC);
    printf("operands in L1 (kp 128):       %7.1f GFLOP/s\n", n * 8 * 4 * tdp / (now() - t) / 1e9);

    const size_t sets = 32; /* 32 blocks of A: 17 MiB, beyond L2 */
    uint32_t *a = filled(sets * MC * KP), *b = filled(NC * KP);
    const double flop = 2.0 * MC * NC * KP * 2;
    for (int outside = 0; outside < 2; outside++) {
        const char *order = outside ? "groups outside" : "panels outside";
        long reps = 200;
        t = now();
        for (long r = 0; r < reps; r++) task(a, b, c, KP, outside);
        printf("task in L2, %s:    %7.1f GFLOP/s\n", order, reps * flop / (now() - t) / 1e9);
        t = now();
        for (long r = 0; r < reps; r++) task(a + (r % sets) * MC * KP, b, c, KP, outside);
        printf("A from L3, %s:     %7.1f GFLOP/s\n", order, reps * flop / (now() - t) / 1e9);
    }
    _tile_release();
    return 0;
}
