"""Local TCP ports for the tests that start several processes. A port that is free now may be taken
by another program before the processes bind it, so a run that failed for that reason is retried on
another port (as tests/test_train.py's run_torchrun does), never skipped.

    failure = retry_on_busy_port(lambda port: ...)            # the text of a failure, "" if none
    outputs = run_ranks(command, env)                         # [(returncode, output)] of ranks 0, 1
"""
import socket
import subprocess

import pytest

BUSY = ("address already in use", "eaddrinuse", "cannot assign requested address")


def free_port():
    """A local TCP port that is free now (bound to port 0, then released)."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", 0))
        except OSError as e:
            pytest.fail(f"cannot bind a local TCP port for the gloo processes ({e}); these tests need one")
        return s.getsockname()[1]


def retry_on_busy_port(run, attempts=3):
    """run(port) on a fresh port; run returns the text of its failure ("" when it succeeded). A
    failure that says the port was taken is retried on another port; any other is returned."""
    for _ in range(attempts):
        failure = run(free_port())
        if not any(s in failure.lower() for s in BUSY):
            return failure
    pytest.fail(f"the processes could not bind a local port in {attempts} attempts: {failure[-500:]}")


def run_ranks(command, env, world_size=2, cwd=None, timeout=120):
    """`command` as the processes of ranks 0..world_size-1, with the environment torchrun gives its
    workers, on a free port (retried when taken) -> [(returncode, stdout and stderr)] by rank."""
    results = []

    def attempt(port):
        base = {**env, "WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        ranks = [subprocess.Popen(command, cwd=cwd, env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(world_size)]
        try:
            first = ranks[0].communicate(timeout=timeout)[0]
            if ranks[0].returncode:  # the others would wait for rank 0's store until their timeout
                for rank in ranks[1:]:
                    rank.kill()
            outputs = [first] + [rank.communicate(timeout=timeout)[0] for rank in ranks[1:]]
            results[:] = [(rank.returncode, output) for rank, output in zip(ranks, outputs)]
        finally:
            for rank in ranks:
                if rank.poll() is None:
                    rank.kill()
        return first if ranks[0].returncode else ""
    retry_on_busy_port(attempt)
    return results
