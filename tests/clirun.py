"""Run the real command line (exit codes, stdout and stderr as a user sees them).

By default in this process: `unmemorize.cli.main()` with `sys.argv`, stdout and stderr swapped, so a test does
not pay the ~4 s of importing torch, transformers and scikit-learn again for every command (half of the
suite's time when each ran in a subprocess). An `env` that only the running process could not take (anything
but thread counts and terminal width: the hub's endpoint and caches are read when huggingface_hub is first
imported) runs in a subprocess, as does every call under UNMEMORIZE_TEST_SUBPROCESS=1; the tests that need a
separate process (signals, launchers) start their own.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import traceback
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO

IN_PROCESS_ENV = {"OMP_NUM_THREADS", "MKL_NUM_THREADS", "COLUMNS"}


def run_cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    args, env = [str(arg) for arg in args], env or {}
    if os.environ.get("UNMEMORIZE_TEST_SUBPROCESS") == "1" or not set(env) <= IN_PROCESS_ENV:
        return subprocess.run([sys.executable, "-m", "unmemorize", *args], capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, **env})
    return run_in_process(args, env)


def run_in_process(args: list[str], env: dict) -> subprocess.CompletedProcess:
    """`python -m unmemorize ARGS` in this process: exit status from SystemExit, 1 and the traceback on stderr
    for any other exception (as the interpreter would); the environment and thread count restored after."""
    import torch

    from unmemorize import cli
    from unmemorize.io import notes

    notes._said.clear()  # a new process has said nothing yet
    out, err = StringIO(), StringIO()
    saved_env, saved_argv, saved_threads = {key: os.environ.get(key) for key in env}, sys.argv, torch.get_num_threads()
    os.environ.update(env)
    if "OMP_NUM_THREADS" in env:
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    sys.argv = ["unmemorize", *args]
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                cli.main()
                code = 0
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
                if isinstance(stop.code, str):
                    print(stop.code, file=sys.stderr)
            except Exception:  # an internal error, reported as the interpreter would
                traceback.print_exc()
                code = 1
    finally:
        sys.argv = saved_argv
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        torch.set_num_threads(saved_threads)
        gc.collect()
    return subprocess.CompletedProcess(["unmemorize", *args], code, out.getvalue(), err.getvalue())


def assert_refused(result: subprocess.CompletedProcess, message: str, *unwritten) -> None:
    """Bad input: exit 2, one line on stderr that says `message`, and none of the `unwritten` paths exists."""
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not any(path.exists() for path in unwritten)
