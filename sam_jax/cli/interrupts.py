"""SIGTERM as Ctrl-C for the commands, in a module that imports no jax: an entry point installs
it before its heavy imports (`convert_weights.main`), `cli.common.run_command` around the work.

A KeyboardInterrupt raised inside a __del__ or a garbage-collection callback (jax registers one)
is dropped by Python with a traceback on stderr; the handler retries it a moment later instead.
"""

from __future__ import annotations

import gc
import signal
import sys
import threading

# An interrupt that lands where Python drops exceptions is raised again this much later.
INTERRUPT_RETRY_S = 0.02


def raise_interrupt(signum, frame):
    """SIGTERM (and SIGALRM, its retry) -> KeyboardInterrupt, except inside a garbage-collection
    callback or a __del__, where Python would drop it with a traceback on stderr: there the
    interrupt is tried again a moment later, once that code is over."""
    del signum
    if _in_finalizer(frame):
        signal.setitimer(signal.ITIMER_REAL, INTERRUPT_RETRY_S)
        return
    raise KeyboardInterrupt


def _in_finalizer(frame) -> bool:
    callbacks = {getattr(cb, "__code__", None) for cb in gc.callbacks}
    while frame is not None:
        if frame.f_code in callbacks or frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def sigterm_as_interrupt():
    """Installs the SIGTERM -> KeyboardInterrupt handler (`raise_interrupt`; SIGALRM is its
    retry), and an unraisable hook that retries an interrupt Python dropped anyway (one raised
    inside C code's callbacks, a weakref finalizer, ...). Returns what to restore (None when not
    on the main thread, where handlers cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous_hook = sys.unraisablehook
    active = [True]  # until the command ends (a hook installed after ours may keep it in place)

    def retry_dropped_interrupts(unraisable) -> None:
        if active[0] and isinstance(unraisable.exc_value, KeyboardInterrupt):
            signal.setitimer(signal.ITIMER_REAL, INTERRUPT_RETRY_S)
        else:
            previous_hook(unraisable)

    def restore() -> None:
        active[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        for s, handler in handlers.items():
            signal.signal(s, handler)
        if sys.unraisablehook is retry_dropped_interrupts:  # else another hook chains to ours
            sys.unraisablehook = previous_hook

    sys.unraisablehook = retry_dropped_interrupts
    handlers = {s: signal.signal(s, raise_interrupt) for s in (signal.SIGTERM, signal.SIGALRM)}
    return restore
