/* Guest-side probes for the guest tests (the guest's busybox has no mmap, statx or lock
 * tools), built static on the host and run from the share.
 *
 *   guestprobe write FILE OFFSET TEXT   write TEXT at OFFSET through a shared mapping, msync, fsync
 *   guestprobe attr FILE                print "dax" or "nodax" (statx STATX_ATTR_DAX)
 *   guestprobe sum FILE                 print a checksum of FILE read through a shared mapping
 *   guestprobe lock flock|posix wait|try FILE SECONDS
 *                                       take an exclusive lock (waiting, or failing at once),
 *                                       print "locked", hold it SECONDS, print "unlocked"
 *   guestprobe as UID GID[,GROUP...] PROG [ARG...]
 *                                       run PROG as UID:GID with those supplementary groups
 *                                       (none without the commas)
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <grp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef STATX_ATTR_DAX
#define STATX_ATTR_DAX 0x00200000
#endif

static int fail(const char *what) {
    perror(what);
    return 1;
}

int main(int argc, char **argv) {
    if (argc == 5 && strcmp(argv[1], "write") == 0) {
        off_t off = strtoll(argv[3], NULL, 0);
        size_t len = strlen(argv[4]);
        int fd = open(argv[2], O_RDWR);
        if (fd < 0) return fail("open");
        long page = sysconf(_SC_PAGESIZE);
        off_t base = off & ~(off_t)(page - 1);
        size_t span = (size_t)(off - base) + len;
        char *p = mmap(NULL, span, PROT_READ | PROT_WRITE, MAP_SHARED, fd, base);
        if (p == MAP_FAILED) return fail("mmap");
        memcpy(p + (off - base), argv[4], len);
        if (msync(p, span, MS_SYNC)) return fail("msync");
        munmap(p, span);
        if (fsync(fd)) return fail("fsync");
        close(fd);
        return 0;
    }
    if (argc == 3 && strcmp(argv[1], "attr") == 0) {
        struct statx st;
        if (statx(AT_FDCWD, argv[2], 0, STATX_BASIC_STATS, &st)) return fail("statx");
        if (!(st.stx_attributes_mask & STATX_ATTR_DAX)) {
            puts("unknown");
            return 0;
        }
        puts(st.stx_attributes & STATX_ATTR_DAX ? "dax" : "nodax");
        return 0;
    }
    if (argc == 3 && strcmp(argv[1], "sum") == 0) {
        int fd = open(argv[2], O_RDONLY);
        if (fd < 0) return fail("open");
        struct stat st;
        if (fstat(fd, &st)) return fail("fstat");
        const uint8_t *p = mmap(NULL, st.st_size, PROT_READ, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED) return fail("mmap");
        /* FNV-1a over 8-byte words: cheap enough under TCG, and any changed byte shows. */
        uint64_t h = 1469598103934665603ULL, w;
        off_t i = 0;
        for (; i + 8 <= st.st_size; i += 8) {
            memcpy(&w, p + i, 8);
            h = (h ^ w) * 1099511628211ULL;
        }
        for (; i < st.st_size; i++) h = (h ^ p[i]) * 1099511628211ULL;
        printf("%016llx\n", (unsigned long long)h);
        return 0;
    }
    if (argc == 6 && strcmp(argv[1], "lock") == 0) {
        int wait = strcmp(argv[3], "wait") == 0;
        int fd = open(argv[4], O_RDWR);
        if (fd < 0) return fail("open");
        int r;
        if (strcmp(argv[2], "flock") == 0) {
            r = flock(fd, LOCK_EX | (wait ? 0 : LOCK_NB));
        } else {
            struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET};
            r = fcntl(fd, wait ? F_SETLKW : F_SETLK, &fl);
        }
        if (r) {
            printf("refused\n");
            return 1;
        }
        printf("locked\n");
        fflush(stdout);
        sleep(atoi(argv[5]));
        printf("unlocked\n");
        return 0;
    }
    if (argc >= 5 && strcmp(argv[1], "as") == 0) {
        gid_t groups[64];
        size_t n = 0;
        char *rest = strchr(argv[3], ',');
        while (rest != NULL && n < 64) {
            groups[n++] = (gid_t)strtoul(rest + 1, NULL, 10);
            rest = strchr(rest + 1, ',');
        }
        if (setgroups(n, n ? groups : NULL)) return fail("setgroups");
        if (setgid((gid_t)atol(argv[3]))) return fail("setgid");
        if (setuid((uid_t)atol(argv[2]))) return fail("setuid");
        execvp(argv[4], argv + 4);
        return fail("exec");
    }
    fprintf(stderr, "usage: guestprobe write FILE OFFSET TEXT | attr FILE | sum FILE"
                    " | lock flock|posix wait|try FILE SECONDS"
                    " | as UID GID[,GROUP...] PROG [ARG...]\n");
    return 2;
}
