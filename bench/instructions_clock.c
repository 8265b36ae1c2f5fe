// Preloaded into the backend that bench/instructions.sh runs under callgrind, so that a read's
// instruction count does not depend on how fast callgrind runs. A read position
// (src/message/read_position.rs) lives 1 s (200 ms unshared) of CLOCK_MONOTONIC; under callgrind, about 50x slower
// than native, whether the next read still finds it depended on timing. BENCH_INSTRUCTIONS_CLOCK:
//   kept     the monotonic clocks run 100,000x slower than real time: no position expires in a run,
//            as between the reads of a consumer reading on at native speed (the default)
//   expired  each call of the monotonic clocks is a second later than the one before: every
//            position has expired by the next read, which starts from the head of the index
// The wall clock (CLOCK_REALTIME, gettimeofday: timestamps, ready_at, lock times) is left alone.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef int (*clock_gettime_fn)(clockid_t, struct timespec *);

static const long long billion = 1000000000LL;

int clock_gettime(clockid_t clock, struct timespec *ts) {
    static clock_gettime_fn real;
    static int mode = -1; // 0 real, 1 kept, 2 expired
    static long long first, calls;
    if (!real) real = (clock_gettime_fn)dlsym(RTLD_NEXT, "clock_gettime");
    int rc = real(clock, ts);
    if (rc != 0) return rc;
    if (clock != CLOCK_MONOTONIC && clock != CLOCK_MONOTONIC_RAW && clock != CLOCK_MONOTONIC_COARSE &&
        clock != CLOCK_BOOTTIME)
        return rc;
    if (mode < 0) {
        const char *name = getenv("BENCH_INSTRUCTIONS_CLOCK");
        mode = name && strcmp(name, "expired") == 0 ? 2 : name && strcmp(name, "real") == 0 ? 0 : 1;
    }
    long long now = ts->tv_sec * billion + ts->tv_nsec;
    if (!first) first = now;
    if (mode == 1)
        now = first + (now - first) / 100000;
    else if (mode == 2)
        now += ++calls * billion;
    ts->tv_sec = now / billion;
    ts->tv_nsec = now % billion;
    return rc;
}
