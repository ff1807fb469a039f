"""`attnres-train --help`: groups and fields with the schema's field comments, defaults and docs links; exit 0
without importing torch; overrides next to --help change the defaults shown; Hydra's --hydra-help is kept."""

import subprocess

from tests import subproc

from .conftest import PY, REPO

# Read straight from the schema source (not through the code under test): a field's comment is its description.
SCHEMA = {"optim.lr": "attnres_train/config/train.py", "data.seq_len": "attnres_train/config/data.py"}


def comment_above(path, field):
    lines = (REPO / path).read_text().splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith(f"{field}:"):
            return lines[i - 1].strip().lstrip("#").strip()
    raise AssertionError(field)


def help_run(tmp_path, *args):
    # The entry point in a child that reports, after it finished, whether torch was ever imported.
    prog = (
        "import atexit, sys\n"
        "atexit.register(lambda: sys.stderr.write('TORCH_LOADED=%s\\n' % ('torch' in sys.modules)))\n"
        f"sys.argv = ['attnres-train', *{list(args)!r}]\n"
        "from attnres_train.cli.train import main\n"
        "main()\n"
    )
    return subprocess.run([PY, "-c", prog], cwd=tmp_path, env=subproc.child_env(), capture_output=True, text=True)


def line_of(out, key):
    hits = [ln for ln in out.splitlines() if ln.strip().startswith(key + "=")]
    assert len(hits) == 1, (key, hits)
    return hits[0]


def test_help_lists_fields_with_schema_comments_defaults_and_docs_without_torch(tmp_path):
    p = help_run(tmp_path, "--help")
    assert p.returncode == 0, p.stderr
    assert "TORCH_LOADED=False" in p.stderr
    out = p.stdout
    # the lr description is the comment's first sentence, whole; config.yaml's default (3e-3), not the schema's
    lr = line_of(out, "optim.lr")
    assert lr.split()[0] == "optim.lr=0.003"
    assert comment_above(SCHEMA["optim.lr"], "lr") in lr
    seq = line_of(out, "data.seq_len")
    assert seq.split()[0] == "data.seq_len=128"
    assert comment_above(SCHEMA["data.seq_len"], "seq_len").split(";")[0] in seq
    line_of(out, "model.residual.num_blocks")  # nested groups are listed too
    line_of(out, "pipeline.schedule")
    for group, page in (("model", "model.md"), ("optim", "training.md"), ("parallel", "parallel.md")):
        heads = [ln for ln in out.splitlines() if ln.startswith(group) and not ln.startswith(group + ".")]
        assert len(heads) == 1 and f"[docs/{page}]" in heads[0], heads
        assert (REPO / "docs" / page).is_file()
    assert "--shell-completion" in out and "--hydra-help" in out
    assert not list(tmp_path.iterdir())  # nothing written


def test_help_defaults_follow_overrides_and_bad_overrides_are_one_error(tmp_path):
    p = help_run(tmp_path, "model=tiny", "optim.lr=0.5", "-h")
    assert p.returncode == 0, p.stderr
    assert line_of(p.stdout, "optim.lr").split()[0] == "optim.lr=0.5"
    assert line_of(p.stdout, "model.name").split()[0] == "model.name=tiny"
    bad = help_run(tmp_path, "model=nosuch", "--help")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    errors = [ln for ln in bad.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "model=nosuch" in errors[0], bad.stderr


def test_hydra_help_and_cfg_job_still_work(tmp_path):
    p = help_run(tmp_path, "--hydra-help")
    assert p.returncode == 0 and "Hydra" in p.stdout and "--shell-completion" in p.stdout, p.stderr
    cfg = help_run(tmp_path, "--cfg", "job", "optim.lr=0.25")
    assert cfg.returncode == 0, cfg.stderr
    assert "lr: 0.25" in cfg.stdout


def test_shell_completion_script_and_query(tmp_path):
    # what the installed bash script runs on <TAB>: the command with -sc query=bash and COMP_LINE set
    script = help_run(tmp_path, "--shell-completion", "install=bash")
    assert script.returncode == 0 and "-F hydra_bash_completion attnres-train" in script.stdout
    env = subproc.child_env(COMP_LINE="attnres-train optim.warm")
    prog = "import sys\nsys.argv = ['attnres-train', '-sc', 'query=bash']\nfrom attnres_train.cli.train import main\nmain()\n"
    p = subprocess.run([PY, "-c", prog], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.split() == ["optim.warmup_steps="], (p.stdout, p.stderr)
