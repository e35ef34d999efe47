"""bf16 pretraining trains the demo model, BatchNorm included, on the CPU: DeepSpeed casts parameters to bf16 and,
since 0.18, keeps buffers (BatchNorm's running statistics) in fp32 unless told otherwise, and batch norm refuses
bf16 weights with fp32 statistics ("expected scalar type BFloat16 but found Float")."""

from __future__ import annotations

import json

from test_pretrain import log_of, run

from soilnet.config.pretrain import PretrainConfig
from soilnet.train.pretrain import engine_config


def test_bf16_engines_cast_buffers_with_parameters():
    cfg = PretrainConfig.model_validate({"train": {"global_batch_size": 16}})
    assert engine_config(cfg, 1, "bf16", 1e-3, False, micro=8)["data_types"] == {"buffer_dtype": "bf16"}
    assert "data_types" not in engine_config(cfg, 1, "fp32", 1e-3, False, micro=8)


def test_bf16_pretraining_of_the_demo_model_with_batchnorm_runs_and_its_loss_is_finite(shards, tmp_path):
    out = tmp_path / "bf16"
    assert run(out, shards, 1, "train.precision=bf16", "train.steps=4") == [0], log_of(out)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(abs(v) < 1e6 for v in losses), losses
