"""Every model family through the trainer's stage-1 path, against a per-sample reference written here.

The reference shares no code with `mirage_trl.models.families`: for each sample alone (no padding) it
encodes each helper image alone through the model's own `get_image_features`, pools by slicing, writes
the targets into the input embeddings at the slots, runs the bare vision-language model (which finds its
own positions and, for Gemma 3, its bidirectional image attention from `token_type_ids`) and sums the
text cross-entropy and the cosine latent loss by hand. The stage-2 and decoding paths are parametrised
over the families in tests/latent/test_stage2.py and tests/test_generation.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import IGNORE, four_rows, make_images, sft_args, trl_loss_logps

from mirage_trl.errors import MirageError
from mirage_trl.models.families import SUPPORTED_MODEL_TYPES, family
from mirage_trl.models.tiny import build_tiny_model
from mirage_trl.trainers.sft import MirageSFTTrainer

FAMILIES = list(SUPPORTED_MODEL_TYPES)  # every family (each has a tiny factory; Qwen2.5-VL first)
PROJECTOR = ("gemma3", "internvl")  # LLaVA-style: one pixel_values entry per image, embeddings alone
# Qwen3.5's reference PyTorch gated-delta kernel works in chunks of the padded length: its sums run in another
# order than over one sample alone (float32 rounding, a few 1e-5 on the smallest gradients).
GRAD_REL = {"qwen3_5": 1e-4}
K = 4
GAMMA = 0.3

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return four_rows(make_images(tmp_path_factory.mktemp("images")))


def _dataset(rows):
    from datasets import Dataset

    from mirage_trl.data.reference import _features

    return Dataset.from_list(rows, features=_features())


def _split_images(model, batch, prefix, counts):
    """Per sample, its images' inputs as the model takes them (Qwen: patches and grid rows; Gemma 3, InternVL:
    images; SmolVLM: a (1, images, 3, H, W) block with its pixel mask). `prefix` "" for the input images,
    "helper_" for the helper images; `counts`: images per sample."""
    mt = model.config.model_type
    pixel_values, grid = batch.get(f"{prefix}pixel_values"), batch.get(f"{prefix}image_grid_thw")
    out, img, patch = [], 0, 0
    if mt == "smolvlm":  # inputs: one row per sample; helpers: every helper image in one row
        mask = batch.get(f"{prefix}pixel_attention_mask")
        flat = pixel_values.flatten(0, 1) if pixel_values is not None else None
        flat_mask = mask.flatten(0, 1) if mask is not None else None
        for b, n in enumerate(counts):
            if not n:
                out.append({})
            elif prefix:
                out.append(
                    {
                        "pixel_values": flat[img : img + n][None],
                        "pixel_attention_mask": flat_mask[img : img + n][None],
                    }
                )
            else:
                out.append(
                    {"pixel_values": pixel_values[b : b + 1, :n], "pixel_attention_mask": mask[b : b + 1, :n]}
                )
            img += n
        return out
    if mt == "llava_onevision":  # images, their sizes, and how many a sample has (several: no crops)
        sizes, per_image = batch.get(f"{prefix}image_sizes"), batch.get(f"{prefix}batch_num_images")
        for n in counts:  # the processor saw a sample's images one by one ([1, 1]): each one is cropped
            one = {"pixel_values": pixel_values[img : img + n], "image_sizes": sizes[img : img + n]}
            out.append({**one, "batch_num_images": per_image[img : img + n]} if n else {})
            img += n
        return out
    for n in counts:
        if mt in PROJECTOR:
            out.append({"pixel_values": pixel_values[img : img + n]} if n else {})
        else:
            p = int(grid[img : img + n].prod(-1).sum()) if n else 0
            out.append(
                {"pixel_values": pixel_values[patch : patch + p], "image_grid_thw": grid[img : img + n]}
                if n
                else {}
            )
            patch += p
        img += n
    return out


def _qwen_inputs(model, ids, x, types, vision):
    """A Qwen-family sample's inputs with embeddings `x`: the ids too (the model finds its images and positions
    from them); Qwen3-VL takes one or the other, so it gets its own M-RoPE positions from `get_rope_index`."""
    kw = dict(inputs_embeds=x, mm_token_type_ids=types.int(), **vision)
    if model.config.model_type != "qwen3_vl":
        return dict(kw, input_ids=ids)
    positions = model.model.get_rope_index(
        ids,
        mm_token_type_ids=types.int(),
        image_grid_thw=vision.get("image_grid_thw"),
        attention_mask=torch.ones_like(ids),
    )[0]
    return dict(kw, position_ids=positions)


def _one_image_features(model, vision):
    feats = model.model.get_image_features(**vision, return_dict=True).pooler_output
    return feats[0]


def reference_stage1(model, batch, rows):
    cfg = model.config
    image_id = cfg.image_token_id
    helpers = _split_images(model, batch, "helper_", [len(r["helper_images"]) for r in rows])
    inputs = _split_images(model, batch, "", [len(r["images"]) for r in rows])
    ce_sum, n_tokens, one_minus_cos = 0.0, 0, []
    for b, row in enumerate(rows):
        real = batch["attention_mask"][b].bool()
        ids = batch["input_ids"][b][real][None]
        labels = batch["labels"][b][real]
        slots = batch["latent_mask"][b][real].nonzero().flatten().tolist()
        x = model.get_input_embeddings()(ids).clone()
        targets = []
        if slots:
            with torch.no_grad():
                vision = helpers[b]
                n_helpers = len(row["helper_images"])
                for i in range(n_helpers):
                    if cfg.model_type == "smolvlm":
                        one = {k: v[:, i : i + 1] for k, v in vision.items()}
                    elif cfg.model_type == "llava_onevision":  # alone: cropped as a one-image prompt is
                        one = {
                            "pixel_values": vision["pixel_values"][i : i + 1],
                            "image_sizes": vision["image_sizes"][i : i + 1],
                        }
                    elif cfg.model_type in PROJECTOR:
                        one = {"pixel_values": vision["pixel_values"][i : i + 1]}
                    else:
                        grid = vision["image_grid_thw"]
                        start = int(grid[:i].prod(-1).sum())
                        one = {
                            "pixel_values": vision["pixel_values"][start : start + int(grid[i].prod())],
                            "image_grid_thw": grid[i : i + 1],
                        }
                    f = _one_image_features(model, one)
                    assert (
                        f.norm(dim=-1).min() > 1e-3
                    )  # real features (a zero projector would make cos 0 = 0)
                    g = f.shape[0] // K
                    targets += [f[j * g : (j + 1) * g].mean(0) for j in range(K)]
            for t, target in zip(slots, targets):
                x[0, t] = target
        types = (ids == image_id).long()
        if cfg.model_type == "gemma3":
            out = model.model(inputs_embeds=x, token_type_ids=types, **inputs[b])
        elif cfg.model_type in ("internvl", "smolvlm", "llava_onevision"):
            out = model.model(inputs_embeds=x, **inputs[b])
        else:
            out = model.model(**_qwen_inputs(model, ids, x, types, inputs[b]))
        h = out.last_hidden_state[0]
        logits = model.lm_head(h).float()
        ce_sum = ce_sum + F.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE, reduction="sum")
        n_tokens += int((labels[1:] != IGNORE).sum())
        for t, target in zip(slots, targets):
            one_minus_cos.append(1 - F.cosine_similarity(h[t - 1], target, dim=0))
    return GAMMA * ce_sum / n_tokens + torch.stack(one_minus_cos).mean()


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("variant", ["full", "lora_ckpt"])
@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_stage1_loss_and_gradients_equal_a_per_sample_reference(tmp_path, rows, model_type, padding, variant):
    """Through the trainer's compute_loss, full fine-tuning without checkpointing or LoRA (q, v and the latent
    token rows) with the model's gradient checkpointing on."""
    from peft import LoraConfig

    from mirage_trl.models.families import unwrap

    model, processor = build_tiny_model(model_type)
    lora = variant == "lora_ckpt"
    trainer = MirageSFTTrainer(
        model=model,
        args=sft_args(
            tmp_path / "out",
            per_device_train_batch_size=4,
            latent_size=K,
            text_loss_weight=GAMMA,
            gradient_checkpointing=lora,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        ),  # fmt: skip
        train_dataset=_dataset(rows),
        processing_class=processor,
        peft_config=LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        )
        if lora
        else None,
    )
    trainer.data_collator.padding_side = padding
    batch = trainer.data_collator(rows)
    assert batch["attention_mask"][:, 0 if padding == "left" else -1].min() == 0  # really padded
    model = trainer.model.train()
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    got = _grads(model)
    model.zero_grad(set_to_none=True)
    ref = reference_stage1(unwrap(model), batch, rows)
    ref.backward()
    want = _grads(model)
    torch.testing.assert_close(loss, ref, rtol=2e-5, atol=2e-6)
    assert got.keys() == want.keys() and len(want) > 0
    if lora:
        assert all("lora_" in n or "trainable_tokens" in n for n in want), sorted(want)[:4]
    for name in want:
        err = (got[name] - want[name]).norm() / want[name].norm().clamp_min(1e-20)
        assert float(err) <= GRAD_REL.get(model_type, 1e-5), f"{name}: relative error {float(err):.2e}"
    # the vision tower is frozen in training (stage-1 targets and input images pass through it without grad)
    assert not any(v in n for v in ("visual", "vision_tower", "vision_model") for n in got)


def test_gemma3_image_blocks_and_token_types_come_from_the_ids():
    """Gemma 3's image tokens attend to each other both ways: each run of image soft tokens is one block
    (the stage-2 rounds open attention inside it; a sliding-window layer is in the tiny model, window 8)."""
    model, processor = build_tiny_model("gemma3")
    text = model.config.text_config
    assert "sliding_attention" in text.layer_types and text.sliding_window == 8
    fam = family(model)
    tok = processor.tokenizer
    i, t, s, e = (
        model.config.image_token_id,
        tok.convert_tokens_to_ids("x"),
        tok.boi_token_id,
        tok.eoi_token_id,
    )
    ids = torch.tensor([[t, s, i, i, i, i, e, t, t], [t, t, t, s, i, i, i, i, e]])
    blocks = fam.attention_blocks(model, ids)
    assert blocks.tolist() == [[-1, -1, 0, 0, 0, 0, -1, -1, -1], [-1, -1, -1, -1, 0, 0, 0, 0, -1]]
    assert (
        fam.token_types(model, ids)["token_type_ids"].tolist()
        == (ids == model.config.image_token_id).long().tolist()
    )


def test_unsupported_family_names_the_supported_ones():
    with pytest.raises(MirageError) as e:
        family("paligemma")
    assert str(e.value) == (
        f"model type 'paligemma' is not a supported vision-language model; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )
    assert {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "gemma3", "internvl"} <= set(
        SUPPORTED_MODEL_TYPES
    )


@pytest.mark.parametrize(
    "model_type", FAMILIES[1:]
)  # Qwen2.5-VL: tests/trainers/test_grpo.py, test_export.py
def test_lora_run_exports_and_reloads_with_identical_greedy_decoding(tmp_path, rows, model_type):
    """Train a LoRA adapter for two steps, save it as the recipes do, export it as an adapter and merged, load
    each back and decode the same rows: the same tokens, latent slots and latents (spans forced to open)."""
    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText

    from mirage_trl.export import export_model
    from mirage_trl.generation import generate_with_latents
    from mirage_trl.latent.collator import MirageDataCollator
    from mirage_trl.models.load import load_model
    from mirage_trl.models.processors import load_processor
    from mirage_trl.models.tiny import save_tiny_model
    from mirage_trl.run import save_outputs

    base = save_tiny_model(tmp_path / "base", model_type=model_type)
    model = AutoModelForImageTextToText.from_pretrained(str(base))
    processor = load_processor(str(base))
    trainer = MirageSFTTrainer(
        model=model,
        args=sft_args(
            tmp_path / "run", per_device_train_batch_size=4, latent_size=K, max_steps=2, learning_rate=1e-2
        ),
        train_dataset=_dataset(rows),
        processing_class=processor,
        peft_config=LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
        ),
    )
    trainer.train()

    def decode(net, proc):
        batch = MirageDataCollator(proc, trainer.latent_tokens).prompt_batch(rows)
        return generate_with_latents(
            net.eval(), proc, batch, max_new_tokens=12, do_sample=False, return_latents=True
        )

    # Spans open where the model's most frequent greedy token would win: the trained <|latent_start|> row
    # (a PEFT trainable token; Gemma 3 ties it between the embedding and the LM head) copies that token's row.
    from mirage_trl.models.families import unwrap

    net = unwrap(trainer.model)
    head = net.get_output_embeddings()
    adapter = getattr(head, "token_adapter", None) or net.get_input_embeddings().token_adapter
    start = trainer.latent_tokens.start_id
    with torch.no_grad():
        common = torch.mode(decode(trainer.model, processor).sequences.flatten()).values.item()
        row = adapter.token_indices["default"].index(start)
        merged = adapter.get_merged_weights(["default"])
        adapter.trainable_tokens_delta["default"][row] = 3.0 * merged[common]
    save_outputs(trainer, str(tmp_path / "run"), stage=1, base_model=str(base))
    reference = decode(trainer.model, processor)
    assert int(reference.num_latent_spans.sum()) > 0, "the test needs latent spans"
    for merge in (False, True):
        out_dir = export_model(
            tmp_path / "run", tmp_path / f"export-{'merged' if merge else 'adapter'}", merge=merge
        )
        assert (out_dir / ("model.safetensors" if merge else "adapter_model.safetensors")).is_file()
        net, proc = load_model(out_dir)
        assert type(proc).__name__ == type(processor).__name__
        assert getattr(proc, "image_seq_length", None) == getattr(processor, "image_seq_length", None)
        got = decode(net, proc)
        assert torch.equal(got.sequences, reference.sequences), merge
        assert torch.equal(got.latent_mask, reference.latent_mask)
        for a, b in zip(got.latents, reference.latents):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _grpo_row(i, image):
    content = [{"type": "text", "text": f"Is plan {i} safe? Answer with a letter." + " Think." * i}]
    content.append({"type": "image", "text": None})
    return {
        "messages": [
            {"role": "user", "content": content},
            {"role": "assistant", "content": [{"type": "text", "text": "\\boxed{A}"}]},
        ],
        "images": [image],
        "helper_images": [],
        "benchmark": "vsp_reasoning",
        "answer": "A",
        "map_desc": "",
        "source": f"test:{i + 1}",
    }


def _grpo_reference_logps(model, collator, row, comp, latent_tokens, temperature):
    """One sample alone, no cache, no slot hook: every slot filled in order from a prefix pass, then one
    full pass; log-probs of the completion from the model's own LM head."""
    enc = collator.encode_prompt(row)
    ids = torch.cat([enc["input_ids"], torch.tensor(comp)])[None]
    n = enc["input_ids"].shape[0]
    types = (ids == model.config.image_token_id).long()
    x = model.get_input_embeddings()(ids)

    def inputs(t=None):  # the first t tokens, as each family's model takes them
        if model.config.model_type == "gemma3":
            return dict(inputs_embeds=x[:, :t], token_type_ids=types[:, :t], pixel_values=enc["pixel_values"])
        if model.config.model_type == "internvl":
            return dict(inputs_embeds=x[:, :t], pixel_values=enc["pixel_values"])
        if model.config.model_type == "llava_onevision":
            vision = {k: enc[k] for k in ("pixel_values", "image_sizes", "batch_num_images")}
            return dict(inputs_embeds=x[:, :t], **vision)
        if model.config.model_type == "smolvlm":
            return dict(
                inputs_embeds=x[:, :t],
                pixel_values=enc["pixel_values"],
                pixel_attention_mask=enc["pixel_attention_mask"],
            )
        vision = {"pixel_values": enc["pixel_values"], "image_grid_thw": enc["image_grid_thw"]}
        return _qwen_inputs(model, ids[:, :t], x[:, :t], types[:, :t], vision)

    i, slots = 0, []
    while i < len(comp):  # a span: start, k slots, end
        if comp[i] == latent_tokens.start_id:
            slots += [n + j for j in range(i + 1, min(i + 1 + latent_tokens.latent_size, len(comp)))]
            i += latent_tokens.latent_size + 2
        else:
            i += 1
    for t in slots:
        h = model.model(**inputs(t)).last_hidden_state
        x = torch.cat([x[:, :t], h[:, t - 1 : t], x[:, t + 1 :]], dim=1)
    hidden = model.model(**inputs()).last_hidden_state
    logits = model.lm_head(hidden[0, n - 1 : -1]).float() / temperature
    return logits.log_softmax(-1).gather(-1, torch.tensor(comp)[:, None]).squeeze(-1), set(
        s - n for s in slots
    )


@pytest.mark.parametrize(
    "model_type", FAMILIES[1:]
)  # Qwen2.5-VL: tests/trainers/test_grpo.py, test_export.py
def test_grpo_log_probs_through_trls_rollout_equal_a_per_sample_reference(tmp_path, monkeypatch, model_type):
    """Fixed completions (spans of different counts) through TRL's own `_generate_and_score_completions` and
    `_compute_loss`: the text tokens' log-probs equal the per-sample reference."""
    from datasets import Dataset
    from helpers import noise_image

    from mirage_trl.configs import MirageGRPOConfig
    from mirage_trl.latent.collator import MirageDataCollator
    from mirage_trl.trainers.grpo import MirageGRPOTrainer

    model, processor = build_tiny_model(model_type)
    rows = [_grpo_row(i, noise_image(tmp_path / f"{i}.png", 56 + 28 * (i % 2), 56, seed=i)) for i in range(4)]
    args = MirageGRPOConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, num_generations=2, max_completion_length=12,
        max_steps=1, use_cpu=True, bf16=False, report_to="none", save_strategy="no", latent_size=2,
        temperature=0.7, seed=0,
    )  # fmt: skip
    trainer = MirageGRPOTrainer(
        model, args=args, train_dataset=Dataset.from_list(rows), processing_class=processor
    )
    lt, tok = trainer.latent_tokens, processor.tokenizer
    span = [lt.start_id, lt.pad_id, lt.pad_id, lt.end_id]
    words = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eot = [tok.convert_tokens_to_ids(family(model).end_of_turn)]
    comps = [
        words("go") + span + words("\\boxed{A}") + eot,
        words("hm") + span + words("ice") + span + words("\\boxed{B}") + eot,
        words("a b \\boxed{A}") + eot,
        words("no") + span[:2],  # a span cut by the length limit
    ]
    monkeypatch.setattr(trainer, "_generate_single_turn", lambda *a, **k: (comps, None))
    out = trainer._generate_and_score_completions(rows)
    trainer.model.train()
    seen = {"logps": trl_loss_logps(trainer, out, monkeypatch)}
    collator = MirageDataCollator(processor, lt)
    with torch.no_grad():
        for i, (row, comp) in enumerate(zip(rows, comps)):
            ref, slots = _grpo_reference_logps(trainer.model, collator, row, comp, lt, 0.7)
            text = [
                j
                for j in range(len(comp))
                if j not in slots and not (comp[j] == lt.end_id and j - 1 in slots)
            ]
            assert len(slots) == 2 * comp.count(lt.start_id) - (i == 3)  # the cut span has one slot
            torch.testing.assert_close(seen["logps"][i, text], ref[text], rtol=0, atol=1e-5)
    trainer._train_latents = []


@pytest.mark.parametrize("model_type", ["gemma3"])
def test_the_command_line_trains_both_stages_exports_and_evaluates_a_family(tmp_path, model_type):
    """What a user runs, as subprocesses: `mirage-trl tiny-model --model-type`, the stage-1 and stage-2 recipes
    (`mirage-trl train`), export and eval; each step reads what the one before wrote."""
    import json
    import subprocess
    import sys

    from mirage_trl.data.vsp import generate_vsp

    def cli(*argv):
        proc = subprocess.run(
            [sys.executable, "-m", "mirage_trl", *map(str, argv)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    data = generate_vsp(
        "planning", [3], 4, split="train", style="cot", seed=0, out_dir=tmp_path / "data", progress=False
    )
    cli("tiny-model", "--model-type", model_type, "--out", tmp_path / "tiny")
    assert json.loads((tmp_path / "tiny" / "config.json").read_text())["model_type"] == model_type
    common = ["--cpu", "--dataset_name", data, "--max_steps", "2", "--report_to", "none"]
    cli("train", "stage1", "--benchmark", "vsp", "--config", "smoke", "--model_name_or_path", tmp_path / "tiny",
        "--output_dir", tmp_path / "s1", *common)  # fmt: skip
    cli("train", "stage2", "--benchmark", "vsp", "--config", "smoke", "--model_name_or_path", tmp_path / "s1",
        "--output_dir", tmp_path / "s2", *common)  # fmt: skip
    assert json.loads((tmp_path / "s2" / "mirage_config.json").read_text())["stages"] == [1, 2]
    cli("export", "--model", tmp_path / "s2", "--out", tmp_path / "export")
    cli("eval", "--model", tmp_path / "export", "--benchmark", "vsp_planning", "--data", data, "--greedy",
        "--max-new-tokens", "4", "--no-progress", "--out", tmp_path / "eval")  # fmt: skip
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["modes"]["model"]["groups"]["all"]["n"] == 4
    card = (tmp_path / "export" / "README.md").read_text()
    assert "mirage-trl train stage2 --benchmark vsp" in card or "recipes/stage2_vsp.py" in card


def test_internvl_takes_one_tile_per_image():
    """The loaded processor does not tile (crop_to_patches off, also as a call default), and a batch whose
    images were tiled anyway is refused in one line where rows are cut (GRPO)."""
    from mirage_trl.models.processors import processor_class

    fam = family("internvl")
    assert processor_class("internvl").images_kwargs["crop_to_patches"] is False
    pixels = torch.zeros(3, 3, 8, 8)
    assert fam.select_images({"pixel_values": pixels[:2]}, [1, 1], 1, 2)["pixel_values"].shape[0] == 1
    with pytest.raises(MirageError) as e:
        fam.select_images({"pixel_values": pixels}, [1, 1], 0, 1)
    assert str(e.value) == (
        "InternVL: 3 image tiles for 2 images; Mirage takes one tile per image here "
        "(set the image processor's crop_to_patches to false)"
    )


def test_a_new_family_is_one_module(tmp_path):
    """A module that defines and registers a family is all the registry needs: `family()` then finds it."""
    from mirage_trl.models.families import FAMILIES, import_family_modules

    (tmp_path / "idefics3.py").write_text(
        "from mirage_trl.models.families.base import register\n"
        "from mirage_trl.models.families.smolvlm import SmolVLMFamily\n\n\n"
        "class Idefics3Family(SmolVLMFamily):\n"
        "    name, model_type = 'Idefics3', 'idefics3'\n\n\n"
        "register(Idefics3Family())\n"
    )
    try:
        import_family_modules([str(tmp_path)])
        assert family("idefics3").name == "Idefics3"
        assert list(FAMILIES)[: len(SUPPORTED_MODEL_TYPES)] == list(SUPPORTED_MODEL_TYPES)
    finally:
        FAMILIES.pop("idefics3", None)
    with pytest.raises(MirageError, match="model type 'idefics3' is not a supported"):
        family("idefics3")
