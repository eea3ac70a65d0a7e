/* A slow disk for tests: LD_PRELOAD this library and fsync(2) / fdatasync(2) sleep
 * SLOW_FSYNC_MS milliseconds before doing the real call, while the file named by
 * SLOW_FSYNC_FLAG exists (so a node starts at full speed and the test turns the slowness on).
 * It stands in for an SD card: the process's own code is not touched, only the system call
 * every durable commit ends in. Built by tests/test_hostile_resources.py with the C compiler. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static void slow_down(void) {
    const char *flag = getenv("SLOW_FSYNC_FLAG");
    const char *ms = getenv("SLOW_FSYNC_MS");
    if (flag == NULL || ms == NULL || access(flag, F_OK) != 0) return;
    long v = atol(ms);
    struct timespec ts = {v / 1000, (v % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

int fsync(int fd) {
    static int (*real)(int);
    if (real == NULL) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    slow_down();
    return real(fd);
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (real == NULL) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    slow_down();
    return real(fd);
}
