"""tests/subproc.py: a failed command's whole output is in the file its message names; children's threads pinned."""

import re
import sys

import pytest

from tests.subproc import check, child_env, communicate, popen, run

CHILD = """
import os, sys
print(os.environ.get("OMP_NUM_THREADS"), os.environ.get("MKL_NUM_THREADS"), os.environ.get("EXTRA"))
sys.stderr.write("FIRST-LINE\\n" + "x" * 10000 + "\\nLAST-LINE\\n")
sys.exit(int(sys.argv[1]))
"""


def test_failed_command_names_the_file_with_its_whole_output(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # the parent's setting does not leak into the child
    proc = run([sys.executable, "-c", CHILD, "3"], tmp_path / "logs", "child", env=child_env(EXTRA="e"))
    assert proc.stdout.split() == ["1", "1", "e"]
    with pytest.raises(AssertionError) as err:
        check(proc)
    message = str(err.value)
    assert "exit status 3" in message and str(proc.log) in message and "LAST-LINE" in message
    assert "FIRST-LINE" not in message  # the message keeps a tail ...
    text = proc.log.read_text()  # ... the file keeps everything
    assert proc.log.parent == tmp_path / "logs"
    assert "FIRST-LINE" in text and "x" * 10000 in text and "LAST-LINE" in text and "exit status: 3" in text
    again = run([sys.executable, "-c", CHILD, "0"], tmp_path / "logs", "child")
    assert check(again) is again and again.log != proc.log  # a second run does not overwrite the first log


def test_popen_communicate_saves_the_output(tmp_path):
    proc = popen([sys.executable, "-c", CHILD, "5"], tmp_path, "popen", env=child_env(EXTRA="p"))
    out, err = communicate(proc, timeout=60)
    assert out.split() == ["1", "1", "p"] and err.endswith("LAST-LINE\n")
    with pytest.raises(AssertionError, match=re.escape(f"exit status 5; full stdout/stderr in {proc.log}")):
        check(proc)
    assert "FIRST-LINE" in proc.log.read_text() and "exit status: 5" in proc.log.read_text()
