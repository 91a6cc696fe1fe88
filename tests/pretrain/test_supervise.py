"""The ``medfm pretrain`` supervisor (pretrain/supervise.py) on CPU, with fake training processes: an NCCL watchdog
abort (torch's own lines, then SIGABRT) becomes exit 3, a message and a ``distributed_failure`` event; every other
exit passes through; signals reach the training process. What only a GPU shows: torch writing these lines itself."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medfm.pretrain.errors import EXIT_DISTRIBUTED, EXIT_REQUEUE
from medfm.pretrain.supervise import (
    TAIL_LINES,
    StderrScanner,
    record_exit,
    report_run_dir,
    run_dir_from_args,
    should_supervise,
    supervise,
)

REPO = Path(__file__).resolve().parents[2]

# What torch 2.5-2.9 write when a peer stops answering (published logs; the texts of ProcessGroupNCCL.cpp).
WATCHDOG = [
    "[rank0]:[E709 17:05:38.162555850 ProcessGroupNCCL.cpp:632] [Rank 0] Watchdog caught collective operation "
    "timeout: WorkNCCL(SeqNum=20585, OpType=ALLREDUCE, NumelIn=1259621, NumelOut=1259621, Timeout(ms)=600000) ran "
    "for 600000 milliseconds before timing out.",
    "[rank0]:[E709 17:05:38.162814866 ProcessGroupNCCL.cpp:2271] [PG ID 0 PG GUID 0(default_pg) Rank 0]  failure "
    "detected by watchdog at work sequence id: 20585 PG status: last enqueued work: 20589, last completed work: 20584",
    "[rank0]:[E709 17:05:38.162832798 ProcessGroupNCCL.cpp:670] Stack trace of the failed collective not found, "
    "potentially because FlightRecorder is disabled. You can enable it by setting TORCH_NCCL_TRACE_BUFFER_SIZE to a "
    "non-zero value.",
    "[rank0]:[E709 17:05:38.163000000 ProcessGroupNCCL.cpp:684] [Rank 0] Some NCCL operations have failed or timed "
    "out. Due to the asynchronous nature of CUDA kernels, subsequent GPU operations might run on corrupted/incomplete "
    "data.",
    "[rank0]:[E709 17:05:38.163100000 ProcessGroupNCCL.cpp:698] [Rank 0] To avoid data inconsistency, we are taking "
    "the entire process down.",
    "terminate called after throwing an instance of 'c10::DistBackendError'",
]
# A peer that exited: NCCL reports ncclRemoteError before any timeout (torch >= 2.4's checkAndSetException).
REMOTE_ERROR = [
    "[rank0]:[E1118 20:32:23.955028747 ProcessGroupNCCL.cpp:1595] [PG ID 0 PG GUID 0(default_pg) Rank 0] Collective "
    "WorkNCCL(SeqNum=12, OpType=BROADCAST, NumelIn=80, NumelOut=80, Timeout(ms)=600000) raised the following async "
    "exception: NCCL error: remote process exited or there was a network error, NCCL version 2.21.5",
    "ncclRemoteError: A call failed possibly due to a network error or a remote process exiting prematurely.",
    "node001:1234:1300 [0] NCCL WARN socketProgress: Connection closed by remote peer node002<43120>",
]

# The fake training process: `python -c CHILD MODE [ARGS...]`.
CHILD = r"""
import json, os, resource, signal, sys, time
from pathlib import Path
from medfm.pretrain.supervise import report_run_dir
mode, args = sys.argv[1], sys.argv[2:]
if os.environ.get("REPORT_RUN_DIR"):
    report_run_dir(os.environ["REPORT_RUN_DIR"])
if mode == "abort":  # torch's lines on stderr, then the watchdog's std::abort
    if os.environ.get("OWN_EVENT"):  # medfm caught the error first and wrote its event, then was aborted
        with open(Path(os.environ["REPORT_RUN_DIR"]) / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"time": time.time(), "event": "distributed_failure", "message": "own"}) + "\n")
    sys.stderr.write(os.environ["LINES"])
    sys.stderr.flush()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.abort()
elif mode == "exit":
    sys.stdout.buffer.write(b"stdout\x00as is\xff")  # no newline, not UTF-8
    sys.stdout.flush()
    sys.exit(int(args[0]))
elif mode == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
elif mode == "trap":  # a training process that checkpoints on SIGUSR1 and exits 75
    received = []
    signal.signal(signal.SIGUSR1, lambda s, f: received.append(s))
    print("ready", flush=True)
    deadline = time.monotonic() + 30
    while not received and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # a second delivery would show here
    print(f"received {len(received)}", flush=True)
    sys.exit(75 if received else 1)
elif mode == "linger":  # leaves a process behind that holds stderr open
    import subprocess
    Path(args[0]).write_text(str(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]).pid))
elif mode == "args":
    print(" ".join(args), os.environ.get("MEDFM_SUPERVISED"), os.environ.get("MEDFM_EXIT_RECORD_DIR"), flush=True)
"""


def child(mode: str) -> list[str]:
    return [sys.executable, "-c", CHILD, mode]


def environ(tmp_path: Path, rank: int = 0, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDFM_")}
    return {**env, "PYTHONPATH": str(REPO), "RANK": str(rank), "WORLD_SIZE": "2", **extra}


def events(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_nccl_watchdog_abort_becomes_exit_3_with_message_and_event(tmp_path: Path, capfd):
    run = tmp_path / "run"
    env = environ(tmp_path, REPORT_RUN_DIR=str(run), LINES="".join(f"{line}\n" for line in WATCHDOG))
    code = supervise(["--config", "c.yaml"], command=child("abort"), environ=env)
    err = capfd.readouterr().err
    assert code == EXIT_DISTRIBUTED
    assert WATCHDOG[0] in err, "the child's stderr passes through"
    message = err.strip().splitlines()[-1]
    assert message.startswith("medfm pretrain: distributed failure on rank 0: collective ALLREDUCE ")
    assert "(SeqNum=20585, timeout 600 s) did not complete within its timeout" in message
    assert f"the last checkpoint in {run.resolve()}" in message
    [event] = events(run)
    assert event["event"] == "distributed_failure" and event["message"] == message.removeprefix("medfm pretrain: ")
    assert (event["collective"], event["seq"], event["timeout_ms"], event["rank"]) == ("ALLREDUCE", 20585, 600000, 0)
    assert event["timed_out"] is True


def test_remote_error_names_the_collective_and_nccl_warning(tmp_path: Path, capfd):
    run = tmp_path / "run"
    env = environ(tmp_path, REPORT_RUN_DIR=str(run), LINES="".join(f"{line}\n" for line in REMOTE_ERROR))
    assert supervise([], command=child("abort"), environ=env) == EXIT_DISTRIBUTED
    message = capfd.readouterr().err.strip().splitlines()[-1]
    assert "on rank 0: collective BROADCAST (SeqNum=12, timeout 600 s) failed and the NCCL watchdog" in message
    assert "Connection closed by remote peer node002<43120>" in message
    assert events(run)[0]["timed_out"] is False


def test_only_rank_0_writes_the_event(tmp_path: Path, capfd):
    run = tmp_path / "run"
    env = environ(tmp_path, rank=1, REPORT_RUN_DIR=str(run), LINES=WATCHDOG[0].replace("rank0", "rank1") + "\n")
    assert supervise([], command=child("abort"), environ=env) == EXIT_DISTRIBUTED
    assert "distributed failure on rank 1" in capfd.readouterr().err
    assert events(run) == []


def test_an_event_the_child_wrote_is_not_repeated(tmp_path: Path):
    run = tmp_path / "run"
    run.mkdir()
    env = environ(tmp_path, REPORT_RUN_DIR=str(run), OWN_EVENT="1", LINES=WATCHDOG[0] + "\n")
    assert supervise([], command=child("abort"), environ=env) == EXIT_DISTRIBUTED
    assert [e["message"] for e in events(run)] == ["own"]


def test_shell_reported_134_with_the_signature_is_exit_3(tmp_path: Path):
    command = ["bash", "-c", f"echo '{WATCHDOG[0]}' >&2; exit 134"]
    assert supervise(["train.run_dir=" + str(tmp_path / "run")], command=command, environ=environ(tmp_path)) == 3
    assert events(tmp_path / "run")[0]["seq"] == 20585  # the run directory from the command line


def test_abort_without_nccl_signature_passes_through(tmp_path: Path, capfd):
    env = environ(tmp_path, LINES="Fatal Python error: Aborted\n[W ProcessGroupNCCL.cpp:1168] Warning: a warning\n")
    assert supervise([], command=child("abort"), environ=env) == 128 + signal.SIGABRT
    assert "medfm pretrain:" not in capfd.readouterr().err


@pytest.mark.parametrize("code", [EXIT_REQUEUE, 0, 1, 2])
def test_exit_codes_and_stdout_pass_through_unchanged(tmp_path: Path, capfd, code: int):
    assert supervise([str(code)], command=[*child("exit")], environ=environ(tmp_path)) == code
    assert capfd.readouterr().out == "stdout\x00as is\ufffd"  # the bytes the child wrote (capfd decodes them)


def test_killed_child_gives_128_plus_signal(tmp_path: Path):
    assert supervise([], command=child("kill"), environ=environ(tmp_path)) == 128 + signal.SIGKILL


def test_a_process_left_holding_stderr_does_not_keep_the_supervisor(tmp_path: Path):
    start, pid_file = time.monotonic(), tmp_path / "pid"
    try:
        assert supervise([str(pid_file)], command=child("linger"), environ=environ(tmp_path)) == 0
        assert time.monotonic() - start < 20
    finally:
        os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_sigusr1_to_the_supervisor_reaches_the_child_once(tmp_path: Path):
    """`medfm pretrain` as Slurm starts it: SIGUSR1 to the task process -> the training process checkpoints, 75."""
    records = tmp_path / "exits"
    env = environ(
        tmp_path,
        MEDFM_SUPERVISE="1",
        MEDFM_SUPERVISE_CHILD=f"{sys.executable} -c {shlex.quote(CHILD)} trap",
        MEDFM_EXIT_RECORD_DIR=str(records),
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "medfm.cli", "pretrain", "--config", "c.yaml"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline() == "ready\n", process.stderr.read()
    process.send_signal(signal.SIGUSR1)
    assert process.wait(timeout=30) == EXIT_REQUEUE, process.stderr.read()
    assert process.stdout.read() == "received 1\n"
    assert (records / "rank-0").read_text() == "75\n"


def test_medfm_pretrain_passes_its_arguments_and_marks_the_child(tmp_path: Path):
    env = environ(
        tmp_path,
        MEDFM_SUPERVISE="1",
        MEDFM_SUPERVISE_CHILD=f"{sys.executable} -c {shlex.quote(CHILD)} args",
        MEDFM_EXIT_RECORD_DIR=str(tmp_path / "exits"),
    )
    out = subprocess.run(
        [sys.executable, "-m", "medfm.cli", "pretrain", "--config", "c.yaml", "a.b=1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "--config c.yaml a.b=1 1 None\n"  # MEDFM_SUPERVISED=1; the child records nothing itself


def test_supervisor_imports_no_torch():
    code = "import sys, medfm.cli, medfm.pretrain.supervise; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout == "False\n"


def test_when_to_supervise():
    gpu, cpu = (lambda: True), (lambda: False)
    assert should_supervise({"WORLD_SIZE": "8"}, gpu)
    assert not should_supervise({"WORLD_SIZE": "8"}, cpu)  # gloo raises in Python: medfm handles it itself
    assert not should_supervise({"WORLD_SIZE": "1"}, gpu) and not should_supervise({}, gpu)
    assert not should_supervise({"WORLD_SIZE": "8", "MEDFM_SUPERVISE": "0"}, gpu)  # opt-out
    assert should_supervise({"MEDFM_SUPERVISE": "1"}, cpu)  # forced (slurm/pretrain.sbatch)
    assert not should_supervise({"MEDFM_SUPERVISE": "1", "MEDFM_SUPERVISED": "1"}, gpu)  # the child itself


def test_scanner_keeps_a_bounded_tail():
    scanner = StderrScanner()
    scanner.feed(b"".join(b"line %d\r\n" % i for i in range(10 * TAIL_LINES)))
    scanner.feed(b"x" * 1_000_000)  # a progress bar that never ends its line
    scanner.feed(WATCHDOG[0].encode()[:50])
    scanner.feed(WATCHDOG[0].encode()[50:] + b"\n")
    scanner.close()
    assert len(scanner.tail) == TAIL_LINES and max(map(len, scanner.tail)) <= 4000
    assert scanner.failure().seq == 20585


def test_run_dir_from_the_command_line(tmp_path: Path):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  run_dir: runs/from_config\n")
    assert run_dir_from_args(["--config", str(config)]) == "runs/from_config"
    assert run_dir_from_args(["--config", str(config), "train.run_dir=a", "train.run_dir=b"]) == "b"
    assert run_dir_from_args(["--config", str(tmp_path / "missing.yaml")]) is None
    report_run_dir("x", environ={})  # without a supervisor: nothing to do


def test_record_exit(tmp_path: Path):
    record_exit(75, {"MEDFM_EXIT_RECORD_DIR": str(tmp_path / "d"), "RANK": "3"})
    record_exit(0, {})  # not asked: nothing
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["rank-3"]
    assert (tmp_path / "d" / "rank-3").read_text() == "75\n"


def test_signal_before_the_child_starts_is_forwarded(tmp_path: Path, monkeypatch):
    """A stop signal that lands while the supervisor is still starting the child is delivered once it runs."""
    original = subprocess.Popen

    def slow_start(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGUSR1)  # arrives before the child exists
        time.sleep(0.05)
        return original(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", slow_start)
    code = supervise([], command=[sys.executable, "-c", "import time; time.sleep(30)"], environ=environ(tmp_path))
    assert code == 128 + signal.SIGUSR1  # Python's default action for SIGUSR1: the child ended by it


# A real watchdog abort on one GPU: a 1-process NCCL group whose all-reduce waits on the GPU behind a long kernel,
# with a 3 s collective timeout; the host then blocks in .item() and the watchdog takes the process down.
NCCL_HANG = """
import datetime, socket, torch, torch.distributed as dist
port = socket.socket(); port.bind(("127.0.0.1", 0)); port = port.getsockname()[1]
dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                        timeout=datetime.timedelta(seconds=3))
x = torch.ones(1, device="cuda")
dist.all_reduce(x)
torch.cuda.synchronize()
torch.cuda._sleep(2**40)  # minutes of spinning on the current stream
dist.all_reduce(x)
x.item()
"""


def test_real_nccl_watchdog_abort_on_a_gpu(tmp_path: Path, capfd):
    """Only on a CUDA machine: torch's own watchdog text and SIGABRT, turned into exit 3."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available() or not torch.distributed.is_nccl_available():
        pytest.skip("needs a CUDA GPU and NCCL")
    env = environ(
        tmp_path,
        TORCH_NCCL_ASYNC_ERROR_HANDLING="3",
        TORCH_NCCL_DUMP_ON_TIMEOUT="0",
        TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC="1000",
        WORLD_SIZE="1",
    )
    start = time.monotonic()
    code = supervise(["train.run_dir=" + str(tmp_path / "run")], command=[sys.executable, "-c", NCCL_HANG], environ=env)
    err = capfd.readouterr().err
    assert code == EXIT_DISTRIBUTED, err[-3000:]
    assert "collective ALLREDUCE (SeqNum=" in err and "timeout 3 s" in err, err[-3000:]
    assert events(tmp_path / "run")[0]["collective"] == "ALLREDUCE"
    print(f"watchdog abort after {time.monotonic() - start:.1f} s")  # the timing only a GPU shows
