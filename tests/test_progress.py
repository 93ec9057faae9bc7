"""The progress line on an 80-column terminal (a pty): it fits, its numbers are whole, elapsed
counts from the start, the loss reads "—" only until the first reading, and Ctrl-C leaves its
last line once (runner/engine/progress.py)."""
from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import sys
import termios
import time

import pytest

from runner.engine.progress import FittedLine, ProgressDisplay, predictions_line

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
TOTAL = 48000  # 4800 samples / batch 16 x 160 epochs: a five-digit total, the one that was cut at 80 columns
FRAME = re.compile(r"(\d+)/(\d+) loss (\S+)(?: (\S+) samples/s)?(?: (\d+:\d\d:\d\d))?(?: ETA (\S+))?")


def terminal_run(overrides: list[str], columns: int, interrupt_when: re.Pattern) -> tuple[int, str, list[float]]:
    """Run ``runner.run(overrides)`` in a forked child whose terminal is a pty of ``columns``;
    Ctrl-C (the byte a terminal sends) once the output matches ``interrupt_when``. Returns the
    exit code, the raw output and when (parent's clock) each chunk of it arrived."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: this test process's imports, so no start-up of its own
        code = 99
        try:
            import torch

            torch.set_num_threads(1)  # OpenMP's pool is not the parent's after a fork
            os.environ.update(COLUMNS=str(columns), LINES="24", TERM="xterm-256color")
            sys.stdout = open(1, "w", buffering=1, closefd=False)
            sys.stderr = open(2, "w", buffering=1, closefd=False)
            from runner import run

            code = run(overrides)["exit_code"]
        except BaseException as e:  # noqa: BLE001 - any failure: said on the terminal, exit 99
            print(f"child failed: {type(e).__name__}: {e}", flush=True)
        finally:
            os._exit(code)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    output, arrivals, sent, deadline = "", [], False, time.time() + 120
    while time.time() < deadline:
        if select.select([fd], [], [], 0.1)[0]:
            try:
                chunk = os.read(fd, 65536).decode(errors="replace")
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
            arrivals.append((time.monotonic(), len(output)))
            if not sent and interrupt_when.search(ANSI.sub("", output)):
                os.write(fd, b"\x03")  # what the terminal sends for Ctrl-C: SIGINT, and an echoed ^C
                sent = True
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), output, arrivals


def screen(output: str, columns: int) -> list[str]:
    """The lines a terminal shows at the end: CR, LF, erase-line, cursor-up and wrapping at the width."""
    lines, row, col = [[]], 0, 0
    for token in re.findall(r"\x1b\[[0-9;?]*[A-Za-z]|\r|\n|[^\x1b\r\n]", output):
        if token == "\r":
            col = 0
        elif token == "\n":
            row, col = row + 1, 0
        elif token == "\x1b[2K":
            lines[row] = []
        elif token.startswith("\x1b[") and token.endswith("A"):
            row = max(0, row - int(token[2:-1] or 1))
        elif not token.startswith("\x1b"):
            if col == columns:  # past the last column: the terminal wraps
                row, col = row + 1, 0
            while len(lines) <= row:
                lines.append([])
            lines[row][col:col + 1] = [token]
            col += 1
        while len(lines) <= row:
            lines.append([])
    return ["".join(line).rstrip() for line in lines]


def test_the_line_fits_80_columns_counts_whole_numbers_and_ctrl_c_leaves_it_once(tmp_path):
    overrides = ["experiment=regression", "device=cpu", "trainer.progress=rich", "dataset.n_train=4800",
                 "trainer.max_epochs=160", "trainer.log_every_n_steps=200", "trainer.val_every_n_steps=100000",
                 f"output_root={tmp_path}"]
    started = time.monotonic()
    code, output, arrivals = terminal_run(overrides, 80, re.compile(r"\d+/48000 loss \d[^\r\n]*\r"))
    assert code == 130, output[-2000:]  # interrupted by the Ctrl-C, checkpoint written
    frames = [ANSI.sub("", f).replace("^C", "") for f in re.split(r"[\r\n]", output)]  # without the echo
    bars = [(f, FRAME.search(f)) for f in frames if FRAME.search(f)]
    assert len(bars) >= 3, output[-2000:]
    assert all(len(f) <= 78 for f, _ in bars), max((f for f, _ in bars), key=len)  # 80 columns, two left for the echoed ^C
    # Other lines wrap at 80, but those that end with the run folder's path, printed whole so that
    # it can be copied: "run folder: <path>" and the interruption's "... continue with resume=<path>".
    whole_path = [f for f in frames if f.startswith("run folder: ") or "continue with resume=" in f]
    assert all(f.endswith(str(tmp_path)) or str(tmp_path) in f for f in whole_path)
    assert all(len(f) <= 80 for f in frames if f not in whole_path), max(frames, key=len)
    assert "…" not in output
    assert {int(m.group(2)) for _, m in bars} == {TOTAL}  # the total whole in every frame
    losses = [m.group(3) for _, m in bars]
    first_reading = next(i for i, loss in enumerate(losses) if loss != "—")
    assert all(loss == "—" for loss in losses[:first_reading])
    assert all(re.fullmatch(r"\d+\.\d{4}", loss) for loss in losses[first_reading:])
    elapsed = [sum(int(x) * 60**i for i, x in enumerate(reversed(m.group(5).split(":")))) for _, m in bars if m.group(5)]
    assert elapsed == sorted(elapsed) and elapsed[-1] <= time.monotonic() - started
    training = arrivals[-1][0] - arrivals[0][0]  # at least the frames' own span, as the parent saw it
    assert elapsed[-1] >= elapsed[0] + int(training) - 2
    shown = screen(output, 80)
    last = [line for line in shown if FRAME.search(line)]
    assert len(last) == 1, "\n".join(shown)  # the last frame once, not again above the redraw


def test_fields_go_whole_where_the_line_is_narrow():
    display = ProgressDisplay(48000, "samples", mode="none")
    display.step, display.epoch = 5377, 1
    display.update(5377, 1, 12.34567, 123456.0)
    for width in (118, 78, 58, 33, 8):
        text = FittedLine(display).line(width).plain
        assert len(text) <= max(width, len("5377/48000")) and "5377/48000" in text
        for field in re.findall(r"loss \S+|\S+ samples/s|ETA \S+", text):
            assert field in ("loss 12.3457", "123,456 samples/s") or field.startswith("ETA ")


def test_the_end_of_a_prediction_run_names_the_file_rows_and_score():
    line = predictions_line({"path": "/r/predictions.csv", "rows": 12345, "metric": {"accuracy": 0.93456}})
    assert line == "predictions: /r/predictions.csv (12,345 rows; accuracy 0.9346 over their labels)"
    assert predictions_line({"path": "/r/p.csv", "rows": 7, "metric": {}}) == "predictions: /r/p.csv (7 rows)"
