"""A process the harness spawns (devkit.processes.spawn: ComfyUI servers, trainer runs, weight builds) dies with
the process that spawned it, even when that one is SIGKILLed and runs no cleanup of its own."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from devkit.processes import REPO

PARENT = textwrap.dedent("""
    import signal, sys, time
    from devkit.processes import spawn
    child = spawn([sys.executable, "-c", "import time; time.sleep(3600)"], parent_death_signal=getattr(signal, sys.argv[1]))
    print(child.pid, flush=True)
    time.sleep(3600)
""")


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie waiting for init to reap it."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("death_signal", ["SIGKILL", "SIGTERM"])
def test_a_spawned_child_dies_when_its_parent_is_sigkilled(death_signal):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    parent = subprocess.Popen([sys.executable, "-c", PARENT, death_signal], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    child_pid = None
    try:
        child_pid = int(parent.stdout.readline())
        assert not _gone(child_pid) and psutil.Process(child_pid).ppid() == parent.pid
        parent.kill()  # SIGKILL: the parent runs nothing on its way out
        parent.wait(timeout=60)
        deadline = time.monotonic() + 60  # a generous bound on the kernel's signal, not a speed check
        while not _gone(child_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _gone(child_pid), f"the child {child_pid} outlived its SIGKILLed parent"
    finally:
        for pid in [parent.pid, child_pid]:
            if pid is not None:
                try:
                    os.killpg(pid, signal.SIGKILL)  # each leads its own group (spawn starts a session)
                except (ProcessLookupError, PermissionError):
                    pass
        parent.wait(timeout=60)
