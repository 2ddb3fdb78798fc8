/* dice: roll dice from the system's randomness and print the clocks.
 *
 * Under ProcessDistro a deterministic run's randomness and clocks come from the job's seed
 * and a stepped clock (shared/wasi.py), so every node prints the same bytes; natively (or
 * with the deterministic flag off) every run differs.
 *
 * Prints, in this order (each line is one WASI call, in call order):
 *   entropy <32 hex digits>      getentropy(16 bytes): one random_get
 *   dice <d1> ... <d8>           getentropy(8 bytes), each byte % 6 + 1: one random_get
 *   realtime <sec>.<nsec>        clock_gettime(CLOCK_REALTIME)
 *   monotonic <sec>.<nsec>       clock_gettime(CLOCK_MONOTONIC)
 *   time <sec>                   time(NULL)
 *   resolution <nsec>            clock_getres(CLOCK_MONOTONIC)
 */
#include <stdio.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

static void must(int ok, const char *what) {
    if (!ok) {
        perror(what);
        _exit(1);
    }
}

int main(void) {
    unsigned char entropy[16], dice[8];
    struct timespec real, mono, res;

    must(getentropy(entropy, sizeof entropy) == 0, "getentropy");
    must(getentropy(dice, sizeof dice) == 0, "getentropy");
    must(clock_gettime(CLOCK_REALTIME, &real) == 0, "clock_gettime(CLOCK_REALTIME)");
    must(clock_gettime(CLOCK_MONOTONIC, &mono) == 0, "clock_gettime(CLOCK_MONOTONIC)");
    time_t now = time(NULL);
    must(now != (time_t)-1, "time");
    must(clock_getres(CLOCK_MONOTONIC, &res) == 0, "clock_getres");

    printf("entropy ");
    for (size_t i = 0; i < sizeof entropy; i++) printf("%02x", entropy[i]);
    printf("\ndice");
    for (size_t i = 0; i < sizeof dice; i++) printf(" %d", dice[i] % 6 + 1);
    printf("\nrealtime %lld.%09ld\n", (long long)real.tv_sec, real.tv_nsec);
    printf("monotonic %lld.%09ld\n", (long long)mono.tv_sec, mono.tv_nsec);
    printf("time %lld\n", (long long)now);
    printf("resolution %lld\n", (long long)res.tv_sec * 1000000000LL + res.tv_nsec);
    return 0;
}
