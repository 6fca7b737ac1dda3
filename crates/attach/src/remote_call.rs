//! A function call made by a stopped thread of another process (x86-64 System V): arguments in
//! registers, data below the red zone of its stack, and a return to address 0, whose fault
//! stops the thread again with the result in `rax`.

use std::time::Instant;

use nix::sys::signal::Signal;

use crate::tracee::{Stop, TraceError, Tracee};

/// The bytes below the stack pointer a function may use without moving it (the ABI's red
/// zone): left untouched.
const RED_ZONE: u64 = 128;

/// How a call ended when it did not return.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("{0}")]
    Trace(#[from] TraceError),
    #[error("the call faulted with {signal} at {rip:#x}")]
    Faulted { signal: Signal, rip: u64 },
}

/// Calls `function(args...)` in `thread`, stopped, with `data` copied below its red zone
/// first; `args` may name the copy's address as [`Arg::Data`]. Returns `rax`. The thread's
/// registers are left as the call left them: the caller restores what it saved.
pub fn call(
    thread: &mut Tracee,
    base: &libc::user_regs_struct,
    function: u64,
    args: &[Arg],
    data: &[u8],
    deadline: Instant,
) -> Result<u64, CallError> {
    let data_at = (base.rsp - RED_ZONE - data.len() as u64) & !15;
    if !data.is_empty() {
        thread.write(data_at, data)?;
    }
    // At the function's first instruction the stack pointer is 8 below a multiple of 16,
    // pointing at the return address.
    let return_slot = data_at - 16 + 8;
    thread.write(return_slot, &0u64.to_ne_bytes())?;
    let mut regs = *base;
    regs.rip = function;
    regs.rsp = return_slot;
    regs.rax = 0;
    // Not in a system call: the kernel must not restart one around this call.
    regs.orig_rax = u64::MAX;
    // The direction flag clear, as the ABI requires at a call; no single-stepping.
    regs.eflags &= !(0x400 | 0x100);
    let registers = [
        &mut regs.rdi,
        &mut regs.rsi,
        &mut regs.rdx,
        &mut regs.rcx,
        &mut regs.r8,
        &mut regs.r9,
    ];
    assert!(args.len() <= registers.len(), "at most six arguments");
    for (register, arg) in registers.into_iter().zip(args) {
        *register = match *arg {
            Arg::Value(v) => v,
            Arg::Data => data_at,
        };
    }
    thread.set_regs(regs)?;
    thread.resume()?;
    loop {
        match thread.wait(deadline)? {
            Stop::Signal(signal) => {
                let now = thread.regs()?;
                if signal == Signal::SIGSEGV && now.rip == 0 && now.rsp == return_slot + 8 {
                    return Ok(now.rax);
                }
                if matches!(
                    signal,
                    Signal::SIGSEGV | Signal::SIGBUS | Signal::SIGILL | Signal::SIGFPE
                ) {
                    return Err(CallError::Faulted {
                        signal,
                        rip: now.rip,
                    });
                }
                // Every other signal is blocked for the call and stays pending until the mask
                // is restored; only SIGSTOP cannot be blocked: it is delivered when the thread
                // is let go, so that the process stops as it was asked to.
                if signal == Signal::SIGSTOP {
                    thread.defer(signal);
                }
                thread.resume()?;
            }
            // A group stop (someone sent SIGSTOP) while the call runs: go on with the call; the
            // stop is the process's again once the thread is given back.
            Stop::Interrupted => thread.resume()?,
        }
    }
}

/// An argument of [`call`].
#[derive(Debug, Clone, Copy)]
pub enum Arg {
    Value(u64),
    /// The address of the data copied below the red zone.
    Data,
}
