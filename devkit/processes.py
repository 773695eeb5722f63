"""Subprocesses the test harness starts, tied to the process that started them.

    spawn(cmd, *, parent_death_signal=SIGKILL, **popen_kwargs) -> Popen
        Popen in a session of its own (so its whole group can be killed) whose child the kernel signals when
        the parent dies (Linux PR_SET_PDEATHSIG): a pytest killed with SIGTERM or SIGKILL, which runs neither
        finalizers nor atexit handlers, leaves no server or trainer behind.
    kill_tree(pid)                      SIGKILL the group of `pid` and the group of every descendant
    run_in_own_group(cmd, env, timeout) -> CompletedProcess   spawn(), wait, and on timeout kill_tree()

Caveat of PR_SET_PDEATHSIG: the kernel sends the signal when the *thread* that forked the child exits, not
the process. Call spawn() from a thread that lives as long as the child must (the main thread, as pytest's
fixtures do); a child spawned from a short-lived worker thread is signalled when that thread ends.
Off Linux the tie is skipped; the group kill on stop or timeout still applies.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_PR_SET_PDEATHSIG = 1


def _tie_to_parent(sig: int):
    """A preexec_fn: ask the kernel to send `sig` to the child when its parent dies; if the parent is already gone
    (it died between fork and prctl, so the kernel will never signal), die now. libc is looked up here, in the
    parent: loading a library in a child forked from a threaded process can deadlock."""
    try:
        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None  # no glibc: the group kill on stop/timeout is all there is
    parent = os.getpid()

    def tie() -> None:
        prctl(_PR_SET_PDEATHSIG, int(sig))
        if os.getppid() != parent:
            os._exit(1)
    return tie


def spawn(cmd: list[str], *, parent_death_signal: int = signal.SIGKILL, **popen_kwargs) -> subprocess.Popen:
    """subprocess.Popen(cmd, **popen_kwargs) in a new session, signalled with `parent_death_signal` when this
    process dies. Use SIGTERM for a launcher (torchrun) that must pass the end on to workers in sessions of their own."""
    preexec = _tie_to_parent(parent_death_signal) if sys.platform.startswith("linux") else None
    return subprocess.Popen(cmd, start_new_session=True, preexec_fn=preexec, **popen_kwargs)


def kill_tree(pid: int) -> None:
    """SIGKILL the process group of `pid` and the group of every descendant: torchrun starts each worker in a
    session of its own, so killing the launcher's group alone would leave the ranks running."""
    import psutil  # a dependency of accelerate

    try:
        groups = {os.getpgid(p.pid) for p in psutil.Process(pid).children(recursive=True)}
    except (psutil.NoSuchProcess, ProcessLookupError):
        groups = set()
    for group in [pid, *groups]:  # the launcher leads its own group (spawn starts a session)
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_in_own_group(cmd: list[str], env: dict, timeout: float | None,
                     parent_death_signal: int = signal.SIGTERM) -> subprocess.CompletedProcess:
    """Run `cmd` (cwd: the repository) in a session of its own; on timeout kill it with all its descendants
    (kill_tree), so no rank can outlive the test. If this process dies, the child gets `parent_death_signal`
    (SIGTERM by default, which torchrun passes on to its ranks)."""
    with spawn(cmd, parent_death_signal=parent_death_signal, cwd=REPO, env=env, stdout=subprocess.PIPE,
               stderr=subprocess.PIPE, text=True) as popen:
        try:
            stdout, stderr = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(popen.pid)
            stdout, stderr = popen.communicate()
            raise subprocess.TimeoutExpired(cmd, timeout, output=stdout, stderr=stderr) from None
        finally:
            if popen.poll() is None:  # an exception other than the timeout (e.g. KeyboardInterrupt)
                kill_tree(popen.pid)
    proc = subprocess.CompletedProcess(cmd, popen.returncode, stdout, stderr)
    proc.output = proc.stdout + proc.stderr  # one place to search for messages
    return proc
