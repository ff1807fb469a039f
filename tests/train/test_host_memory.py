"""trainer.keep_host_memory: freed activation-sized blocks stay in the process instead of faulting in anew."""

import ctypes.util
import platform
import sys
import textwrap

import pytest

from tests import subproc

PROBE = textwrap.dedent(
    """
    import resource, sys, torch
    from attnres_train.train.host_memory import keep_freed_host_memory

    def faults_per_alloc(n=10, mib=64):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(n):
            x = torch.empty(mib << 18)  # fp32: mib MiB
            x.fill_(1.0)
            del x
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / n

    faults_per_alloc(2)
    before = faults_per_alloc()
    ok = keep_freed_host_memory()
    faults_per_alloc(20)  # the first blocks after the switch still come fresh from the OS
    after = faults_per_alloc()
    print(ok, before, after)
    """
)


@pytest.mark.skipif(platform.system() != "Linux" or ctypes.util.find_library("c") is None, reason="glibc only")
def test_freed_blocks_are_reused_without_page_faults(tmp_path):
    out = subproc.check(subproc.run([sys.executable, "-c", PROBE], tmp_path, "probe", timeout=300)).stdout.split()
    ok, before, after = out[0] == "True", float(out[1]), float(out[2])
    assert ok
    pages = (64 << 20) // 4096
    assert before >= pages // 2  # glibc default: a 64 MiB block is mmap'ed and faulted in on every allocation
    assert after <= pages // 10, (before, after)


@pytest.mark.parametrize("keep", [True, False])
def test_trainer_applies_it_on_cpu_when_enabled(monkeypatch, tmp_path, keep):
    import attnres_train.train.trainer as trainer_mod
    from attnres_train.config.schema import Config
    from attnres_train.parallel.mesh import single_process_context

    class Stop(Exception):
        pass

    def stop(run_dir):  # everything after the run-dir check is not what this test is about
        raise Stop

    calls = []
    monkeypatch.setattr(trainer_mod, "keep_freed_host_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(trainer_mod, "check_run_dir", stop)
    cfg = Config()
    assert cfg.trainer.keep_host_memory is True  # the default
    cfg.trainer.keep_host_memory = keep
    with pytest.raises(Stop):
        trainer_mod.Trainer(cfg, tmp_path / "run", single_process_context())
    assert calls == ([1] if keep else [])
