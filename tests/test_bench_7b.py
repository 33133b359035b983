"""The 7B-shaped benchmark model: the kept config is the real Qwen2.5-VL-7B-Instruct architecture, and
the GPU benchmark's code path runs end to end (tiny shapes, CPU)."""

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_config_is_qwen2_5_vl_7b_instruct():
    from transformers import AutoConfig, AutoModelForImageTextToText

    d = json.loads((ROOT / "bench/configs/qwen2_5_vl_7b_instruct.json").read_text())
    d.pop("_comment")
    config = AutoConfig.for_model(**d)
    t, v = config.text_config, config.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (
        3584,
        28,
        28,
        4,
    )
    assert (t.intermediate_size, t.vocab_size) == (18944, 152064)
    assert (v.depth, v.hidden_size, v.intermediate_size, v.num_heads, v.out_hidden_size) == (
        32,
        1280,
        3420,
        16,
        3584,
    )
    assert (v.patch_size, v.spatial_merge_size) == (14, 2)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == 8_292_166_656  # Qwen2.5-VL-7B's published size


def test_gpu_benchmark_code_path_runs_on_cpu(tmp_path):
    sys.path.insert(0, str(ROOT))
    from bench.gpu_7b import main

    out = tmp_path / "gpu.json"
    assert main(["--tiny", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["runs"]) == {"stage1", "stage2", "stage1_ckpt", "stage2_ckpt"}
    assert all(r["samples_per_s"] > 0 and r["mfu"] > 0 for r in result["runs"].values())
    assert result["stage2_over_stage1"] > 0
    (dec,) = result["decoding"]
    assert dec["batch"] == 1 and dec["same_tokens"] and dec["ratio"] > 0
