/* probe: one WASI command that misbehaves on request, for tests/test_wasi_native.py.
 *
 *   probe echo           copy stdin to stdout, then print argv and the environment to stderr
 *   probe exit N         exit with status N
 *   probe open PATH      try to open PATH (there are no preopened directories): exit 1 if refused
 *   probe trap           execute `unreachable`
 *   probe loop           never end
 *   probe print          print one line without reading stdin
 *   probe grow           allocate (and touch) 1 MiB blocks until malloc fails: exit 1
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern char **environ;

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "";
    if (strcmp(mode, "echo") == 0) {
        int c;
        while ((c = getchar()) != EOF) putchar(c);
        for (int i = 0; i < argc; i++) fprintf(stderr, "argv[%d]=%s\n", i, argv[i]);
        for (char **e = environ; *e; e++) fprintf(stderr, "env %s\n", *e);
        return 0;
    }
    if (strcmp(mode, "exit") == 0 && argc > 2) exit(atoi(argv[2]));
    if (strcmp(mode, "open") == 0 && argc > 2) {
        FILE *f = fopen(argv[2], "r");
        if (!f) {
            fprintf(stderr, "cannot open %s: %s\n", argv[2], strerror(errno));
            return 1;
        }
        printf("opened %s\n", argv[2]);
        return 0;
    }
    if (strcmp(mode, "trap") == 0) {
        fputs("about to trap", stderr);
        fflush(stderr);
        __builtin_trap();
    }
    if (strcmp(mode, "loop") == 0) {
        volatile unsigned long n = 0;
        for (;;) n++;
    }
    if (strcmp(mode, "print") == 0) {
        puts("hello");
        return 0;
    }
    if (strcmp(mode, "grow") == 0) {
        /* the blocks form a list that is printed from, so the compiler cannot drop them */
        size_t mib = 0;
        char **block, **head = NULL;
        while ((block = malloc(1 << 20)) != NULL) {
            memset(block, 1, 1 << 20);
            *block = (char *)head;
            head = block;
            mib++;
        }
        fprintf(stderr, "malloc failed after %zu MiB (last block at %p)\n", mib, (void *)head);
        return 1;
    }
    fprintf(stderr, "usage: probe echo|exit N|open PATH|trap|loop|print|grow\n");
    return 2;
}
