/* Word count and checksum of stdin, with the program's arguments and one environment variable:
 * the same bytes out of its native build and of its WASI build, on any node. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) printf("arg %d: %s\n", i, argv[i]);
    const char *greeting = getenv("PD_GREETING");
    printf("greeting: %s\n", greeting ? greeting : "(unset)");

    unsigned long lines = 0, words = 0, bytes = 0;
    uint64_t fnv = 0xcbf29ce484222325ULL; /* FNV-1a 64 */
    int in_word = 0, c;
    while ((c = getchar()) != EOF) {
        bytes++;
        fnv = (fnv ^ (uint8_t)c) * 0x100000001b3ULL;
        if (c == '\n') lines++;
        int space = c == ' ' || c == '\n' || c == '\t' || c == '\r';
        if (!space && !in_word) words++;
        in_word = !space;
    }
    printf("%lu %lu %lu %016llx\n", lines, words, bytes, (unsigned long long)fnv);
    fprintf(stderr, "counted %lu bytes\n", bytes);
    return 0;
}
