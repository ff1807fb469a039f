"""The run_dir writability probe: every rank of a job runs it on the same directory at the same moment."""

import threading

import pytest

from attnres_train.config.errors import UserInputError
from attnres_train.train.trainer import check_run_dir


def test_concurrent_ranks_do_not_trip_over_each_other(tmp_path):
    # CI once failed a 2-rank run: both ranks wrote and unlinked one shared probe file, the slower rank's
    # unlink raised FileNotFoundError and it reported a writable run_dir as "not writable".
    errors, start = [], threading.Barrier(8)

    def rank():
        start.wait()
        for _ in range(200):
            try:
                check_run_dir(tmp_path / "run")
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)

    threads = [threading.Thread(target=rank) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert list((tmp_path / "run").iterdir()) == []  # no probe files left behind


def test_unwritable_run_dir_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserInputError, match="not writable"):
        check_run_dir(blocker / "run")
