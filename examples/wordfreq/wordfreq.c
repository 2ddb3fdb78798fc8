/* wordfreq: read a text on stdin, print its line/word/byte counts, an FNV-1a checksum of
 * its bytes, and its most frequent words (count descending, then bytewise ascending).
 *
 * A word is a maximal run of ASCII letters, digits and apostrophes, lowercased. The output
 * depends on the input alone, so the WASI build and the native build print the same bytes:
 * the examples test holds them to that.
 *
 *   wordfreq [TOP]     TOP: how many words to list (default 10)
 */
#include <ctype.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct entry {
    char *word;
    size_t count;
};

static struct entry *table;
static size_t capacity = 1024, used;

static uint64_t fnv1a(const unsigned char *s, size_t n, uint64_t h) {
    for (size_t i = 0; i < n; i++) {
        h ^= s[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

static void die(const char *what) {
    fprintf(stderr, "wordfreq: %s\n", what);
    exit(2);
}

static void grow(void) {
    size_t old = capacity;
    struct entry *old_table = table;
    capacity *= 2;
    table = calloc(capacity, sizeof *table);
    if (!table) die("out of memory");
    for (size_t i = 0; i < old; i++) {
        if (!old_table[i].word) continue;
        size_t j = fnv1a((const unsigned char *)old_table[i].word, strlen(old_table[i].word), 0xcbf29ce484222325ULL) & (capacity - 1);
        while (table[j].word) j = (j + 1) & (capacity - 1);
        table[j] = old_table[i];
    }
    free(old_table);
}

static void count(const char *word, size_t n) {
    if (2 * (used + 1) > capacity) grow();
    size_t j = fnv1a((const unsigned char *)word, n, 0xcbf29ce484222325ULL) & (capacity - 1);
    while (table[j].word) {
        if (strlen(table[j].word) == n && memcmp(table[j].word, word, n) == 0) {
            table[j].count++;
            return;
        }
        j = (j + 1) & (capacity - 1);
    }
    table[j].word = malloc(n + 1);
    if (!table[j].word) die("out of memory");
    memcpy(table[j].word, word, n);
    table[j].word[n] = 0;
    table[j].count = 1;
    used++;
}

static int by_count(const void *a, const void *b) {
    const struct entry *x = a, *y = b;
    if (x->count != y->count) return x->count < y->count ? 1 : -1;
    return strcmp(x->word, y->word);
}

static int word_char(int c) { return isalnum(c) || c == '\''; }

int main(int argc, char **argv) {
    long top = argc > 1 ? strtol(argv[1], NULL, 10) : 10;
    if (top < 0) die("TOP must be >= 0");
    table = calloc(capacity, sizeof *table);
    if (!table) die("out of memory");

    unsigned char buf[65536];
    char word[256];
    size_t wlen = 0, lines = 0, words = 0, bytes = 0, n;
    uint64_t sum = 0xcbf29ce484222325ULL;
    while ((n = fread(buf, 1, sizeof buf, stdin)) > 0) {
        sum = fnv1a(buf, n, sum);
        bytes += n;
        for (size_t i = 0; i < n; i++) {
            int c = buf[i];
            if (c == '\n') lines++;
            if (c < 128 && word_char(c)) {
                if (wlen < sizeof word) word[wlen++] = (char)tolower(c);
            } else if (wlen) {
                count(word, wlen);
                words++;
                wlen = 0;
            }
        }
    }
    if (ferror(stdin)) die("cannot read stdin");
    if (wlen) {
        count(word, wlen);
        words++;
    }

    struct entry *all = malloc((used ? used : 1) * sizeof *all);
    if (!all) die("out of memory");
    size_t k = 0;
    for (size_t i = 0; i < capacity; i++)
        if (table[i].word) all[k++] = table[i];
    qsort(all, k, sizeof *all, by_count);

    printf("lines %zu words %zu bytes %zu distinct %zu fnv1a %016llx\n", lines, words, bytes, used,
           (unsigned long long)sum);
    for (size_t i = 0; i < k && i < (size_t)top; i++) printf("%7zu %s\n", all[i].count, all[i].word);
    return 0;
}
