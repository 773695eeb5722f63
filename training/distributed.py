"""The end of a multi-process run: it finishes, or it fails with a message; it never hangs.

Every rank ends through `end_run` in the same order: one final barrier (no rank leaves while another
still works), then the process group is destroyed. Both happen under a watchdog: a rank whose peer
died, or whose communication library blocks in its teardown (seen with gloo on a busy machine: both
ranks idle forever after the run had written everything), prints what it was waiting for and exits
with EXIT_TEARDOWN instead of holding its memory and accelerator forever. A second, GIL-free watchdog
(faulthandler) stays armed through the interpreter's own shutdown, where native threads of the
process group can still block; it dumps every thread's stack and exits with code 1.

A single-process run has no process group and ends as before.
"""
from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
from typing import Callable, Optional

log = logging.getLogger(__name__)

EXIT_TEARDOWN = 4
# Seconds a rank may spend in the final barrier plus the process-group teardown (and again in interpreter
# shutdown). The last collective of the work itself (the barrier before export) is not under it, so the
# main process's export and final validation images may take as long as they need.
TEARDOWN_TIMEOUT_S = float(os.environ.get("LLMDIFF_TEARDOWN_TIMEOUT_S", "120"))


class Watchdog:
    """Ends the process with `code` and `message` on stderr unless disarmed within `timeout_s`."""

    def __init__(self, timeout_s: float, message: str, code: int = EXIT_TEARDOWN):
        self.timeout_s, self.message, self.code = timeout_s, message, code
        self._timer: Optional[threading.Timer] = None

    def _fire(self) -> None:
        try:
            sys.stderr.write(f"error: {self.message}\n")
            sys.stderr.flush()
            sys.stdout.flush()
        finally:
            os._exit(self.code)  # a hung collective cannot be interrupted; only ending the process frees it

    def __enter__(self) -> "Watchdog":
        self._timer = threading.Timer(self.timeout_s, self._fire)
        self._timer.daemon = True
        self._timer.start()
        # Backstop for a hang that holds the GIL (the Python timer above then cannot run).
        faulthandler.dump_traceback_later(self.timeout_s + 30, exit=True)
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()
        faulthandler.cancel_dump_traceback_later()


def end_run(rank: int, world: int, barrier: Callable[[], None], destroy: Callable[[], None],
            timeout_s: float = TEARDOWN_TIMEOUT_S) -> None:
    """The last thing every rank does: the final barrier, then destroy the process group, both under a watchdog.

    `barrier` and `destroy` are the accelerator's (`wait_for_everyone`, `end_training`), so DDP, DeepSpeed
    and FSDP runs tear down their own way. Call it on all ranks or none: it is a collective.
    """
    if world <= 1:
        destroy()
        return
    tail = ("; this rank gives up so the job ends instead of hanging. The files written so far are complete; rerun "
            "with --resume latest if the adapter is missing.")
    try:
        with Watchdog(timeout_s, f"rank {rank} of {world}: the other ranks did not reach the end of the run within "
                                 f"{timeout_s:g} s (one crashed or hangs){tail}") as dog:
            barrier()
            dog.message = f"rank {rank} of {world}: the process-group teardown did not finish within {timeout_s:g} s{tail}"
            destroy()
    except Exception as err:  # noqa: BLE001 - a failed teardown must still end the process non-zero
        log.error("rank %d: the distributed teardown failed (%s: %s)", rank, type(err).__name__, err)
        raise
    # Native threads of the communication library can still block the interpreter's exit.
    faulthandler.dump_traceback_later(timeout_s, exit=True)
