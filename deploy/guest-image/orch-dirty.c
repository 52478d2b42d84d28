/* orch-dirty: the lab guest's memory-dirtying workload (built static by deploy/setup.sh).
 *
 *   orch-dirty RATE_MIB_S SIZE_MIB [REPORT_S [TICK_MS]]
 *
 * Allocates SIZE_MIB MiB and, every TICK_MS (default 1 ms), writes one word into each page of the
 * next RATE_MIB_S x TICK_MS worth of that memory, cycling through it, so that the guest dirties
 * RATE_MIB_S MiB/s of distinct pages (as long as SIZE_MIB >= RATE_MIB_S x the observer's
 * interval). The rate is paced by CLOCK_MONOTONIC, not by counting ticks: a late tick is
 * caught up, but a stall longer than 100 ms (e.g. the switchover of a migration) is skipped,
 * never written in a burst. Every REPORT_S seconds it prints the rate it actually achieved.
 * Prints "orch-guest: ready ..." once all of the memory is allocated and written.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MIB (1024.0 * 1024.0)

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: orch-dirty RATE_MIB_S SIZE_MIB [REPORT_S [TICK_MS]]\n");
        return 2;
    }
    double rate = strtod(argv[1], NULL);
    long size_mib = strtol(argv[2], NULL, 10);
    double report_s = argc > 3 ? strtod(argv[3], NULL) : 5.0;
    double tick_ms = argc > 4 ? strtod(argv[4], NULL) : 1.0;
    if (!(rate > 0) || size_mib <= 0 || !(report_s > 0) || !(tick_ms >= 0.01 && tick_ms <= 1000)) {
        fprintf(stderr, "orch-dirty: bad arguments: rate %s MiB/s, size %s MiB\n", argv[1], argv[2]);
        return 2;
    }
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t bytes = (size_t)size_mib << 20;
    size_t pages = bytes / page;
    size_t words_per_page = page / sizeof(uint64_t);
    uint64_t *mem = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
        fprintf(stderr, "orch-dirty: cannot allocate %ld MiB: %s\n", size_mib, strerror(errno));
        return 1;
    }
    for (size_t i = 0; i < pages; i++)
        mem[i * words_per_page] = i;

    double pages_per_s = rate * MIB / (double)page;
    uint64_t cap = (uint64_t)(pages_per_s * 0.1) + 1; /* at most 100 ms of catching up */
    long tick_ns = (long)(tick_ms * 1e6);
    printf("orch-guest: ready workload=dirty rate=%g MiB/s size=%ld MiB pages=%zu tick=%g ms\n", rate, size_mib,
           pages, tick_ms);
    fflush(stdout);

    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    double start = now(), mark = start;
    uint64_t due_base = 0, written = 0, done = 0, done_mark = 0, skipped = 0, value = 1;
    size_t idx = 0;
    for (;;) {
        next.tv_nsec += tick_ns;
        while (next.tv_nsec >= 1000000000L) {
            next.tv_nsec -= 1000000000L;
            next.tv_sec++;
        }
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL) == EINTR)
            ;
        double t = now();
        uint64_t due = due_base + (uint64_t)((t - start) * pages_per_s);
        if (due > written + cap) { /* stalled: skip, do not burst */
            skipped += due - written - cap;
            written = due - cap;
            clock_gettime(CLOCK_MONOTONIC, &next);
        }
        for (; written < due; written++, done++) {
            mem[idx * words_per_page] = value++;
            if (++idx == pages)
                idx = 0;
        }
        if (t - mark >= report_s) {
            double achieved = (double)(done - done_mark) * (double)page / MIB / (t - mark);
            printf("orch-dirty: %.2f MiB/s over %.1f s (target %g, %llu pages skipped after stalls)\n", achieved,
                   t - mark, rate, (unsigned long long)skipped);
            fflush(stdout);
            mark = t;
            done_mark = done;
        }
    }
}
