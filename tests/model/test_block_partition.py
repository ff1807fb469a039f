"""Block partition rules (``model.residual.partition``, issue 14 item 2): block sizes for a table of (layers, N),
the settings they refuse, and the two-phase read equal to the direct softmax when a block opens at an FFN.

The table is written by hand from the rules' definitions (docs/model.md "Block partition"), including the
issue's examples: 6 layers with N=4 is [3, 3, 3, 3] under the paper's sublayer rule and [2, 2, 2, 6] under the
decoder-layer rule; 12 layers with N=8 is S=3 ([3] * 8) against [2] * 7 + [10].
"""

import pytest
import torch

from attnres_train.config.errors import ConfigError
from attnres_train.config.model import block_starts, validate_model_config
from tests.model.helpers import build, randomize_queries, tiny_cfg

# (num_layers, N) -> block sizes in sublayers: (partition=sublayer, partition=decoder_layer or None if refused)
TABLE = {
    (6, 4): ([3, 3, 3, 3], [2, 2, 2, 6]),
    (12, 8): ([3] * 8, [2] * 7 + [10]),
    (5, 3): ([3, 3, 4], [2, 2, 6]),
    (5, 2): ([5, 5], [4, 6]),
    (7, 2): ([7, 7], [6, 8]),
    (5, 4): ([2, 2, 2, 4], [2, 2, 2, 4]),
    (5, 7): ([1] * 6 + [4], None),
    (4, 8): ([1] * 8, None),
    (3, 1): ([6], [6]),
    (8, 8): ([2] * 8, [2] * 8),
    (16, 8): ([4] * 8, [4] * 8),  # the paper's ablation model: both rules agree when N divides num_layers
    (27, 9): ([6] * 9, [6] * 9),  # the 48B run: 6 sublayers per block
    (13, 8): ([3] * 7 + [5], [2] * 7 + [12]),
}


def sizes(cfg):
    starts = block_starts(cfg)
    return [b - a for a, b in zip(starts, starts[1:] + [2 * cfg.num_layers])]


def block_cfg(layers, n, partition):
    cfg = tiny_cfg("block", n, None, num_layers=layers)
    cfg.residual.partition = partition
    return cfg


@pytest.mark.parametrize("layers,n", list(TABLE))
def test_partition_table(layers, n):
    want_sub, want_layer = TABLE[(layers, n)]
    assert sizes(validate_model_config(block_cfg(layers, n, "sublayer"))) == want_sub
    if want_layer is None:
        with pytest.raises(ConfigError, match="model.residual.num_blocks.*exceeds num_layers"):
            validate_model_config(block_cfg(layers, n, "decoder_layer"))
    else:
        assert sizes(validate_model_config(block_cfg(layers, n, "decoder_layer"))) == want_layer


def test_default_is_the_decoder_layer_rule_and_block_size_counts_decoder_layers():
    assert sizes(validate_model_config(tiny_cfg("block", 4, None, num_layers=6))) == [2, 2, 2, 6]
    assert sizes(tiny_cfg("block", None, 3, num_layers=10)) == [6, 6, 6, 2]  # Kimi-K3: shorter last block
    assert sizes(tiny_cfg("full", num_layers=3)) == [1] * 6


@pytest.mark.parametrize(
    "mode,nb,bs,partition,field,match",
    [
        ("block", None, 2, "sublayer", "partition", "does not apply to block_size"),
        ("prenorm", None, None, "sublayer", "partition", "no effect with mode='prenorm'"),
        ("full", None, None, "sublayer", "partition", "no effect with mode='full'"),
        ("block", 2, None, "paper", "partition", "must be one of decoder_layer|sublayer"),
        ("block", 9, None, "sublayer", "num_blocks", "exceeds the 8 sublayers"),
    ],
)
def test_refused_settings_name_the_field(mode, nb, bs, partition, field, match):
    cfg = tiny_cfg(mode, nb, bs, num_layers=4)
    cfg.residual.partition = partition
    with pytest.raises(ConfigError, match=f"model.residual.{field}: .*{match}"):
        validate_model_config(cfg)


@pytest.mark.parametrize("layers,n", [(5, 3), (5, 2), (6, 4), (5, 7)])
def test_two_phase_equals_direct_softmax_with_a_block_opening_at_an_ffn(layers, n):
    """fp64: the batched two-phase read (torch and reference impls) equals the direct softmax, for the whole model
    and for the model cut after every layer (what a pipeline stage runs); the partitions open blocks at FFNs."""
    ids = torch.randint(0, 1024, (2, 9), generator=torch.Generator().manual_seed(0))
    logits = {}
    for two_phase, impl in [(False, "auto"), (True, "torch"), (True, "reference")]:
        cfg = block_cfg(layers, n, "sublayer")
        cfg.hidden_size, cfg.residual.two_phase, cfg.residual.impl = 32, two_phase, impl
        model = build(cfg)
        randomize_queries(model)
        with torch.no_grad():
            logits[impl] = model(ids)
            for k in range(1, layers):
                state = model.forward_layers(model.embed(ids), 0, k)
                torch.testing.assert_close(model.head(model.forward_layers(state, k)), logits[impl], rtol=0, atol=1e-12)
    assert any(s % 2 for s in block_starts(cfg)), "a block opens at an FFN sublayer"
    for impl in ("torch", "reference"):
        torch.testing.assert_close(logits[impl], logits["auto"], rtol=1e-12, atol=1e-12)
