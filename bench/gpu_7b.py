"""7B-shaped throughput on one GPU: stage 1 and stage 2 with LoRA (r 64 on every linear layer of the
language model), bf16, SDPA, with and without gradient checkpointing; latent decoding vs `generate` at
batch 1, 16 and 64 (`--decode-batches`).

    python bench/gpu_7b.py --json gpu.json                 # on a GPU (about 20 GB for weights + LoRA)
    python bench/gpu_7b.py --load-in-4bit --json q.json    # QLoRA: 4-bit base (bitsandbytes)
    python bench/gpu_7b.py --tiny                          # the same code path on CPU in seconds (CI smoke)

The model has random weights built from `bench/configs/qwen2_5_vl_7b_instruct.json` (the real
Qwen2.5-VL-7B-Instruct architecture; no hub needed). Sequences are synthetic and VSP-like: one
448 x 448 input image (256 visual tokens), CoT text, three latent spans of k = 4. MFU counts
4 N T FLOPs for a LoRA step (forward 2NT + activation gradients 2NT; the frozen base has no weight
gradients) over the GPU's dense bf16 peak (`--peak-tflops`, H100 SXM: 989).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

CONFIG = Path(__file__).resolve().parent / "configs" / "qwen2_5_vl_7b_instruct.json"
K = 4


def build(tiny: bool, load_in_4bit: bool, device):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForImageTextToText

    from mirage_trl.trainers.common import LANGUAGE_MODEL_LINEAR

    d = json.loads(CONFIG.read_text())
    d.pop("_comment", None)
    if tiny:
        d["text_config"].update(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2], "rope_theta": 1e6},
        )
        d["vision_config"].update(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            fullatt_block_indexes=[1],
        )
    config = AutoConfig.for_model(**d)
    dtype = torch.float32 if tiny else torch.bfloat16
    if load_in_4bit:
        # Quantization happens while weights are read (`from_pretrained`), not when a model is built from its
        # config: the random model is saved first, then loaded in 4 bits, the vision tower, the merger and the
        # LM head kept in full precision as the recipes keep them (`unquantized_modules`).
        import tempfile

        from transformers import BitsAndBytesConfig

        from mirage_trl.models.load import keep_4bit_layers_trainable, unquantized_modules

        folder = tempfile.mkdtemp(prefix="gpu-7b-random-")
        with torch.device("cpu"):
            AutoModelForImageTextToText.from_config(config, dtype=dtype).save_pretrained(folder)
        with torch.device("meta"):
            skip = unquantized_modules(AutoModelForImageTextToText.from_config(config))
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_type="nf4",
            llm_int8_skip_modules=skip,
        )
        model = AutoModelForImageTextToText.from_pretrained(
            folder,
            dtype=dtype,
            attn_implementation="sdpa",
            quantization_config=quantization,
            device_map=device,
        )
        keep_4bit_layers_trainable(
            model
        )  # the bench decodes between training steps (a CPU quirk; no-op on GPUs)
    else:
        with torch.device(device):
            model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.requires_grad_(False)
    lora = LoraConfig(
        r=8 if tiny else 64, lora_alpha=16 if tiny else 128, target_modules=LANGUAGE_MODEL_LINEAR
    )
    return get_peft_model(model, lora), config


def synthetic_batch(config, batch: int, text_len: int, device, tiny: bool):
    """One image (16 x 16 merged tokens; 4 x 4 when tiny), text, three latent spans at ragged places."""
    import torch

    g = torch.Generator().manual_seed(0)
    side = 8 if tiny else 32  # patches per side before the 2 x 2 merge
    n_img = (side // 2) ** 2
    vocab = config.text_config.vocab_size
    start, pad, end = vocab - 3, vocab - 2, vocab - 1  # spare rows stand in for the latent tokens
    rows = []
    for _ in range(batch):
        text = torch.randint(0, 150000 if not tiny else vocab - 8, (text_len,), generator=g)
        prompt = torch.tensor(
            [config.vision_start_token_id] + [config.image_token_id] * n_img + [config.vision_end_token_id]
        )
        cuts = sorted(
            int(text_len * f) + int(torch.randint(-text_len // 10, text_len // 10, (1,), generator=g))
            for f in (0.25, 0.5, 0.75)
        )
        pieces, last = [prompt], 0
        for c in cuts:
            pieces += [text[last:c], torch.tensor([start] + [pad] * K + [end])]
            last = c
        pieces.append(text[last:])
        ids = torch.cat(pieces)
        rows.append(ids)
    length = max(r.shape[0] for r in rows)
    input_ids = torch.zeros(batch, length, dtype=torch.long)
    attention = torch.zeros(batch, length, dtype=torch.long)
    for b, r in enumerate(rows):
        input_ids[b, : r.shape[0]] = r
        attention[b, : r.shape[0]] = 1
    slot_mask = input_ids == pad
    labels = input_ids.clone()
    labels[(attention == 0) | slot_mask | (input_ids == config.image_token_id)] = -100
    mm = (input_ids == config.image_token_id).int()
    pixel = torch.randn(batch * side * side, 3 * 2 * 14 * 14, generator=g)
    grid = torch.tensor([[1, side, side]] * batch)
    out = dict(
        input_ids=input_ids,
        attention_mask=attention,
        labels=labels,
        slot_mask=slot_mask,
        mm_token_type_ids=mm,
        pixel_values=pixel,
        image_grid_thw=grid,
    )
    return {k: v.to(device) for k, v in out.items()}, n_img


def step_fns(model, batch, n_img, k_hidden):
    import torch
    import torch.nn.functional as F

    from mirage_trl.latent.slots import latent_inputs
    from mirage_trl.latent.stage2 import self_latent_forward
    from mirage_trl.models.families import capture_final_hidden, family
    from mirage_trl.trainers.sft import text_cross_entropy

    fam = family(model)
    pos = fam.position_ids(model, batch["input_ids"], batch["attention_mask"], fam.image_inputs(model, batch))
    n_slots = int(batch["slot_mask"].sum())
    targets = torch.randn(
        n_slots, k_hidden, device=batch["input_ids"].device, dtype=next(model.parameters()).dtype
    )

    def stage1():
        with latent_inputs(model, batch["slot_mask"], targets), capture_final_hidden(model) as cap:
            model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                position_ids=pos,
                pixel_values=batch["pixel_values"],
                image_grid_thw=batch["image_grid_thw"],
                use_cache=False,
                logits_to_keep=1,
            )
        h = cap[-1]
        ce, n = text_cross_entropy(model, h, batch["labels"])
        cos = F.cosine_similarity(h[:, :-1][batch["slot_mask"][:, 1:]].float(), targets.float(), dim=-1)
        (0.1 * ce / n + (1 - cos).mean()).backward()

    def stage2():
        out = stage2.last = self_latent_forward(
            model,
            batch["input_ids"],
            batch["attention_mask"],
            batch["slot_mask"],
            position_ids=pos,
            pixel_values=batch["pixel_values"],
            image_grid_thw=batch["image_grid_thw"],
            mm_token_type_ids=batch["mm_token_type_ids"],
        )
        ce, n = text_cross_entropy(model, out.hidden_states, batch["labels"])
        (ce / n).backward()

    return stage1, stage2


# The attention kernels SDPA dispatches to, by the ATen operator the profiler records for each.
SDPA_KERNELS = {
    "_scaled_dot_product_flash_attention": "flash",
    "_scaled_dot_product_efficient_attention": "memory-efficient",
    "_scaled_dot_product_cudnn_attention": "cudnn",
    "_scaled_dot_product_attention_math": "math",
    "_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
}


def sdpa_kernels(fn) -> dict:
    """{kernel: calls} of the SDPA kernels one call of `fn` ran (forward and backward)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts: dict = {}
    for event in prof.key_averages():
        name = event.key.removeprefix("aten::")
        if name in SDPA_KERNELS:
            counts[SDPA_KERNELS[name]] = counts.get(SDPA_KERNELS[name], 0) + event.count
    return counts


def decoding(model, config, batch: int, prompt_len: int, new_tokens: int, repeats: int, sync, device) -> dict:
    """Greedy tokens/s of `generate_with_latents` (model mode) vs `model.generate`, same ragged left-padded
    text prompts, `new_tokens` for every sample. The latent start token is masked out in both (random
    weights would open spans at random), so both do the same work; the tokens are checked equal."""
    import torch

    from mirage_trl.generation import generate_with_latents
    from mirage_trl.models.tokens import LatentTokens

    vocab = config.text_config.vocab_size
    lt = LatentTokens(start_id=vocab - 3, pad_id=vocab - 2, end_id=vocab - 1, latent_size=K)
    pad = 0
    g = torch.Generator().manual_seed(1)
    ids = torch.full((batch, prompt_len), pad, dtype=torch.long)
    mask = torch.zeros(batch, prompt_len, dtype=torch.long)
    for b in range(batch):
        n = prompt_len - (b % 4) * (prompt_len // 8)
        ids[b, prompt_len - n :] = torch.randint(1, min(vocab - 8, 150000), (n,), generator=g)
        mask[b, prompt_len - n :] = 1
    inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    inputs["mm_token_type_ids"] = torch.zeros_like(inputs["input_ids"])
    head = model.get_output_embeddings()
    block = torch.zeros(head.weight.shape[0], device=device)
    block[lt.start_id] = -1e4
    hook = head.register_forward_hook(lambda m, a, out: out + block.to(out.dtype))

    def run_generate():
        with torch.no_grad():
            out = model.generate(
                **inputs,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
        return out[:, prompt_len:]

    def run_ours():
        out = generate_with_latents(
            model,
            None,
            inputs,
            latent_tokens=lt,
            max_new_tokens=new_tokens,
            eos_token_ids=[],
            pad_token_id=pad,
        )
        return out.sequences

    try:
        same = run_generate().tolist() == run_ours().tolist()
        t_gen = timed(run_generate, repeats, sync)
        t_ours = timed(run_ours, repeats, sync)
    finally:
        hook.remove()
    tokens = batch * new_tokens
    return {
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "generate_tokens_per_s": tokens / t_gen,
        "latent_tokens_per_s": tokens / t_ours,
        "ratio": t_gen / t_ours,
        "same_tokens": same,
    }


def timed(fn, repeats: int, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on CPU: checks the code path only")
    ap.add_argument("--load-in-4bit", action="store_true", help="QLoRA: 4-bit NF4 base weights")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--text-len", type=int, default=600)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--json", type=Path)
    ap.add_argument(
        "--decode-batches", type=int, nargs="*", default=[1, 16, 64], help="decoding batch sizes ([] to skip)"
    )
    ap.add_argument("--new-tokens", type=int, default=128, help="decoding: new tokens per sample")
    args = ap.parse_args(argv)

    import torch

    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    if args.tiny:
        args.batch, args.text_len, args.repeats, args.new_tokens = 2, 48, 1, 4
        args.decode_batches = [b for b in args.decode_batches if b <= 2] or [1]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    model, config = build(args.tiny, args.load_in_4bit, device)
    n_params = sum(p.numel() for n, p in model.named_parameters() if "visual" not in n)
    batch, n_img = synthetic_batch(config, args.batch, args.text_len, device, args.tiny)
    tokens = int(batch["attention_mask"].sum())
    results = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "batch": args.batch,
        "tokens_per_batch": tokens,
        "image_tokens": n_img,
        "4bit": args.load_in_4bit,
        "runs": {},
    }
    for ckpt in (False, True):
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        else:
            model.gradient_checkpointing_disable()
        stage1, stage2 = step_fns(model, batch, n_img, config.text_config.hidden_size)
        for name, fn in (("stage1", stage1), ("stage2", stage2)):
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            seconds = timed(fn, args.repeats, sync)
            model.zero_grad(set_to_none=True)
            run = {
                "seconds": seconds,
                "samples_per_s": args.batch / seconds,
                "tokens_per_s": tokens / seconds,
                "mfu": 4 * n_params * tokens / seconds / (args.peak_tflops * 1e12),
            }
            if device == "cuda":
                run["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            if name == "stage2":
                run["method"], run["rounds"] = stage2.last.method, stage2.last.steps
                run["sdpa_kernels"] = sdpa_kernels(fn)
                model.zero_grad(set_to_none=True)
            results["runs"][f"{name}{'_ckpt' if ckpt else ''}"] = run
    model.gradient_checkpointing_disable()
    model.eval()
    results["decoding"] = [
        decoding(model, config, b, 128 if not args.tiny else 16, args.new_tokens, args.repeats, sync, device)
        for b in args.decode_batches
    ]
    r = results["runs"]
    results["stage2_over_stage1"] = r["stage2"]["seconds"] / r["stage1"]["seconds"]
    results["stage2_over_stage1_ckpt"] = r["stage2_ckpt"]["seconds"] / r["stage1_ckpt"]["seconds"]
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
