/*
 * cellblock-init: the first process inside every Cellblock sandbox, pid 1 of its PID namespace.
 *
 *   cellblock-init STATUS_FD CONTROL_FD
 *
 * The jail is made before its stage is known (an "armed" jail, see sandbox.py), so what to run
 * arrives on CONTROL_FD, which the host writes and closes: NUL-terminated fields,
 *
 *   DEADLINE_S  NLIMITS RESOURCE=SOFT:HARD...  NENV KEY=VALUE...  NARGV PROGRAM ARG...
 *
 * End of file before any byte means the host gave the jail up (or died): init exits quietly.
 *
 * It forks PROGRAM with exactly the given rlimits and environment (applied in the child only, so
 * that init itself is never starved by them), reaps every process of the namespace, and when
 * PROGRAM exits kills whatever it left behind (daemons included: they are all in this PID
 * namespace), reaps them too, and then writes one line to STATUS_FD:
 *
 *   exited CODE UTIME_US STIME_US WALL_US      PROGRAM exited
 *   signaled SIGNO UTIME_US STIME_US WALL_US   PROGRAM was killed by a signal
 *   exec-failed ERRNO                          PROGRAM could not be started
 *   rlimit-failed RESOURCE ERRNO               an rlimit could not be applied
 *   seal-failed ERRNO                          the user namespace could not be sealed
 *
 * DEADLINE_S seconds after the start everything in the namespace is killed: the host's own
 * wall-clock timer fires long before, so this only matters when the host died mid-stage.
 *
 * The CPU times cover the whole process tree, since every process of the namespace is reaped
 * here or by a reaped ancestor. The host trusts this line no more than the sandboxed program's
 * own output: it only describes that program. Init is made non-dumpable so that the program,
 * which runs under the same uid, cannot open init's descriptors through /proc.
 *
 * Before anything else, init seals the jail's user namespace: it writes 0 to that namespace's
 * own user.max_user_namespaces (bound at USERNS_LIMIT by nsjail), so nothing in the jail can
 * make a nested user namespace even past the seccomp policy, which refuses it too. nsjail hands
 * init CAP_SYS_RESOURCE in the jail's namespace for exactly that write; init drops every
 * capability right after it, before it reads its stage, so the program never holds one.
 *
 * Statically linked: it must run in a sandbox that holds nothing but itself.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
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

/* Reads CONTROL_FD to its end; returns the bytes read (0 when the jail was given up). */
static size_t read_request(int fd, char **out) {
    size_t len = 0, cap = 65536;
    char *buf = malloc(cap);
    for (;;) {
        if (!buf) return 0;
        if (len == cap) buf = realloc(buf, cap *= 2);
        if (!buf) return 0;
        ssize_t n = read(fd, buf + len, cap - len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        len += (size_t)n;
    }
    close(fd);
    *out = buf;
    return len;
}

/* The next NUL-terminated field of the request, or NULL past its end. */
static char *next_field(char **cursor, const char *end) {
    char *field = *cursor;
    char *nul = field < end ? memchr(field, '\0', (size_t)(end - field)) : NULL;
    if (!nul) return NULL;
    *cursor = nul + 1;
    return field;
}

static int next_count(char **cursor, const char *end, unsigned long max, unsigned long *out) {
    char *field = next_field(cursor, end);
    rlim_t value;
    if (!field || parse_value(field, &value) || value > max) return -1;
    *out = (unsigned long)value;
    return 0;
}

/* A NULL-terminated array of the next COUNT fields. */
static char **next_list(char **cursor, const char *end, unsigned long count) {
    char **list = calloc(count + 1, sizeof(char *));
    for (unsigned long k = 0; list && k < count; k++)
        if (!(list[k] = next_field(cursor, end))) return NULL;
    return list;
}

#define USERNS_LIMIT "/.cellblock/userns"

/* 0 on success, else the errno of what failed. */
static int seal_user_namespace(void) {
    int err = 0;
    int fd = open(USERNS_LIMIT, O_WRONLY | O_CLOEXEC);
    if (fd < 0 || write(fd, "0\n", 2) != 2) err = errno ? errno : EIO;
    if (fd >= 0) close(fd);
    struct __user_cap_header_struct header = {.version = _LINUX_CAPABILITY_VERSION_3, .pid = 0};
    struct __user_cap_data_struct none[2] = {{0}};
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0 && !err) err = errno;
    if (syscall(SYS_capset, &header, none) != 0 && !err) err = errno;
    return err;
}

static void kill_everything(int signo) {
    (void)signo;
    kill(-1, SIGKILL);
}

int main(int argc, char **argv) {
    if (argc != 3) return usage("usage: cellblock-init STATUS_FD CONTROL_FD");
    /* kill(-1) below must only ever reach one sandbox's PID namespace, never a host. */
    if (getpid() != 1) return usage("refusing to run: not pid 1 of a PID namespace");
    int status_fd = atoi(argv[1]);
    int sealed = seal_user_namespace();
    char *request = NULL;
    size_t length = read_request(atoi(argv[2]), &request);
    if (length == 0) return 0;
    if (sealed != 0) {
        dprintf(status_fd, "seal-failed %d\n", sealed);
        return 126;
    }
    char *cursor = request, *end = request + length;
    unsigned long deadline, nlimits, nenv, nargv;
    struct limit limits[NRESOURCES];
    if (next_count(&cursor, end, 1UL << 30, &deadline) || next_count(&cursor, end, NRESOURCES, &nlimits))
        return usage("bad request: deadline or limit count");
    for (unsigned long k = 0; k < nlimits; k++) {
        char *field = next_field(&cursor, end);
        if (!field || parse_limit(field, &limits[k])) return usage("bad request: limit");
    }
    char **environment, **program;
    if (next_count(&cursor, end, 1UL << 20, &nenv) || !(environment = next_list(&cursor, end, nenv)))
        return usage("bad request: environment");
    if (next_count(&cursor, end, 1UL << 20, &nargv) || nargv == 0 || !(program = next_list(&cursor, end, nargv)))
        return usage("bad request: program");

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
        execve(program[0], program, environment);
        int err = errno;
        dprintf(2, "cellblock: cannot run %s: %s\n", program[0], strerror(err));
        _exit(127);
    }

    /* No SA_RESTART: the wait below is interrupted and goes on reaping what the kill ended. */
    struct sigaction alarm_action = {.sa_handler = kill_everything};
    sigaction(SIGALRM, &alarm_action, NULL);
    alarm((unsigned)deadline);

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
