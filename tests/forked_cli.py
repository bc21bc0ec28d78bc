"""
``python -m <module> <args>`` and ``python <script> <args>`` for the tests, without a new interpreter importing MONAI
each time.

A fresh interpreter spends about 12 s of CPU importing MONAI (and, through its optional imports, torchvision, scipy,
mlflow, ignite ...) on the CI's 2-core machines; a dozen command-line tests paid that a dozen times. Here each run
is a process forked from a multiprocessing *forkserver*: a fresh interpreter that imported MONAI's bundle runner and
this package once and ran no torch operation (so it holds no thread pool that a fork would break). The child then
does what the interpreter does: ``runpy`` runs the module or script as ``__main__`` with ``sys.argv`` set,
in the given working directory and environment, with stdout and stderr on files; an uncaught exception goes through
``sys.excepthook`` and exits 1, ``SystemExit`` gives its code. What differs from a new interpreter is only that the
imports happened before the environment was applied: variables read at import time (``OMP_NUM_THREADS``, import-time
warnings) keep the test worker's values. Tests about those run a real subprocess instead. Needs a platform with a
forkserver (Linux, macOS), as the CI has.
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["ForkedRun", "run_module", "run_ranks", "start_module", "start_script"]

#: imported once by the forkserver, before any run
PRELOAD = ["monai.bundle.__main__", "monai_wsss.bundle"]
_CONTEXT = None


def _context():
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(PRELOAD)
    return _CONTEXT


def _main(
    target: str, is_module: bool, args: list[str], env: dict[str, str], cwd: str, stdout: str, stderr: str
) -> None:
    """The child: ``python -m target *args`` (or ``python target *args``) as the interpreter runs it, then exit."""
    for fd, path in ((1, stdout), (2, stderr)):
        opened = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.argv = [target, *args]
    code = 0
    try:
        if is_module:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            sys.path.insert(0, str(Path(target).resolve().parent))  # as the interpreter does for a script
            runpy.run_path(target, run_name="__main__")
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            code = exit_.code or 0
        else:
            print(exit_.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - as the interpreter does: the hook prints it, the exit code is 1
        sys.excepthook(*sys.exc_info())
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class ForkedRun:
    """A started run: ``pid``, ``poll()``, ``wait(timeout)``, ``kill()``, ``returncode`` and the output so far."""

    def __init__(self, process, stdout: Path, stderr: Path, args: list[str]):
        self.process, self.stdout_path, self.stderr_path, self.args = process, stdout, stderr, args

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode

    def poll(self) -> int | None:
        return self.process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.process.exitcode

    def kill(self) -> None:
        self.process.kill()

    def output(self) -> tuple[str, str]:
        return self.stdout_path.read_text(errors="replace"), self.stderr_path.read_text(errors="replace")

    def first_line(self, timeout: float = 120) -> str:
        """The first complete line the child printed (stdout is a file: poll it), or "" if it exited first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""
            if "\n" in text:
                return text.split("\n", 1)[0] + "\n"
            if self.poll() is not None:
                return ""
            time.sleep(0.05)
        raise subprocess.TimeoutExpired(self.args, timeout)


def _start(target: str, is_module: bool, args: Sequence[str], env, cwd, output_dir) -> ForkedRun:
    out = Path(output_dir) if output_dir is not None else Path(tempfile.mkdtemp(prefix="forked_cli_"))
    out.mkdir(parents=True, exist_ok=True)
    stdout, stderr = out / "stdout.txt", out / "stderr.txt"
    process = _context().Process(
        target=_main,
        args=(target, is_module, [str(a) for a in args], dict(os.environ if env is None else env),
              str(cwd or os.getcwd()), str(stdout), str(stderr)),
    )
    process.start()
    return ForkedRun(process, stdout, stderr, [target, *args])


def start_module(
    module: str, args: Sequence[str], env: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
) -> ForkedRun:
    """
    Start ``python -m module *args`` in a forked child (see the module docstring).

    Args:
        module: the module run as ``__main__`` (``"monai.bundle"``).
        args: the command-line arguments after ``-m module``.
        env: the child's whole environment (default: this process's).
        cwd: its working directory (default: this process's).
        output_dir: where its ``stdout.txt`` / ``stderr.txt`` go (default: a new temporary folder, left in place:
            pass a folder the test removes, e.g. under ``tmp_path``).
    """
    return _start(module, True, args, env, cwd, output_dir)


def start_script(
    script: str | os.PathLike, args: Sequence[str], env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None, output_dir: str | os.PathLike | None = None,
) -> ForkedRun:
    """Start ``python script *args`` in a forked child; the arguments are those of :py:func:`start_module`."""
    return _start(str(script), False, args, env, cwd, output_dir)


def run_module(
    module: str, args: Sequence[str], env: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """
    ``subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True)``, forked (see the
    module docstring).

    Raises:
        subprocess.TimeoutExpired: the run took longer than ``timeout`` seconds (it is killed first).
    """
    with tempfile.TemporaryDirectory(prefix="forked_cli_") as out:
        run = start_module(module, args, env=env, cwd=cwd, output_dir=out)
        try:
            code = run.wait(timeout)
        except subprocess.TimeoutExpired:
            run.kill()
            run.wait(30)
            raise
        stdout, stderr = run.output()
    return subprocess.CompletedProcess(run.args, code, stdout, stderr)


def run_ranks(
    module: str, args: Sequence[str], nproc: int = 2, env: Mapping[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """
    ``torchrun --standalone --nproc_per_node=<nproc> -m module *args`` on one machine: ``nproc`` forked runs, each
    given the environment torchrun gives a rank (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT`` on a free local port), as MONAI's own distributed tests start their ranks.

    Returns:
        the ranks' stdout and stderr, concatenated in rank order; the return code is the first non-zero one.

    Raises:
        subprocess.TimeoutExpired: a rank was still running after ``timeout`` seconds (all are killed first; a rank
            waiting in a collective for a failed one ends this way).
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base = dict(os.environ if env is None else env)
    with tempfile.TemporaryDirectory(prefix="forked_cli_") as out:
        runs = []
        for rank in range(nproc):
            rank_env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0",
                        "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port)}
            runs.append(start_module(module, args, env=rank_env, output_dir=Path(out) / f"rank{rank}"))
        deadline = time.monotonic() + timeout
        try:
            codes = [run.wait(max(0.0, deadline - time.monotonic())) for run in runs]
        except subprocess.TimeoutExpired:
            for run in runs:
                run.kill()
                run.process.join(30)
            raise
        outputs = [run.output() for run in runs]
    code = next((c for c in codes if c != 0), 0)
    stdout, stderr = ("".join(o[k] for o in outputs) for k in (0, 1))
    return subprocess.CompletedProcess([module, *args], code, stdout, stderr)
