/* Behaves as its stdin says: "exit N" writes to both streams and exits N, "trap" writes to
 * stderr and traps, "recurse" overflows the call stack, "spin" never ends; anything else
 * echoes and returns 0. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Called through a volatile pointer so the compiler cannot turn the recursion into a loop. */
static int deeper(int n);
static int (*volatile next)(int) = deeper;
static int deeper(int n) { return next(n + 1) + n; }

int main(void) {
    char line[256] = {0};
    if (!fgets(line, sizeof line, stdin)) line[0] = '\0';
    line[strcspn(line, "\n")] = '\0';
    int code;
    if (sscanf(line, "exit %d", &code) == 1) {
        printf("exiting %d\n", code);
        fprintf(stderr, "bye %d\n", code);
        exit(code);
    }
    if (strcmp(line, "trap") == 0) {
        fprintf(stderr, "about to trap\n");
        __builtin_trap();
    }
    if (strcmp(line, "recurse") == 0) return deeper(0);
    if (strcmp(line, "spin") == 0) {
        volatile unsigned long n = 0;
        for (;;) n++;
    }
    printf("echo %s\n", line);
    return 0;
}
