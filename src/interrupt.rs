//! Ctrl-C while a pipeline runs: the first asks long passes to stop at their next safe
//! point (`Train` after its current step, with a checkpoint), the second quits at once.
//! Outputs are written atomically either way, so none is left half written.

use std::sync::atomic::{AtomicBool, Ordering};

/// Set by the first Ctrl-C.
pub static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    if STOP.swap(true, Ordering::SeqCst) {
        // SAFETY: `_exit` is async-signal-safe.
        unsafe { libc::_exit(130) };
    }
    let text = b"\nupmix: stopping after the current step (Ctrl-C again to quit at once)\n";
    // SAFETY: `write` is async-signal-safe; the buffer outlives the call.
    unsafe { libc::write(2, text.as_ptr().cast(), text.len()) };
}

/// Routes SIGINT to [`STOP`] for the rest of the process.
pub fn install() {
    let handler: extern "C" fn(libc::c_int) = on_interrupt;
    // SAFETY: the handler only touches an atomic and calls async-signal-safe functions.
    unsafe { libc::signal(libc::SIGINT, handler as libc::sighandler_t) };
}
