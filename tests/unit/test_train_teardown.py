"""The end of a multi-process run never hangs (training/distributed.py), and a test never leaves a rank behind.

Two real gloo processes (torch.distributed over a file store), not a mock: one rank that never reaches the
end makes the other exit non-zero with a message, instead of both waiting forever.
"""
import os
import subprocess
import sys
import textwrap

import psutil
import pytest

from support.train_runs import REPO, run_in_own_group

pytestmark = pytest.mark.slow  # real processes: a few seconds each

RANK = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from training.distributed import end_run
    rank, store, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    value = torch.ones(1)
    dist.all_reduce(value)  # the work itself: both ranks are connected and agree
    print(f"rank {rank} worked: {value.item():g}", flush=True)
    if mode == "stuck" and rank == 1:
        sys.stdin.read()  # never reaches the end (a hung or lost rank); stdin stays open
    end_run(rank, 2, dist.barrier, dist.destroy_process_group, timeout_s=float(sys.argv[4]))
    print(f"rank {rank} finished", flush=True)
""")

LAUNCH = textwrap.dedent("""
    import subprocess, sys
    store, mode, timeout, script = sys.argv[1:5]
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r), store, mode, timeout], stdin=subprocess.PIPE)
             for r in range(2)]
    rank0 = procs[0].wait()
    print(f"rank 0 exit code {rank0}", flush=True)
    if mode != "stuck":
        print(f"rank 1 exit code {procs[1].wait()}", flush=True)
""")


def launch(tmp_path, mode: str, timeout_s: float):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    # The outer limit only stops a broken test from hanging the suite; the rank's own watchdog is far shorter.
    return run_in_own_group([sys.executable, "-c", LAUNCH, str(tmp_path / "store"), mode, str(timeout_s), RANK],
                            env, timeout=240)


def test_both_ranks_finish_and_exit_zero(tmp_path):
    proc = launch(tmp_path, "normal", 60)
    assert "rank 0 exit code 0" in proc.output and "rank 1 exit code 0" in proc.output, proc.output
    assert proc.output.count("finished") == 2


def test_a_rank_whose_peer_never_arrives_exits_non_zero_with_a_message(tmp_path):
    proc = launch(tmp_path, "stuck", 3)
    assert "rank 0 worked: 2" in proc.output and "rank 1 worked: 2" in proc.output, proc.output
    assert "rank 0 exit code 4" in proc.output, proc.output
    assert "rank 0 of 2: the other ranks did not reach the end of the run within 3 s" in proc.output
    assert "rank 0 finished" not in proc.output


def test_a_timed_out_run_leaves_no_process_behind(tmp_path):
    """Like torchrun, the launcher starts its worker in a session of its own; the timeout must still kill it."""
    pid_file = tmp_path / "worker.pid"
    launcher = textwrap.dedent(f"""
        import subprocess, sys, time
        worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"], start_new_session=True)
        open({str(pid_file)!r}, "w").write(str(worker.pid))
        time.sleep(3600)
    """)
    with pytest.raises(subprocess.TimeoutExpired):
        run_in_own_group([sys.executable, "-c", launcher], dict(os.environ), timeout=20)
    try:
        worker = psutil.Process(int(pid_file.read_text()))  # the file is written long before the timeout
    except psutil.NoSuchProcess:
        return  # killed and already reaped
    try:
        worker.wait(timeout=60)
    except psutil.TimeoutExpired:
        worker.kill()
        pytest.fail("the worker outlived the timed-out launcher")
