/*
 * cellblock-init: the first process inside every Cellblock sandbox, pid 1 of its PID namespace.
 *
 *   cellblock-init STATUS_FD [RESOURCE=SOFT:HARD ...] -- PROGRAM [ARG ...]
 *
 * It forks PROGRAM with exactly the given rlimits (applied in the child only, so that init itself
 * is never starved by them), reaps every process of the namespace, and when PROGRAM exits kills
 * whatever it left behind (daemons included: they are all in this PID namespace), reaps them too,
 * and then writes one line to STATUS_FD:
 *
 *   exited CODE UTIME_US STIME_US WALL_US      PROGRAM exited
 *   signaled SIGNO UTIME_US STIME_US WALL_US   PROGRAM was killed by a signal
 *   exec-failed ERRNO                          PROGRAM could not be started
 *   rlimit-failed RESOURCE ERRNO               an rlimit could not be applied
 *
 * The CPU times cover the whole process tree, since every process of the namespace is reaped
 * here or by a reaped ancestor. The host trusts this line no more than the sandboxed program's
 * own output: it only describes that program. Init is made non-dumpable so that the program,
 * which runs under the same uid, cannot open init's descriptors through /proc.
 *
 * Statically linked: it must run in a sandbox that holds nothing but itself.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

struct resource {
    const char *name;
    int id;
};

static const struct resource RESOURCES[] = {
    {"as", RLIMIT_AS},         {"core", RLIMIT_CORE},       {"cpu", RLIMIT_CPU},
    {"data", RLIMIT_DATA},     {"fsize", RLIMIT_FSIZE},     {"locks", RLIMIT_LOCKS},
    {"memlock", RLIMIT_MEMLOCK}, {"msgqueue", RLIMIT_MSGQUEUE}, {"nice", RLIMIT_NICE},
    {"nofile", RLIMIT_NOFILE}, {"nproc", RLIMIT_NPROC},     {"rss", RLIMIT_RSS},
    {"rtprio", RLIMIT_RTPRIO}, {"rttime", RLIMIT_RTTIME},   {"sigpending", RLIMIT_SIGPENDING},
    {"stack", RLIMIT_STACK},
};
#define NRESOURCES (sizeof(RESOURCES) / sizeof(RESOURCES[0]))

struct limit {
    const struct resource *resource;
    struct rlimit value;
};

static int usage(const char *why) {
    fprintf(stderr, "cellblock-init: %s\n", why);
    return 125;
}

static int parse_value(const char *text, rlim_t *out) {
    if (strcmp(text, "inf") == 0) {
        *out = RLIM_INFINITY;
        return 0;
    }
    char *end;
    errno = 0;
    unsigned long long v = strtoull(text, &end, 10);
    if (errno || end == text || *end || text[0] == '-') return -1;
    *out = (rlim_t)v;
    return 0;
}

/* Parses "name=soft:hard". */
static int parse_limit(char *arg, struct limit *out) {
    char *eq = strchr(arg, '=');
    char *colon = eq ? strchr(eq, ':') : NULL;
    if (!eq || !colon) return -1;
    *eq = *colon = '\0';
    for (size_t i = 0; i < NRESOURCES; i++) {
        if (strcmp(arg, RESOURCES[i].name) == 0) {
            out->resource = &RESOURCES[i];
            if (parse_value(eq + 1, &out->value.rlim_cur) || parse_value(colon + 1, &out->value.rlim_max))
                return -1;
            return 0;
        }
    }
    return -1;
}

static long long micros(struct timeval tv) { return (long long)tv.tv_sec * 1000000 + tv.tv_usec; }

static long long monotonic_micros(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

int main(int argc, char **argv) {
    if (argc < 4) return usage("usage: cellblock-init STATUS_FD [RES=SOFT:HARD ...] -- PROGRAM [ARG ...]");
    /* kill(-1) below must only ever reach one sandbox's PID namespace, never a host. */
    if (getpid() != 1) return usage("refusing to run: not pid 1 of a PID namespace");
    int status_fd = atoi(argv[1]);
    struct limit limits[NRESOURCES];
    size_t nlimits = 0;
    int i = 2;
    for (; i < argc && strcmp(argv[i], "--") != 0; i++) {
        if (nlimits == NRESOURCES || parse_limit(argv[i], &limits[nlimits++]))
            return usage("bad limit argument");
    }
    if (i + 1 >= argc) return usage("no program after --");
    char **program = &argv[i + 1];

    prctl(PR_SET_DUMPABLE, 0);
    long long started = monotonic_micros();
    pid_t child = fork();
    if (child < 0) {
        dprintf(status_fd, "exec-failed %d\n", errno);
        return 126;
    }
    if (child == 0) {
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        for (size_t k = 0; k < nlimits; k++) {
            if (setrlimit(limits[k].resource->id, &limits[k].value) != 0) {
                dprintf(status_fd, "rlimit-failed %s %d\n", limits[k].resource->name, errno);
                _exit(126);
            }
        }
        /* The status descriptor must not outlive exec: the program has no business with it. */
        close(status_fd);
        execvp(program[0], program);
        int err = errno;
        dprintf(2, "cellblock: cannot run %s: %s\n", program[0], strerror(err));
        _exit(127);
    }

    int main_status = 0, have_main = 0;
    long long wall = 0;
    for (;;) {
        int st;
        pid_t pid = waitpid(-1, &st, __WALL);
        if (pid < 0) {
            if (errno == EINTR) continue;
            break; /* ECHILD: nobody is left */
        }
        if (pid == child) {
            main_status = st;
            have_main = 1;
            wall = monotonic_micros() - started;
            kill(-1, SIGKILL); /* everything else in this PID namespace */
        }
    }
    if (!have_main) return 126;
    struct rusage usage;
    getrusage(RUSAGE_CHILDREN, &usage);
    if (WIFSIGNALED(main_status))
        dprintf(status_fd, "signaled %d %lld %lld %lld\n", WTERMSIG(main_status), micros(usage.ru_utime),
                micros(usage.ru_stime), wall);
    else
        dprintf(status_fd, "exited %d %lld %lld %lld\n", WEXITSTATUS(main_status), micros(usage.ru_utime),
                micros(usage.ru_stime), wall);
    return 0;
}
