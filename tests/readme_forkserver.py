"""A fork server for tests/test_readme.py: imports torch, Hydra and runner once, then runs each
`python -m <module> <args>` (or a Python block) it is sent in a forked child, so that the README's
commands cost their own work and not one interpreter start (~6 CPU seconds) each.

The child is a fresh process as far as the command can tell: its own working folder, environment,
``sys.argv`` and ``sys.path[0]`` (the working folder, as ``python -m`` and ``python -c`` set it),
its own process group (killed as a whole at the timeout), stdout and stderr to files, stdin empty.
Nothing of torch's runs in the server before the fork (imports only: no thread pool is started).

Protocol, one JSON object a line on stdin: {"module": "runner" | "runner.report" | null, "code":
str | null, "args": [...], "cwd": str, "env": {...}, "stdout": path, "stderr": path, "timeout":
seconds}; the answer is one line on stdout: {"rc": exit code} (-9 after a timeout).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time


def preload() -> None:
    """Import what the commands import (every runner module but runner.__main__, which
    `python -m runner` imports fresh as __main__) and draw one figure, so that matplotlib's font
    cache is read once here and not in every child."""
    import importlib
    import pkgutil

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import runner

    for module in pkgutil.walk_packages(runner.__path__, "runner."):
        if not module.name.endswith("__main__"):
            try:
                importlib.import_module(module.name)
            except ImportError:  # an optional extra that is not installed: the command imports it itself
                pass
    figure = plt.figure()
    figure.add_subplot().plot([0, 1])
    figure.savefig(os.devnull, format="png")
    plt.close(figure)


def child(request: dict) -> None:
    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, fd)
    code = 0
    try:
        sys.path[0] = os.getcwd()
        if request.get("code") is not None:
            sys.argv = ["-c"]
            exec(compile(request["code"], "<README.md>", "exec"), {"__name__": "__main__"})
        else:
            import runpy

            sys.argv = [request["module"], *request["args"]]
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    preload()
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            child(request)
        deadline = time.monotonic() + request["timeout"]
        status = None
        while status is None:
            done, raw = os.waitpid(pid, os.WNOHANG)
            if done:
                status = raw
            elif time.monotonic() > deadline:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                os.waitpid(pid, 0)
                status = -9
            else:
                time.sleep(0.05)
        rc = status if status == -9 else os.waitstatus_to_exitcode(status)
        try:
            os.killpg(pid, signal.SIGKILL)  # what the command left running in its group (a stray worker)
        except (ProcessLookupError, PermissionError):
            pass
        print(json.dumps({"rc": rc}), flush=True)


if __name__ == "__main__":
    serve()
