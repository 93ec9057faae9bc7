"""The run folder's lock (runner/runs/files.py hold_folder): one process at a time, and a run
that lets go leaves no ``.lock`` behind, without letting two processes hold the folder when one
opens the file just as the other removes it."""
from __future__ import annotations

import fcntl

from runner.runs.files import folder_in_use, hold_folder


def test_a_run_that_lets_go_removes_its_lock_file(tmp_path):
    from runner import run

    result = run(["experiment=regression", "device=cpu", "trainer.progress=none", "trainer.max_epochs=1",
                  f"output_root={tmp_path}"])
    assert result["exit_code"] == 0 and (tmp_path / "runs").is_dir()
    assert not list((tmp_path / "runs").glob("*/.lock"))


def test_a_lock_file_removed_between_open_and_lock_is_not_taken_for_the_folder(tmp_path, monkeypatch):
    """The other holder lets go (removes .lock, then unlocks) after we opened the file and before
    we lock it: the lock we then get is on a removed file, so we start again on a new one."""
    (tmp_path / ".lock").write_text("123\n")
    real, calls = fcntl.flock, []

    def lets_go_first(fd, operation):
        if not calls:
            (tmp_path / ".lock").unlink()
        calls.append(fd)
        return real(fd, operation)

    monkeypatch.setattr(fcntl, "flock", lets_go_first)
    with hold_folder(tmp_path):
        monkeypatch.setattr(fcntl, "flock", real)
        assert len(calls) == 2  # locked the removed file, saw it, locked the new one
        assert folder_in_use(tmp_path)  # the .lock on disk is the one held: another process is refused
    assert not (tmp_path / ".lock").exists() and not folder_in_use(tmp_path)
