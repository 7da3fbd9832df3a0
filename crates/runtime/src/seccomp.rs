//! The seccomp filter every sandbox process runs under.
//!
//! A deny list in the spirit of Docker's default profile: system calls that
//! act on the host rather than the sandbox (modules, kexec, reboot, clock,
//! swap, keyrings, bpf, perf, mounts, namespace entry and creation, io_uring)
//! fail with EPERM; `clone3` fails with ENOSYS so libc falls back to `clone`,
//! whose flags can be inspected; 32-bit and x32 entry points are refused.
//! Everything else is allowed. The policy is the [`DENIED`] table; the BPF
//! program is generated from it.

use nix::libc;

/// One classic BPF instruction (`struct sock_filter`).
pub type Insn = libc::sock_filter;

const LD_W_ABS: u16 = 0x20;
const JEQ_K: u16 = 0x15;
const JGE_K: u16 = 0x35;
const JSET_K: u16 = 0x45;
const RET_K: u16 = 0x06;

const RET_ALLOW: u32 = 0x7fff_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_KILL_PROCESS: u32 = 0x8000_0000;
const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// Offsets into `struct seccomp_data`.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const OFF_ARG0_LO: u32 = 16;

/// Namespace-creating clone/unshare flags: NEWNS, NEWCGROUP, NEWUTS,
/// NEWIPC, NEWUSER, NEWPID, NEWNET, NEWTIME.
pub const NAMESPACE_FLAGS: u32 = 0x0002_0000
    | 0x0200_0000
    | 0x0400_0000
    | 0x0800_0000
    | 0x1000_0000
    | 0x2000_0000
    | 0x4000_0000
    | 0x0000_0080;

/// System calls refused with EPERM, and why.
pub const DENIED: &[(&str, libc::c_long)] = &[
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("create_module", 174),
    ("get_kernel_syms", 177),
    ("query_module", 178),
    ("bpf", libc::SYS_bpf),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("keyctl", libc::SYS_keyctl),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    ("reboot", libc::SYS_reboot),
    ("settimeofday", libc::SYS_settimeofday),
    ("clock_settime", libc::SYS_clock_settime),
    ("clock_adjtime", libc::SYS_clock_adjtime),
    ("adjtimex", libc::SYS_adjtimex),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("acct", libc::SYS_acct),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("name_to_handle_at", libc::SYS_name_to_handle_at),
    ("lookup_dcookie", libc::SYS_lookup_dcookie),
    ("iopl", libc::SYS_iopl),
    ("ioperm", libc::SYS_ioperm),
    ("quotactl", libc::SYS_quotactl),
    ("syslog", libc::SYS_syslog),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("_sysctl", libc::SYS__sysctl),
    ("uselib", libc::SYS_uselib),
    ("nfsservctl", libc::SYS_nfsservctl),
    ("vhangup", libc::SYS_vhangup),
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("pivot_root", libc::SYS_pivot_root),
    ("open_tree", libc::SYS_open_tree),
    ("move_mount", libc::SYS_move_mount),
    ("fsopen", libc::SYS_fsopen),
    ("fsconfig", libc::SYS_fsconfig),
    ("fsmount", libc::SYS_fsmount),
    ("fspick", libc::SYS_fspick),
    ("mount_setattr", libc::SYS_mount_setattr),
    ("setns", libc::SYS_setns),
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("io_uring_enter", libc::SYS_io_uring_enter),
    ("io_uring_register", libc::SYS_io_uring_register),
    ("fanotify_init", libc::SYS_fanotify_init),
];

fn stmt(code: u16, k: u32) -> Insn {
    Insn {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> Insn {
    Insn { code, jt, jf, k }
}

fn nr(n: libc::c_long) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The filter program for x86_64.
pub fn program() -> Vec<Insn> {
    let eperm = RET_ERRNO | u32::try_from(libc::EPERM).unwrap_or(1);
    let enosys = RET_ERRNO | u32::try_from(libc::ENOSYS).unwrap_or(38);
    let mut p = vec![
        stmt(LD_W_ABS, OFF_ARCH),
        jump(JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
        stmt(RET_K, RET_KILL_PROCESS),
        stmt(LD_W_ABS, OFF_NR),
        // x32 system calls (nr | 0x40000000) are another ABI: refuse.
        jump(JGE_K, X32_SYSCALL_BIT, 0, 1),
        stmt(RET_K, eperm),
    ];
    for (_, n) in DENIED {
        p.push(jump(JEQ_K, nr(*n), 0, 1));
        p.push(stmt(RET_K, eperm));
    }
    p.push(jump(JEQ_K, nr(libc::SYS_clone3), 0, 1));
    p.push(stmt(RET_K, enosys));
    for call in [libc::SYS_clone, libc::SYS_unshare] {
        // if nr == call and (arg0 & NAMESPACE_FLAGS) != 0: EPERM
        p.push(jump(JEQ_K, nr(call), 0, 4));
        p.push(stmt(LD_W_ABS, OFF_ARG0_LO));
        p.push(jump(JSET_K, NAMESPACE_FLAGS, 0, 1));
        p.push(stmt(RET_K, eperm));
        p.push(stmt(LD_W_ABS, OFF_NR));
    }
    p.push(stmt(RET_K, RET_ALLOW));
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny interpreter for the subset of BPF the filter uses.
    fn run(p: &[Insn], nr: u32, arch: u32, arg0: u32) -> u32 {
        let mut acc = 0u32;
        let mut pc = 0usize;
        loop {
            let i = p[pc];
            match i.code {
                LD_W_ABS => {
                    acc = match i.k {
                        OFF_NR => nr,
                        OFF_ARCH => arch,
                        OFF_ARG0_LO => arg0,
                        _ => panic!("unexpected load"),
                    };
                    pc += 1;
                }
                JEQ_K | JGE_K | JSET_K => {
                    let taken = match i.code {
                        JEQ_K => acc == i.k,
                        JGE_K => acc >= i.k,
                        _ => acc & i.k != 0,
                    };
                    pc += 1 + usize::from(if taken { i.jt } else { i.jf });
                }
                RET_K => return i.k,
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
    }

    const X86: u32 = AUDIT_ARCH_X86_64;

    #[test]
    fn denied_calls_get_eperm_and_others_pass() {
        let p = program();
        let eperm = RET_ERRNO | 1;
        for (name, n) in DENIED {
            assert_eq!(run(&p, nr(*n), X86, 0), eperm, "{name}");
        }
        for ok in [
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_execve,
            libc::SYS_ptrace,
        ] {
            assert_eq!(run(&p, nr(ok), X86, 0), RET_ALLOW);
        }
    }

    #[test]
    fn namespace_flags_are_refused_in_clone_and_unshare_only() {
        let p = program();
        let fork_flags = 0x0120_0011; // CLONE_CHILD_SETTID|CLONE_CHILD_CLEARTID|SIGCHLD
        assert_eq!(run(&p, nr(libc::SYS_clone), X86, fork_flags), RET_ALLOW);
        assert_eq!(
            run(&p, nr(libc::SYS_clone), X86, fork_flags | 0x1000_0000),
            RET_ERRNO | 1
        );
        assert_eq!(
            run(&p, nr(libc::SYS_unshare), X86, 0x0002_0000),
            RET_ERRNO | 1
        );
        assert_eq!(run(&p, nr(libc::SYS_unshare), X86, 0x0000_0200), RET_ALLOW); // CLONE_FS
        assert_eq!(run(&p, nr(libc::SYS_clone3), X86, 0), RET_ERRNO | 38);
    }

    #[test]
    fn foreign_architectures_and_x32_are_refused() {
        let p = program();
        assert_eq!(run(&p, 0, 0x4000_0003, 0), RET_KILL_PROCESS); // i386
        assert_eq!(run(&p, X32_SYSCALL_BIT | 1, X86, 0), RET_ERRNO | 1);
    }

    #[test]
    fn jumps_stay_in_range() {
        assert!(program().len() < 4096);
    }
}
