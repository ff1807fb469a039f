"""Hydra's completion query (``attnres-train -sc query=bash``) outside a completion function: one error line.

Hydra's bash/fish completion reads ``COMP_LINE``, which only the shell's completion function sets; run by
hand it ended in a KeyError traceback. With ``COMP_LINE`` set the query answers as before (the control).
The CLI runs in this process (sys.argv patched). docs/training.md, "Command-line help and shell completion".
"""

import sys

import pytest

from attnres_train.cli.train import main


def _invoke(argv, monkeypatch, capsys):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "")  # main() sets it: recorded so that teardown restores it
    monkeypatch.delenv("HYDRA_FULL_ERROR")
    monkeypatch.setattr(sys, "argv", ["attnres-train", *argv])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("flag", ["-sc", "--shell-completion"])
def test_query_without_comp_line_is_one_error_line(flag, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("COMP_LINE", raising=False)
    code, out, err = _invoke([flag, "query=bash"], monkeypatch, capsys)
    assert code == 2 and out == ""
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("error: "), err
    assert "COMP_LINE" in err and "install=bash" in err
    assert list(tmp_path.iterdir()) == []


def test_query_with_comp_line_completes(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COMP_LINE", "attnres-train optim.warm")
    code, out, err = _invoke(["-sc", "query=bash"], monkeypatch, capsys)
    assert code in (0, None) and "error:" not in err
    assert out.split() == ["optim.warmup_steps="]
