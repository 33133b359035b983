"""The 7B-shaped benchmark model: the kept config is the real Qwen2.5-VL-7B-Instruct architecture, and its 4-bit
path keeps the vision tower in full precision. (The GPU benchmark's code path end to end, tiny shapes on CPU:
tests/test_gpu_runbook.py.)"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
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


def test_config_file_model_takes_the_local_tokenizer_ids(tmp_path):
    """`mirage-trl tiny-model --config`: the real architecture with random weights, driven by the local
    tokenizer (its special-token ids replace the checkpoint's)."""
    from mirage_trl.cli import main as cli
    from mirage_trl.errors import MirageError
    from mirage_trl.models.load import load_model
    from mirage_trl.models.tiny import build_tiny_tokenizer, config_from_file

    tok = build_tiny_tokenizer()
    config = config_from_file(ROOT / "bench/configs/qwen2_5_vl_7b_instruct.json", tok)
    assert config.text_config.hidden_size == 3584 and config.text_config.vocab_size == 152064
    assert config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>") != 151655
    assert config.text_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")

    # the same path end to end on a shrunken copy of the file
    d = json.loads((ROOT / "bench/configs/qwen2_5_vl_7b_instruct.json").read_text())
    d["text_config"].update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    d["text_config"].update(num_key_value_heads=2, vocab_size=1000)
    d["text_config"]["rope_parameters"]["mrope_section"] = [4, 2, 2]
    d["vision_config"].update(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
    d["vision_config"]["fullatt_block_indexes"] = [0]
    small = tmp_path / "small.json"
    small.write_text(json.dumps(d))
    assert cli(["tiny-model", "--config", str(small), "--out", str(tmp_path / "m")]) == 0
    model, processor = load_model(tmp_path / "m", require_mirage=False)
    assert model.config.text_config.hidden_size == 64
    ids = processor.tokenizer("hello world", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], 1000)

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**d, "model_type": "llama"}))
    import pytest

    with pytest.raises(MirageError, match="model type 'llama' is not a supported vision-language model"):
        config_from_file(bad, tok)


@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None,
    reason="bitsandbytes is not installed (pip install 'mirage-trl[quantization]')",
)
def test_the_qlora_path_loads_in_4_bits_with_the_vision_tower_in_full_precision(tmp_path):
    """`--load-in-4bit` used to raise TypeError (a quantization config given to the model's constructor); now the
    random model is saved and loaded through `from_pretrained` in 4 bits (bitsandbytes' CPU backend here), the
    language model's linear layers quantized and none of the vision tower's, and both stages run."""
    sys.path.insert(0, str(ROOT))
    from bench.gpu_7b import build

    model, _ = build(True, True, "cpu")
    four_bit = [n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"]
    assert any(".language_model." in n for n in four_bit)
    assert not any(".visual." in n or n.endswith("lm_head") for n in four_bit)
    # both stages run on it: tests/test_gpu_runbook.py (the runbook's QLoRA step, at tiny shapes)


def test_round_plans_at_7b_shapes_count_the_rounds_of_each_schedule():
    """`bench/round_plans.py`: planning only on the shipped 7B config. Three spans of k = 4 give 13 aligned rounds;
    the checkpointing default cuts them to about real tokens / 28 layers each (more rounds), a larger cap to fewer;
    no round can be smaller than the images it must keep whole."""
    sys.path.insert(0, str(ROOT))
    from bench.round_plans import plans

    result = plans(batch=2, text_len=240)
    rounds = {name: r["rounds"] for name, r in result["schedules"].items()}
    aligned = rounds.pop("aligned (rounds, no checkpointing)")
    assert aligned == 3 * 4 + 1 and result["layers"] == 28
    default = next(v for k, v in rounds.items() if "default" in k)
    assert default > rounds["split, max_round_tokens 2048"] >= aligned
    assert (
        min(r["largest_round_tokens"] for r in result["schedules"].values()) >= 2 * 256
    )  # two images, whole


def test_a_stage2_step_and_a_grpo_pass_wait_for_the_device_at_most_twice(tmp_path):
    """`bench/host_syncs.py` follows which tensors would live on a GPU through one stage-2 step (rounds, with and
    without checkpointing, the trainers' loss, backward): one copy of the masks for the round plan, one count of
    the trained positions for the loss. (It was 4 and 5: two mask copies, a boolean index per loss tensor, and an
    `int()` of the token count for the checkpointing cap.)"""
    sys.path.insert(0, str(ROOT))
    from bench.host_syncs import main

    out = tmp_path / "syncs.json"
    assert main(["--quick", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for step in result["steps"].values():
        assert step["by_operation"] == {"copy to the host": 1, "nonzero": 1}
    assert result["syncs_per_stage2_step"] == 2
    # Whole trainer steps, beside TRL's own trainers (the Qwen vision tower and rope index sync in both). What
    # mirage-trl adds: the plan and the loss positions (stage 2), the slots' predictions and the loss positions
    # (stage 1), and one read of the guard's flags with the logged metrics; the GRPO training pass scores every
    # position as TRL does (no count of scored ones) and reads its guard and latent health together. (Stage 2 was
    # 8 and GRPO 8: a boolean index per image token type, the health read apart from the guard's.)
    trainers = result["trainer_steps"]
    own = {name: step["by_library"].get("mirage_trl", 0) for name, step in trainers.items()}
    assert own == {
        "MirageSFTTrainer stage 1": 3,
        "MirageSFTTrainer stage 2": 3,
        "TRL SFTTrainer": 0,
        "MirageGRPOTrainer training pass": 2,
        "TRL GRPOTrainer training pass": 0,
    }
    assert result["syncs_per_grpo_step"] == 2
    assert (
        trainers["MirageGRPOTrainer training pass"]["syncs"]
        <= trainers["TRL GRPOTrainer training pass"]["syncs"]
    )
