/*
 * cellblock-init: the first process inside every Cellblock sandbox, pid 1 of its PID namespace.
 *
 *   cellblock-init CONTROL_FD
 *
 * CONTROL_FD is a stream socket to the host. The jail is made before its stage is known (an
 * "armed" jail, see sandbox.py), so init first writes one byte, 'R', to say it is ready (the host
 * may then reuse the paths this jail's mounts came from, see Sandbox.series), and then reads its
 * stage: a header, with four descriptors attached (SCM_RIGHTS),
 *
 *   uint32 MAGIC, uint32 LENGTH, uint64 BOX_DEV, uint64 BOX_INO
 *                                    fds: STDIN STDOUT STDERR STATUS
 *
 * and then LENGTH bytes of NUL-terminated fields,
 *
 *   DEADLINE_S  NLIMITS RESOURCE=SOFT:HARD...  NENV KEY=VALUE...  NARGV PROGRAM ARG...
 *   NFALLBACK FALLBACK ARG...
 *
 * BOX_DEV and BOX_INO name the working directory the stage is for: a jail whose /box is another
 * (the host's link was pointed on, and this jail made after, see Sandbox.series) refuses it.
 *
 * End of file before a header means the host gave the jail up (or died): init exits quietly.
 * The control socket is one jail's, and may outlive this init (nsjail's rerun mode starts a
 * fresh jail, with a fresh init, on the same socket when this one ends): the program never holds
 * it, nor STATUS, so it can neither read nor forge another stage's request.
 *
 * It forks PROGRAM with STDIN, STDOUT and STDERR as its standard streams and exactly the given
 * rlimits and environment (applied in the child only, so that init itself is never starved by
 * them; should PROGRAM not exec, it execs FALLBACK if there is one: the stage's shell running
 * the script PROGRAM was taken from, see sandbox.direct_argv), reaps every process of the namespace, and when PROGRAM exits kills whatever it left
 * behind (daemons included: they are all in this PID namespace), reaps them too, and then writes
 * one line to STATUS:
 *
 *   exited CODE UTIME_US STIME_US WALL_US      PROGRAM exited
 *   signaled SIGNO UTIME_US STIME_US WALL_US   PROGRAM was killed by a signal
 *   exec-failed ERRNO                          PROGRAM could not be started
 *   rlimit-failed RESOURCE ERRNO               an rlimit could not be applied
 *   seal-failed ERRNO                          the user namespace could not be sealed
 *   wrong-box                                  this jail's /box is not the stage's
 *
 * and waits for the host to close STATUS before it exits: until then the jail's cgroup, which
 * nsjail removes once init has gone, is there for the host to measure.
 *
 * DEADLINE_S seconds after the start everything in the namespace is killed and init exits: the
 * host's own wall-clock timer fires long before, so this only matters when the host died
 * mid-stage.
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
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <stdint.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
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

/* Where init's complaints go: its own stderr (nsjail's), then the stage's once it has it. */
static int error_fd = 2;

static int usage(const char *why) {
    dprintf(error_fd, "cellblock-init: %s\n", why);
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

#define MAGIC 0x43425231u /* "CBR1" */
#define MAX_REQUEST (64u << 20)
enum { STDIN_FD, STDOUT_FD, STDERR_FD, STATUS_FD, NFDS };

/* Reads exactly LEN bytes; 0 on success. */
static int read_all(int fd, char *buf, size_t len) {
    while (len > 0) {
        ssize_t n = read(fd, buf, len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Reads the stage's header and descriptors, then its fields. Returns the fields' length, 0 when
 * the host gave the jail up, -1 on a malformed request. */
static long read_request(int control, int fds[NFDS], uint64_t box[2], char **out) {
    struct {
        uint32_t magic, length;
        uint64_t dev, ino;
    } __attribute__((packed)) header;
    char cbuf[CMSG_SPACE(sizeof(int) * NFDS)];
    struct iovec iov = {.iov_base = &header, .iov_len = sizeof(header)};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof(cbuf)};
    ssize_t n;
    do n = recvmsg(control, &msg, MSG_CMSG_CLOEXEC | MSG_WAITALL);
    while (n < 0 && errno == EINTR);
    /* A host that closes with our 'R' unread resets the connection: given up all the same. */
    if (n == 0 || (n < 0 && errno == ECONNRESET)) return 0;
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    if (n != (ssize_t)sizeof(header) || (msg.msg_flags & MSG_CTRUNC) || !cmsg || cmsg->cmsg_level != SOL_SOCKET ||
        cmsg->cmsg_type != SCM_RIGHTS || cmsg->cmsg_len != CMSG_LEN(sizeof(int) * NFDS))
        return -1;
    memcpy(fds, CMSG_DATA(cmsg), sizeof(int) * NFDS);
    error_fd = fds[STDERR_FD];
    if (header.magic != MAGIC || header.length == 0 || header.length > MAX_REQUEST) return -1;
    box[0] = header.dev;
    box[1] = header.ino;
    char *buf = malloc(header.length);
    if (!buf || read_all(control, buf, header.length)) return -1;
    *out = buf;
    return (long)header.length;
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

static volatile sig_atomic_t reported;

static void kill_everything(int signo) {
    (void)signo;
    kill(-1, SIGKILL);
    if (reported) _exit(125); /* only the host's close was still awaited */
}

/* Waits until the host closes STATUS, or the deadline passes. */
static void await_host(int status_fd) {
    char byte;
    reported = 1;
    for (;;) {
        ssize_t n = read(status_fd, &byte, 1);
        if (n > 0 || (n < 0 && errno == EINTR)) continue;
        return;
    }
}

int main(int argc, char **argv) {
    if (argc != 2) return usage("usage: cellblock-init CONTROL_FD");
    /* kill(-1) below must only ever reach one sandbox's PID namespace, never a host. */
    if (getpid() != 1) return usage("refusing to run: not pid 1 of a PID namespace");
    int control = atoi(argv[1]);
    if (fcntl(control, F_SETFD, FD_CLOEXEC) != 0) return usage("no control socket");
    int sealed = seal_user_namespace();
    if (send(control, "R", 1, MSG_NOSIGNAL) != 1) return 0;
    int fds[NFDS];
    char *request = NULL;
    uint64_t box[2];
    long length = read_request(control, fds, box, &request);
    if (length == 0) return 0;
    if (length < 0) return usage("bad request: header");
    close(control);
    int status_fd = fds[STATUS_FD];
    struct stat own;
    if (stat("/box", &own) != 0 || (uint64_t)own.st_dev != box[0] || (uint64_t)own.st_ino != box[1]) {
        dprintf(status_fd, "wrong-box\n");
        await_host(status_fd);
        return 126;
    }
    if (sealed != 0) {
        dprintf(status_fd, "seal-failed %d\n", sealed);
        await_host(status_fd);
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
    unsigned long nfallback;
    char **fallback;
    if (next_count(&cursor, end, 1UL << 20, &nfallback) || !(fallback = next_list(&cursor, end, nfallback)))
        return usage("bad request: fallback");

    prctl(PR_SET_DUMPABLE, 0);
    /* No SA_RESTART: the wait below is interrupted and goes on reaping what the kill ended. */
    struct sigaction alarm_action = {.sa_handler = kill_everything};
    sigaction(SIGALRM, &alarm_action, NULL);
    alarm((unsigned)deadline);
    long long started = monotonic_micros();
    pid_t child = fork();
    if (child < 0) {
        dprintf(status_fd, "exec-failed %d\n", errno);
        await_host(status_fd);
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
        for (int k = STDIN_FD; k <= STDERR_FD; k++)
            if (dup2(fds[k], k) < 0) _exit(127);
        /* A terminal for stdin (an interactive stage, see console.py) becomes the controlling
         * terminal of a session of the program's own: Ctrl-C typed on it is SIGINT for the
         * program's process group, and /dev/tty is it. */
        if (isatty(STDIN_FILENO) && (setsid() < 0 || ioctl(STDIN_FILENO, TIOCSCTTY, 0) != 0)) {
            dprintf(2, "cellblock: cannot make the terminal the program's own: %s\n", strerror(errno));
            _exit(126);
        }
        /* Nothing but its three streams outlives exec: the program has no business with the
         * status socket (nor with the control socket, closed above). */
        for (int k = 0; k < NFDS; k++)
            if (fds[k] > STDERR_FD) close(fds[k]);
        char *tried = program[0];
        execve(tried, program, environment);
        if (nfallback > 0) execve(tried = fallback[0], fallback, environment);
        int err = errno;
        dprintf(2, "cellblock: cannot run %s: %s\n", tried, strerror(err));
        _exit(127);
    }
    /* The program's streams are its own: their ends of file come when its processes are gone. */
    for (int k = STDIN_FD; k <= STDERR_FD; k++) close(fds[k]);

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
    if (!have_main) {
        await_host(status_fd);
        return 126;
    }
    struct rusage usage;
    getrusage(RUSAGE_CHILDREN, &usage);
    if (WIFSIGNALED(main_status))
        dprintf(status_fd, "signaled %d %lld %lld %lld\n", WTERMSIG(main_status), micros(usage.ru_utime),
                micros(usage.ru_stime), wall);
    else
        dprintf(status_fd, "exited %d %lld %lld %lld\n", WEXITSTATUS(main_status), micros(usage.ru_utime),
                micros(usage.ru_stime), wall);
    await_host(status_fd);
    return 0;
}
