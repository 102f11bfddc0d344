"""The seccomp policy of every stage: what a sandboxed program may not ask the kernel.

The policy allows by default and refuses, by name, what a program never needs and what widens
the kernel's attack surface, reviewed against Docker's default profile and nsjail's examples
(SECURITY.md lists each refusal and why). A default-allow list, unlike Docker's default-deny one,
keeps every toolchain working, and each refused call is one a student's program has no use for.

Each rule answers an errno, chosen so that programs take their usual fallback: ``ENOSYS`` where
libc or a runtime probes for a newer call (clone3, io_uring), ``EAFNOSUPPORT`` for a socket
family the kernel could lack, ``EPERM`` where a privilege is missing. Calls of the 32-bit ABI
(``int 0x80``) never reach these rules: the compiled filter kills a process that uses another
architecture's calling convention.

Pure data; nsjail compiles it (kafel) once per jail.
"""

from __future__ import annotations

from dataclasses import dataclass

EPERM, ENOTTY, ENOSYS, EOPNOTSUPP, EPROTONOSUPPORT, EAFNOSUPPORT = 1, 25, 38, 95, 93, 97

#: Every flag of clone(2) that makes a new namespace (Docker's mask, 0x7E020000): NEWNS,
#: NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET. CLONE_NEWTIME is clone3/unshare-only.
CLONE_NAMESPACE_FLAGS = 0x7E020000
#: Personas a program may set (Docker's list): the default, PER_LINUX32, UNAME26, both, and
#: the query 0xffffffff. The others turn off ASLR or make reads imply exec.
ALLOWED_PERSONAS = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)
#: Socket families a program may open: AF_UNIX, AF_INET, AF_INET6, AF_NETLINK.
ALLOWED_FAMILIES = (1, 2, 10, 16)
AF_NETLINK, NETLINK_ROUTE = 16, 0
#: btrfs's ioctl type: the working directory is a btrfs subvolume, whose ioctls would let a
#: program make subvolumes and snapshots outside its disk cap. The reflink and dedupe calls
#: (FICLONE, FICLONERANGE, FIDEDUPERANGE) share the type: a reflink's back reference lives in
#: the extent tree, which no quota group counts, so they are refused too (EOPNOTSUPP, as on
#: ext4), and so is copy_file_range, which reflinks on btrfs (ENOSYS: callers then copy).
BTRFS_IOCTL_TYPE = 0x94
REFLINK_IOCTLS = (0x40049409, 0x4020940D, 0xC0189436)
#: TIOCSTI and TIOCLINUX push input into, or drive, a terminal the program may share;
#: TIOCSETD swaps a terminal's line discipline for another (n_gsm, n_hdlc: kernel code with
#: a history of exploits that no program of a sandbox needs).
TERMINAL_IOCTLS = (0x5412, 0x541C, 0x5423)


#: Calls newer than the syscall table of nsjail's kafel, by their x86_64 number, and the
#: one kafel names otherwise.
KAFEL_NUMBERS = {"quotactl_fd": 443, "set_mempolicy_home_node": 450, "statmount": 457,
                 "listmount": 458, "open_tree_attr": 467}  # fmt: skip
KAFEL_NAMES = {"umount2": "umount"}


@dataclass(frozen=True)
class Rule:
    """System calls refused with one errno, for one reason."""

    errno: int
    why: str
    calls: tuple[str, ...]


def _int(arg: str) -> str:
    # int arguments arrive in 64-bit registers whose upper half the kernel ignores: compare
    # only the lower half, or a program could slip past with garbage in the upper one.
    return f"({arg} & 0xffffffff)"


def _none_of(arg: str, values: tuple[int, ...]) -> str:
    return " && ".join(f"{_int(arg)} != {value:#x}" for value in values)


RULES: tuple[Rule, ...] = (
    Rule(
        EPERM,
        "making or entering a namespace (a new user namespace gives its creator every "
        "capability inside it: the door of the nf_tables escalations)",
        (
            "unshare",
            "setns",
            f"clone(flags) {{ (flags & {CLONE_NAMESPACE_FLAGS:#x}) != 0 }}",
        ),
    ),
    Rule(
        ENOSYS,
        "clone3 passes its flags in memory, where seccomp cannot see them; libc falls back "
        "to clone on ENOSYS",
        ("clone3",),
    ),
    Rule(
        ENOSYS,
        "io_uring: the largest source of kernel exploits of recent years",
        ("io_uring_setup", "io_uring_enter", "io_uring_register"),
    ),
    Rule(
        EPERM,
        "mounting, and the new mount API",
        (
            "mount",
            "umount2",
            "pivot_root",
            "chroot",
            "fsopen",
            "fsmount",
            "fsconfig",
            "fspick",
            "move_mount",
            "open_tree",
            "mount_setattr",
            "statmount",
            "listmount",
            "open_tree_attr",
        ),
    ),
    Rule(
        EPERM,
        "reading or changing other processes (ptrace and its relatives)",
        (
            "ptrace",
            "process_vm_readv",
            "process_vm_writev",
            "kcmp",
            "pidfd_getfd",
            "process_madvise",
        ),
    ),
    Rule(
        EPERM,
        "kernel facilities with a history of exploits and no use in a program here",
        (
            "keyctl",
            "add_key",
            "request_key",
            "bpf",
            "perf_event_open",
            "userfaultfd",
            "fanotify_init",
            "lookup_dcookie",
            "modify_ldt",
            "uselib",
            "ustat",
            "sysfs",
            "name_to_handle_at",
            "open_by_handle_at",
        ),
    ),
    Rule(
        EPERM,
        "changing the host: modules, kexec, reboot, swap, clocks, names, I/O ports, quotas",
        (
            "kexec_load",
            "kexec_file_load",
            "init_module",
            "finit_module",
            "delete_module",
            "reboot",
            "swapon",
            "swapoff",
            "acct",
            "quotactl",
            "quotactl_fd",
            "syslog",
            "settimeofday",
            "clock_settime",
            "clock_adjtime",
            "adjtimex",
            "sethostname",
            "setdomainname",
            "iopl",
            "ioperm",
            "vhangup",
        ),
    ),
    Rule(
        EPERM,
        "NUMA memory policy: placement on the host's memory nodes is the host's business",
        (
            "mbind",
            "set_mempolicy",
            "get_mempolicy",
            "migrate_pages",
            "move_pages",
            "set_mempolicy_home_node",
        ),
    ),
    Rule(
        EPERM,
        "personas that turn off address-space randomisation or make reads imply exec",
        (f"personality(persona) {{ {_none_of('persona', ALLOWED_PERSONAS)} }}",),
    ),
    Rule(
        EAFNOSUPPORT,
        "socket families beyond unix, IPv4, IPv6 and netlink (AF_ALG, AF_VSOCK, AF_PACKET, "
        "AF_KEY, ...)",
        (f"socket(domain) {{ {_none_of('domain', ALLOWED_FAMILIES)} }}",),
    ),
    Rule(
        EPROTONOSUPPORT,
        "netlink beyond NETLINK_ROUTE (which libc's getaddrinfo uses): NETLINK_NETFILTER "
        "and the others configure the kernel",
        (
            "socket(domain, type, protocol) { "
            f"{_int('domain')} == {AF_NETLINK} && {_int('protocol')} != {NETLINK_ROUTE} }}",
        ),
    ),
    Rule(
        EOPNOTSUPP,
        "reflinks and dedupe: their back references escape the working directory's disk cap",
        (
            "ioctl(fd, request) { "
            + " || ".join(f"{_int('request')} == {v:#x}" for v in REFLINK_IOCTLS)
            + " }",
        ),
    ),
    Rule(
        ENOSYS,
        "copy_file_range, which reflinks on btrfs; callers fall back to reading and writing",
        ("copy_file_range",),
    ),
    Rule(
        ENOTTY,
        "btrfs's own ioctls: subvolumes and snapshots would escape the working directory's "
        "disk cap",
        (f"ioctl(fd, request) {{ (request & 0xff00) == {BTRFS_IOCTL_TYPE << 8:#x} }}",),
    ),
    Rule(
        EPERM,
        "faking terminal input (TIOCSTI), driving the console (TIOCLINUX) and changing a "
        "terminal's line discipline (TIOCSETD)",
        (
            "ioctl(fd, request) { "
            + " || ".join(f"{_int('request')} == {v:#x}" for v in TERMINAL_IOCTLS)
            + " }",
        ),
    ),
)


def refused_calls() -> list[str]:
    """The names of every refused call, as SECURITY.md lists them (once each)."""
    names = [call.split("(")[0].split(" ")[0] for rule in RULES for call in rule.calls]
    return list(dict.fromkeys(names))


def _kafel(call: str) -> str:
    if call in KAFEL_NUMBERS:
        return f"SYSCALL[{KAFEL_NUMBERS[call]}]"
    return KAFEL_NAMES.get(call, call)


def policy() -> str:
    """The policy in kafel's language, as nsjail's ``--seccomp_string`` takes it."""
    blocks = [
        f"ERRNO({rule.errno}) {{ {', '.join(_kafel(call) for call in rule.calls)} }}"
        for rule in RULES
    ]
    return ", ".join(blocks) + " DEFAULT ALLOW"


POLICY = policy()
