/* Reads randomness and the clocks, in a fixed order: a deterministic run prints exactly what
 * shared/wasi.py's SplitMix64 and Clock predict (tests/test_wasi_browser.py computes it). */
#include <stdio.h>
#include <time.h>
#include <unistd.h>

static void hex(const char *name, size_t n) {
    unsigned char buf[64];
    if (getentropy(buf, n) != 0) {
        perror("getentropy");
        return;
    }
    printf("%s ", name);
    for (size_t i = 0; i < n; i++) printf("%02x", buf[i]);
    printf("\n");
}

static void show(const char *name, clockid_t id) {
    struct timespec ts;
    if (clock_gettime(id, &ts) != 0) {
        perror("clock_gettime");
        return;
    }
    printf("%s %lld.%09ld\n", name, (long long)ts.tv_sec, ts.tv_nsec);
}

int main(void) {
    hex("random3", 3);
    hex("random8", 8);
    hex("random13", 13);
    show("realtime", CLOCK_REALTIME);
    show("monotonic", CLOCK_MONOTONIC);
    printf("time %lld\n", (long long)time(NULL));
    struct timespec res;
    clock_getres(CLOCK_MONOTONIC, &res);
    printf("resolution %lld.%09ld\n", (long long)res.tv_sec, res.tv_nsec);
    return 0;
}
