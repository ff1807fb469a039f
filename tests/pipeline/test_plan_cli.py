"""``attnres-plan`` prints the layout, per-hop payloads, the checked schedule and the bubble; bad input exits 2."""

from attnres_train.cli.plan import main


def test_plan_prints_layout_payloads_and_schedule(capsys):
    assert main(["--pp", "4", "--vpp", "2", "--num-layers", "16", "--mode", "block", "--block-size", "2",
                 "--microbatches", "8", "--seq-len", "128"]) == 0
    out = capsys.readouterr().out
    assert "stage rank chunk" in out and "fingerprint=" in out
    assert "hop   3->4   rank 3->0:   3 tensors (naive   5)  shape [3, 1, 128, 128]" in out
    assert "tensors per microbatch per direction: cached 21, naive 35" in out
    assert "rank 0: 0F0 0F1 0F2 0F3 4F0" in out
    assert "(P-1)/(V*M+P-1) = 0.1579" in out and "simulated bubble (F=1, B=2, no comm cost): 0.1579" in out


def test_plan_comms_and_csv(capsys):
    assert main(["--pp", "2", "--vpp", "2", "--num-layers", "4", "--microbatches", "2", "--comms"]) == 0
    assert "0SEND_F0 2RECV_F0" in capsys.readouterr().out
    assert main(["--pp", "2", "--vpp", "2", "--num-layers", "4", "--microbatches", "2", "--csv"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert len(rows) == 2 and rows[0].startswith("0F0,0SEND_F0")


def test_plan_errors_are_one_line(capsys):
    assert main(["--pp", "4", "--vpp", "2", "--num-layers", "16", "--microbatches", "6"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "multiple of P" in err and err.count("\n") == 1
    assert main(["--pp", "2", "--vpp", "2", "--num-layers", "8", "--layers-per-stage", "1,2,3"]) == 2
    assert "pipeline.layers_per_stage" in capsys.readouterr().err
    assert main(["--pp", "2", "--model", "nope"]) == 2
