/*
 * The privilege attacks of tests/security/test_attacks_privilege.py, compiled in a submission's
 * compile stage: `escalate NAME...` tries each named attack and prints one line per attack,
 * "NAME RESULT ERRNO_NAME", where RESULT is the call's return value (-1 on failure) and
 * ERRNO_NAME the errno's symbolic name (or "-" on success).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/bpf.h>
#include <linux/keyctl.h>
#include <linux/perf_event.h>
#include <netinet/in.h>
#include <grp.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/ptrace.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

static pid_t sibling;

static long bpf_map(void) {
    union bpf_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.map_type = BPF_MAP_TYPE_ARRAY;
    attr.key_size = 4;
    attr.value_size = 4;
    attr.max_entries = 1;
    return syscall(SYS_bpf, BPF_MAP_CREATE, &attr, sizeof attr);
}

/* What a host with perf_event_paranoid 2 allows anyone: counting its own user-space time. */
static long perf_self(void) {
    struct perf_event_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.size = sizeof attr;
    attr.type = PERF_TYPE_SOFTWARE;
    attr.config = PERF_COUNT_SW_CPU_CLOCK;
    attr.exclude_kernel = 1;
    attr.exclude_hv = 1;
    return syscall(SYS_perf_event_open, &attr, 0, -1, -1, 0);
}

static long read_sibling(void) {
    char mine[8], theirs[8];
    struct iovec local = {mine, sizeof mine}, remote = {theirs, sizeof theirs};
    return process_vm_readv(sibling, &local, 1, &remote, 1, 0);
}

/* Raise a hard limit by one (from unlimited: nothing to raise, so the limit is lowered first
 * and then raised back, which only a privileged process may do). */
static long raise_hard(int resource) {
    struct rlimit limit;
    if (getrlimit(resource, &limit) != 0) return -1;
    if (limit.rlim_max == RLIM_INFINITY) {
        limit.rlim_cur = limit.rlim_max = 1 << 20;
        if (setrlimit(resource, &limit) != 0) return -1;
        limit.rlim_max = RLIM_INFINITY;
    } else {
        limit.rlim_max += 1;
    }
    return setrlimit(resource, &limit);
}

static long attack(const char *name) {
    if (!strcmp(name, "bpf")) return bpf_map();
    if (!strcmp(name, "perf_event_open")) return perf_self();
    if (!strcmp(name, "userfaultfd")) return syscall(SYS_userfaultfd, 0);
    if (!strcmp(name, "keyctl")) return syscall(SYS_keyctl, KEYCTL_JOIN_SESSION_KEYRING, "cb");
    if (!strcmp(name, "add_key"))
        return syscall(SYS_add_key, "user", "cb", "secret", 6, KEY_SPEC_SESSION_KEYRING);
    if (!strcmp(name, "ptrace_attach")) return ptrace(PTRACE_ATTACH, sibling, 0, 0);
    if (!strcmp(name, "ptrace_seize_init")) return ptrace(PTRACE_SEIZE, 1, 0, 0);
    if (!strcmp(name, "ptrace_traceme")) return ptrace(PTRACE_TRACEME, 0, 0, 0);
    if (!strcmp(name, "process_vm_readv")) return read_sibling();
    if (!strcmp(name, "mount_tmpfs")) return mount("none", "/tmp", "tmpfs", 0, NULL);
    if (!strcmp(name, "mount_bind")) return mount("/usr", "/box", NULL, MS_BIND, NULL);
    if (!strcmp(name, "remount_root_rw")) return mount(NULL, "/", NULL, MS_REMOUNT, NULL);
    if (!strcmp(name, "mount_cgroup")) return mount("none", "/tmp", "cgroup2", 0, NULL);
    if (!strcmp(name, "umount_box")) return umount2("/box", MNT_DETACH);
    if (!strcmp(name, "chroot")) return chroot("/tmp");
    if (!strcmp(name, "socket_raw")) return socket(AF_INET, SOCK_RAW, IPPROTO_ICMP);
    if (!strcmp(name, "socket_raw6")) return socket(AF_INET6, SOCK_RAW, IPPROTO_ICMPV6);
    if (!strcmp(name, "socket_packet")) return socket(AF_PACKET, SOCK_RAW, 0);
    if (!strcmp(name, "setuid_root")) return setuid(0);
    if (!strcmp(name, "setgid_root")) return setgid(0);
    if (!strcmp(name, "setgroups")) return setgroups(0, NULL);
    if (!strcmp(name, "raise_nofile")) return raise_hard(RLIMIT_NOFILE);
    if (!strcmp(name, "raise_nproc")) return raise_hard(RLIMIT_NPROC);
    if (!strcmp(name, "raise_core")) return raise_hard(RLIMIT_CORE);
    if (!strcmp(name, "raise_cpu")) return raise_hard(RLIMIT_CPU);
    if (!strcmp(name, "raise_rtprio")) return raise_hard(RLIMIT_RTPRIO);
    if (!strcmp(name, "prlimit_init")) {
        struct rlimit limit = {RLIM_INFINITY, RLIM_INFINITY};
        return prlimit(1, RLIMIT_NOFILE, &limit, NULL);
    }
    if (!strcmp(name, "nice_down")) return setpriority(PRIO_PROCESS, 0, -5);
    if (!strcmp(name, "sched_fifo")) {
        struct sched_param param = {.sched_priority = 1};
        return sched_setscheduler(0, SCHED_FIFO, &param);
    }
    errno = EINVAL;
    return -2;
}

int main(int argc, char **argv) {
    sibling = fork();
    if (sibling == 0) {
        pause();
        _exit(0);
    }
    for (int i = 1; i < argc; i++) {
        errno = 0;
        long ret = attack(argv[i]);
        printf("%s %ld %s\n", argv[i], ret, ret < 0 ? strerrorname_np(errno) : "-");
    }
    kill(sibling, SIGKILL);
    waitpid(sibling, NULL, 0);
    return 0;
}
