/*
 * The attack probe of tests/security: `probe NAME...` tries each named attack on the kernel and
 * prints one line per attack, "NAME RESULT ERRNO_NAME", where RESULT is the call's return value
 * (-1 on failure) and ERRNO_NAME the errno's symbolic name (or "-" on success). An attack that
 * the kernel kills the process for prints nothing more: the test sees the signal.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/io_uring.h>
#include <linux/netlink.h>
#include <linux/sched.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/personality.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static const char *errname(int e) {
    switch (e) {
    case EPERM: return "EPERM";
    case ENOENT: return "ENOENT";
    case EBADF: return "EBADF";
    case EACCES: return "EACCES";
    case EFAULT: return "EFAULT";
    case EINVAL: return "EINVAL";
    case ENOSPC: return "ENOSPC";
    case EROFS: return "EROFS";
    case ENOTTY: return "ENOTTY";
    case ENOSYS: return "ENOSYS";
    case EPROTONOSUPPORT: return "EPROTONOSUPPORT";
    case EAFNOSUPPORT: return "EAFNOSUPPORT";
    case EOPNOTSUPP: return "EOPNOTSUPP";
    case EDQUOT: return "EDQUOT";
    case EXDEV: return "EXDEV";
    default: return "OTHER";
    }
}

static void report(const char *name, long ret) {
    printf("%s %ld %s\n", name, ret, ret < 0 ? errname(errno) : "-");
    fflush(stdout);
}

static char stack[1 << 16], stack2[1 << 16];

/* Inside a nested user namespace: try for CAP_NET_ADMIN's door, a netfilter netlink socket. */
static int nested_netfilter(void *unused) {
    (void)unused;
    report("nested_netlink_netfilter", socket(AF_NETLINK, SOCK_RAW, NETLINK_NETFILTER));
    return 0;
}

static int in_new_user_namespace(void *unused) {
    (void)unused;
    long pid = clone(nested_netfilter, stack2 + sizeof stack2, CLONE_NEWNET | CLONE_NEWNS | SIGCHLD, 0);
    report("nested_clone_newnet", pid);
    if (pid > 0) waitpid((pid_t)pid, NULL, 0);
    return 0;
}

static long clone_with(unsigned long flags) {
    long pid = clone(in_new_user_namespace, stack + sizeof stack, (int)(flags | SIGCHLD), 0);
    if (pid > 0) waitpid((pid_t)pid, NULL, 0);
    return pid;
}

static long clone3_with(unsigned long long flags) {
    struct clone_args args;
    memset(&args, 0, sizeof args);
    args.flags = flags;
    args.exit_signal = SIGCHLD;
    long pid = syscall(SYS_clone3, &args, sizeof args);
    if (pid == 0) _exit(0);
    if (pid > 0) waitpid((pid_t)pid, NULL, 0);
    return pid;
}

static long io_uring(void) {
    struct io_uring_params params;
    memset(&params, 0, sizeof params);
    return syscall(SYS_io_uring_setup, 4, &params);
}

/* The i386 calling convention from a 64-bit process: unshare is 310 there. */
static long int80_unshare(void) {
    long ret;
    __asm__ volatile("int $0x80" : "=a"(ret) : "a"(310), "b"(CLONE_NEWUSER) : "memory");
    return ret;
}

/* A btrfs ioctl: BTRFS_IOC_SUBVOL_CREATE of "escape" in the working directory. */
static long btrfs_subvolume(void) {
    struct { int64_t fd; char name[4088]; } args;
    memset(&args, 0, sizeof args);
    strcpy(args.name, "escape");
    int dir = open(".", O_RDONLY | O_DIRECTORY);
    long ret = ioctl(dir, 0x5000940eUL, &args);
    int saved = errno;
    close(dir);
    errno = saved;
    return ret;
}

/* A reflink of a fresh one-block file in the working directory: FICLONE or FICLONERANGE. */
static long reflink(int whole) {
    char block[4096];
    memset(block, 'x', sizeof block);
    int src = open("reflink-src", O_CREAT | O_RDWR | O_TRUNC, 0600);
    int dst = open("reflink-dst", O_CREAT | O_RDWR | O_TRUNC, 0600);
    long ret = write(src, block, sizeof block) == (long)sizeof block ? 0 : -1;
    fsync(src);
    if (ret == 0) {
        struct { int64_t src_fd; uint64_t src_offset, src_length, dest_offset; } range = {src, 0, 4096, 0};
        ret = whole ? ioctl(dst, 0x40049409UL, src) : ioctl(dst, 0x4020940dUL, &range);
    }
    int saved = errno;
    close(src);
    close(dst);
    errno = saved;
    return ret;
}

static long copy_range(void) {
    int src = open("/etc/passwd", O_RDONLY), dst = open("copy-dst", O_CREAT | O_WRONLY | O_TRUNC, 0600);
    long ret = syscall(SYS_copy_file_range, src, NULL, dst, NULL, 100, 0);
    int saved = errno;
    close(src);
    close(dst);
    errno = saved;
    return ret;
}

/* An ioctl request with garbage in the upper half, which the kernel ignores. */
static long tiocsti(unsigned long upper) {
    char c = 'x';
    return ioctl(0, (unsigned long)TIOCSTI | upper, &c);
}

int main(int argc, char **argv) {
    for (int k = 1; k < argc; k++) {
        const char *a = argv[k];
        long r;
        errno = 0;
        if (!strcmp(a, "clone_newuser")) r = clone_with(CLONE_NEWUSER);
        else if (!strcmp(a, "clone_newnet")) r = clone_with(CLONE_NEWNET | CLONE_NEWNS);
        else if (!strcmp(a, "clone_newpid")) r = clone_with(CLONE_NEWPID);
        else if (!strcmp(a, "clone_upper_bits")) r = syscall(SYS_clone, (1UL << 40) | CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0);
        else if (!strcmp(a, "clone3_newuser")) r = clone3_with(CLONE_NEWUSER);
        else if (!strcmp(a, "clone3_plain")) r = clone3_with(0);
        else if (!strcmp(a, "unshare_user")) r = unshare(CLONE_NEWUSER);
        else if (!strcmp(a, "unshare_net")) r = unshare(CLONE_NEWNET);
        else if (!strcmp(a, "setns")) r = setns(open("/proc/self/ns/user", O_RDONLY), CLONE_NEWUSER);
        else if (!strcmp(a, "int80_unshare")) r = int80_unshare();
        else if (!strcmp(a, "io_uring_setup")) r = io_uring();
        else if (!strcmp(a, "io_uring_enter")) r = syscall(SYS_io_uring_enter, 0, 1, 0, 0, 0, 0);
        else if (!strcmp(a, "io_uring_register")) r = syscall(SYS_io_uring_register, 0, 0, 0, 0);
        else if (!strcmp(a, "personality_no_aslr")) r = personality(ADDR_NO_RANDOMIZE);
        else if (!strcmp(a, "personality_upper_bits")) r = syscall(SYS_personality, (1UL << 40) | ADDR_NO_RANDOMIZE);
        else if (!strcmp(a, "personality_query")) r = personality(0xffffffff);
        else if (!strcmp(a, "mbind")) r = syscall(SYS_mbind, 0, 0, 0, 0, 0, 0);
        else if (!strcmp(a, "set_mempolicy")) r = syscall(SYS_set_mempolicy, 0, 0, 0);
        else if (!strcmp(a, "get_mempolicy")) r = syscall(SYS_get_mempolicy, 0, 0, 0, 0, 0);
        else if (!strcmp(a, "migrate_pages")) r = syscall(SYS_migrate_pages, 0, 0, 0, 0);
        else if (!strcmp(a, "move_pages")) r = syscall(SYS_move_pages, 0, 0, 0, 0, 0, 0);
        else if (!strcmp(a, "fsopen")) r = syscall(SYS_fsopen, "tmpfs", 0);
        else if (!strcmp(a, "open_tree")) r = syscall(SYS_open_tree, AT_FDCWD, "/", 1);
        else if (!strcmp(a, "mount")) r = syscall(SYS_mount, "none", "/tmp", "tmpfs", 0, 0);
        else if (!strcmp(a, "modify_ldt")) r = syscall(SYS_modify_ldt, 0, 0, 0);
        else if (!strcmp(a, "pidfd_getfd")) r = syscall(SYS_pidfd_getfd, 0, 0, 0);
        else if (!strcmp(a, "process_madvise")) r = syscall(SYS_process_madvise, 0, 0, 0, 0, 0);
        else if (!strcmp(a, "kcmp")) r = syscall(SYS_kcmp, getpid(), getpid(), 0, 0, 0);
        else if (!strcmp(a, "fanotify_init")) r = syscall(SYS_fanotify_init, 0, 0);
        else if (!strcmp(a, "socket_alg")) r = socket(38, SOCK_SEQPACKET, 0);
        else if (!strcmp(a, "socket_vsock")) r = socket(40, SOCK_STREAM, 0);
        else if (!strcmp(a, "socket_packet")) r = socket(17, SOCK_RAW, 0);
        else if (!strcmp(a, "socket_family_upper_bits")) r = syscall(SYS_socket, (1UL << 40) | 40, SOCK_STREAM, 0);
        else if (!strcmp(a, "netlink_netfilter")) r = socket(AF_NETLINK, SOCK_RAW, NETLINK_NETFILTER);
        else if (!strcmp(a, "netlink_route")) r = socket(AF_NETLINK, SOCK_RAW, NETLINK_ROUTE);
        else if (!strcmp(a, "socket_inet")) r = socket(AF_INET, SOCK_STREAM, 0);
        else if (!strcmp(a, "socket_unix")) r = socket(AF_UNIX, SOCK_STREAM, 0);
        else if (!strcmp(a, "btrfs_subvolume")) r = btrfs_subvolume();
        else if (!strcmp(a, "ficlone")) r = reflink(1);
        else if (!strcmp(a, "ficlonerange")) r = reflink(0);
        else if (!strcmp(a, "copy_file_range")) r = copy_range();
        else if (!strcmp(a, "tiocsti")) r = tiocsti(0);
        else if (!strcmp(a, "tiocsti_upper_bits")) r = tiocsti(1UL << 40);
        else {
            fprintf(stderr, "probe: unknown attack %s\n", a);
            return 2;
        }
        report(a, r);
    }
    return 0;
}
