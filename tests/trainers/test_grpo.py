"""Mirage GRPO (stage 3): the trainer's log-probs, gradients, loss mask, rewards, one training step, bad input.

The reference for log-probs and gradients runs each sample alone with no slot hook and no cache:
for every latent slot t in order it runs the prefix [0, t) and writes the final-norm hidden state
at t-1 into the input embeddings at t, then one full pass; log-probs come from the model's own
LM head. The hand-made completions hold: one span then text and EOS; two spans; a
`<|latent_pad|>` and `<|latent_end|>` sampled as text (text tokens, not a span); a span cut by
the length limit.
"""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
from helpers import trl_loss_logps

from mirage_trl.configs import MirageGRPOConfig
from mirage_trl.errors import MirageError
from mirage_trl.latent.collator import MirageDataCollator
from mirage_trl.latent.layout import slot_masks
from mirage_trl.models.families import multimodal_model, unwrap
from mirage_trl.models.prepare import add_latent_tokens
from mirage_trl.models.settings import MirageSettings
from mirage_trl.models.tiny import build_tiny_model
from mirage_trl.rewards import REWARD_FUNCS
from mirage_trl.trainers.grpo import MirageGRPOTrainer

K = 2
TEMPERATURE = 0.7


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


@functools.cache
def _base():
    model, processor = build_tiny_model(seed=0)
    tokens = add_latent_tokens(processor, model, K)
    return model, processor, tokens


def fresh():
    model, processor, tokens = _base()
    return copy.deepcopy(model), processor, tokens


def _image(path, w, h, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(path)
    return str(path)


def _row(i, images, benchmark="vsp_reasoning", answer="A"):
    content = [{"type": "text", "text": f"Is plan {i} safe? Answer with a letter."}]
    content += [{"type": "image", "text": None} for _ in images]
    return {
        "messages": [
            {"role": "user", "content": content},
            {"role": "assistant", "content": [{"type": "text", "text": "<think> ok </think> \\boxed{A}"}]},
        ],
        "images": list(images),
        "helper_images": [],
        "benchmark": benchmark,
        "answer": answer,
        "map_desc": "",
        "source": f"test:{i + 1}",
    }


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grpo_images")
    a = _image(folder / "a.png", 56, 56, 0)
    b = _image(folder / "b.png", 84, 56, 1)
    # Every row has an image: TRL 1.16 fails on a generation batch that mixes rows with and without images.
    return [_row(0, [a]), _row(1, [b]), _row(2, [b]), _row(3, [a])]


@pytest.fixture
def length_reward(monkeypatch):
    """A reward named "length" that varies between completions, so the advantages (and the update) are not zero."""
    monkeypatch.setitem(
        REWARD_FUNCS,
        "length",
        lambda prompts, completions, **kw: [float(sum(map(ord, c[0]["content"])) % 7) for c in completions],
    )


def _config(tmp, **kw):
    base = dict(
        output_dir=str(tmp),
        per_device_train_batch_size=2,
        num_generations=2,
        max_completion_length=12,
        max_steps=1,
        use_cpu=True,
        bf16=False,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        latent_size=K,
        temperature=TEMPERATURE,
        learning_rate=1e-2,
        seed=0,
    )
    base.update(kw)
    return MirageGRPOConfig(**base)


def _lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)


@pytest.fixture(scope="module")
def trainer(rows, tmp_path_factory):
    from datasets import Dataset

    model, processor, _ = fresh()
    tr = MirageGRPOTrainer(
        model,
        args=_config(tmp_path_factory.mktemp("grpo")),
        train_dataset=Dataset.from_list(rows),
        processing_class=processor,
        peft_config=_lora(),
    )
    tr.model.train()
    return tr


def _texts_to_ids(tok, *parts, eos=True):
    """Concatenate token ids of text pieces and raw id lists."""
    ids = []
    for p in parts:
        ids += tok(p, add_special_tokens=False)["input_ids"] if isinstance(p, str) else list(p)
    if eos:
        ids.append(tok.convert_tokens_to_ids("<|im_end|>"))
    return ids


def completions(tokens, tok):
    S, P, E = tokens.start_id, tokens.pad_id, tokens.end_id
    span = [S] + [P] * K + [E]
    return [
        _texts_to_ids(tok, "<think> go", span, "</think> \\boxed{A}"),  # format 1, accuracy 1
        _texts_to_ids(tok, "<think> hm", span, "ice", span, "</think> \\boxed{B}"),  # format 1, accuracy 0
        _texts_to_ids(tok, "a", [P], "b", [E], "\\boxed{A}"),  # pad/end sampled as text; format 0, accuracy 1
        _texts_to_ids(tok, "no", [S] + [P] * (K - 1), eos=False),  # a span cut by the length limit
    ]


def _expected_masks(ids, tokens):
    """(slots, forced) positions of one completion, by walking it like the decoder does."""
    slots, forced, i = set(), set(), 0
    while i < len(ids):
        if ids[i] == tokens.start_id:
            slots |= {j for j in range(i + 1, min(i + 1 + K, len(ids)))}
            if i + 1 + K < len(ids):
                forced.add(i + 1 + K)
            i += K + 2
        else:
            i += 1
    return slots, forced


def _batch(processor, tokens, rows, comps):
    """TRL's layout: left-padded prompts + right-padded completions, and the vision inputs."""
    collator = MirageDataCollator(processor, tokens)
    prompt = collator.prompt_batch(rows)
    pad = processor.tokenizer.pad_token_id
    C = max(len(c) for c in comps)
    comp = torch.tensor([c + [pad] * (C - len(c)) for c in comps])
    cmask = torch.tensor([[1] * len(c) + [0] * (C - len(c)) for c in comps])
    ids = torch.cat([prompt["input_ids"], comp], 1)
    attn = torch.cat([prompt["attention_mask"], cmask], 1)
    mm = torch.cat(
        [prompt["mm_token_type_ids"], torch.zeros_like(comp, dtype=prompt["mm_token_type_ids"].dtype)], 1
    )
    kw = dict(
        pixel_values=prompt["pixel_values"],
        image_grid_thw=prompt["image_grid_thw"],
        num_images=[len(r["images"]) for r in rows],
        mm_token_type_ids=mm,
    )
    return ids, attn, C, kw, collator


def reference_logps(model, collator, row, comp, tokens, detach=False):
    """Per-sample reference: (C,) log-probs of every completion token (slots included; the caller masks)."""
    inner = multimodal_model(model)
    enc = collator.encode_prompt(row)
    ids = torch.cat([enc["input_ids"], torch.tensor(comp)])[None]
    mm = torch.cat([enc["mm_token_type_ids"], torch.zeros(len(comp), dtype=enc["mm_token_type_ids"].dtype)])[
        None
    ]
    vision = {k: enc[k] for k in ("pixel_values", "image_grid_thw") if k in enc}
    n = enc["input_ids"].shape[0]
    slots, _ = _expected_masks(comp, tokens)
    x = model.get_input_embeddings()(ids)
    for t in sorted(n + s for s in slots):
        h = inner(
            input_ids=ids[:, :t], inputs_embeds=x[:, :t], mm_token_type_ids=mm[:, :t], **vision
        ).last_hidden_state
        latent = h[:, t - 1 : t].detach() if detach else h[:, t - 1 : t]
        x = torch.cat([x[:, :t], latent, x[:, t + 1 :]], dim=1)
    hidden = inner(input_ids=ids, inputs_embeds=x, mm_token_type_ids=mm, **vision).last_hidden_state
    logits = unwrap(model).lm_head(hidden[0, n - 1 : -1]).float() / TEMPERATURE
    return logits.log_softmax(-1).gather(-1, torch.tensor(comp)[:, None]).squeeze(-1)


# --------------------------------------------------------------------------- layout and loss mask


def test_latent_layout_matches_decoder_walk(trainer):
    tokens, tok = trainer.latent_tokens, trainer.processing_class.tokenizer
    comps = completions(tokens, tok)
    C = max(map(len, comps))
    ids = torch.tensor([c + [tok.pad_token_id] * (C - len(c)) for c in comps])
    slots, forced = slot_masks(ids, tokens)
    for i, c in enumerate(comps):
        exp_slots, exp_forced = _expected_masks(c, tokens)
        assert set(slots[i].nonzero().flatten().tolist()) == exp_slots
        assert set(forced[i].nonzero().flatten().tolist()) == exp_forced
    assert slots.sum().item() == 2 * K * 2 - K + (K - 1) and forced.sum().item() == 3  # 1 + 2 + 0 + 1 spans


def test_prompts_match_the_collator(trainer, rows):
    """TRL's own prompt processing (PIL images loaded by the trainer) gives the collator's prompt ids."""
    from trl.data_utils import prepare_multimodal_messages

    loaded = [trainer._rollout_row(r) for r in rows]
    prompts = [prepare_multimodal_messages(x["prompt"], images=x["images"]) for x in loaded]
    prompt_ids, _, fields = trainer._tokenize_prompts(prompts)
    collator = MirageDataCollator(trainer.processing_class, trainer.latent_tokens)
    for row, ids in zip(rows, prompt_ids):
        assert list(ids) == collator.encode_prompt(row)["input_ids"].tolist()
    assert torch.equal(
        torch.as_tensor(np.array(fields["image_grid_thw"])), collator.prompt_batch(rows)["image_grid_thw"]
    )


def test_scored_batch_masks_latents_and_gives_rewards(trainer, rows, monkeypatch):
    """A generation batch with fixed completions: the loss mask, the rewards and the logged metrics."""
    tokens, tok = trainer.latent_tokens, trainer.processing_class.tokenizer
    comps = completions(tokens, tok)
    monkeypatch.setattr(trainer, "_generate_single_turn", lambda *a, **k: (comps, None))
    for key in list(trainer._metrics["train"]):
        trainer._metrics["train"][key].clear()
    out = trainer._generate_and_score_completions(rows)
    loss_mask = out["completion_mask"] * out["tool_mask"]
    for i, c in enumerate(comps):
        slots, forced = _expected_masks(c, tokens)
        assert out["completion_mask"][i, : len(c)].tolist() == [1] * len(c)  # slots stay attended
        expected = [0 if j in slots or j in forced else 1 for j in range(len(c))]
        assert loss_mask[i, : len(c)].tolist() == expected
        assert loss_mask[i, len(c) :].sum() == 0
    # <|latent_start|> was sampled: it is trained
    assert all(
        loss_mask[i, j] == 1 for i, c in enumerate(comps) for j, t in enumerate(c) if t == tokens.start_id
    )
    assert out["num_items_in_batch"].item() == loss_mask.sum().item()

    # Rewards: 0.9 x accuracy + 0.1 x format on hand-written completions.
    m = trainer._metrics["train"]
    assert m["rewards/accuracy_reward/mean"][-1] == pytest.approx(0.5)
    assert m["rewards/format_reward/mean"][-1] == pytest.approx(0.5)
    assert m["reward"][-1] == pytest.approx((1.0 + 0.1 + 0.9 + 0.0) / 4)
    assert m["accuracy"][-1] == pytest.approx(0.5)
    assert m["latent/spans_mean"][-1] == pytest.approx((1 + 2 + 0 + 1) / 4)
    assert m["completions/mean_length"][-1] == pytest.approx(np.mean([len(c) for c in comps]))
    assert m["completions/mean_text_length"][-1] == pytest.approx(loss_mask.sum().item() / 4)
    adv = out["advantages"]
    assert adv[0] > 0 > adv[1] and adv[2] > 0 > adv[3]  # group (1.0, 0.1) and group (0.9, 0.0)

    # Slot and forced positions carry no loss: old log-probs there do not change it; at a text token they do.
    monkeypatch.setattr(trainer, "current_gradient_accumulation_steps", 1, raising=False)  # set by train()
    out["old_per_token_logps"] = torch.zeros_like(out["completion_mask"], dtype=torch.float32)
    with torch.no_grad():
        base = trainer._compute_loss(trainer.model, out).item()
        hidden = out["completion_mask"].bool() & ~loss_mask.bool()
        out["old_per_token_logps"] = torch.where(hidden, torch.tensor(3.0), out["old_per_token_logps"])
        assert trainer._compute_loss(trainer.model, out).item() == pytest.approx(base, abs=1e-7)
        out["old_per_token_logps"][0, 0] = 3.0
        assert abs(trainer._compute_loss(trainer.model, out).item() - base) > 1e-6


# --------------------------------------------------------------------------- log-probs and gradients


def test_logps_equal_per_sample_reference(trainer, rows):
    model, tokens, tok = trainer.model, trainer.latent_tokens, trainer.processing_class.tokenizer
    comps = completions(tokens, tok)
    ids, attn, C, kw, collator = _batch(trainer.processing_class, tokens, rows, comps)
    with torch.no_grad():
        logps, ent, _ = trainer._get_per_token_logps_and_entropies(
            model, ids, attn, C, batch_size=2, compute_entropy=True, **kw
        )
        assert logps.shape == (4, C) and ent.shape == (4, C)
        for i, (row, c) in enumerate(zip(rows, comps)):
            ref = reference_logps(model, collator, row, c, tokens)
            slots, forced = _expected_masks(c, tokens)
            text = [j for j in range(len(c)) if j not in slots and j not in forced]
            torch.testing.assert_close(logps[i, text], ref[text], rtol=0, atol=1e-5)
            assert logps[i, sorted(slots | forced)].abs().sum() == 0 and logps[i, len(c) :].abs().sum() == 0
            assert (ent[i, text] > 0).all()
    # Training mode with gradients (checkpointed rounds when gradient checkpointing is on) gives the same numbers.
    with_grad, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, attn, C, batch_size=4, **kw)
    torch.testing.assert_close(with_grad.detach(), logps, rtol=0, atol=1e-5)
    trainer._train_latents = []


def test_gradient_flows_through_latents(trainer, rows):
    """d(sum of text log-probs after the spans)/d(embedding table): equal to the reference, and different
    from the reference whose latents are detached (the path through the latents carries gradient)."""
    model, processor, tokens = fresh()
    model.train()
    tok = processor.tokenizer
    comps = completions(tokens, tok)[:2]
    ids, attn, C, kw, collator = _batch(processor, tokens, rows[:2], comps)
    kw["num_images"] = [len(r["images"]) for r in rows[:2]]
    weights = torch.zeros(2, C)
    for i, c in enumerate(comps):
        slots, forced = _expected_masks(c, tokens)
        first = min(slots)
        for j in range(first, len(c)):
            if j not in slots and j not in forced:
                weights[i, j] = 1.0
    emb = model.get_input_embeddings().weight

    def grad_of(fn):
        model.zero_grad()
        fn().backward()
        return emb.grad.detach().clone()

    g_trainer = grad_of(
        lambda: (trainer._get_per_token_logps_and_entropies(model, ids, attn, C, **kw)[0] * weights).sum()
    )
    trainer._train_latents = []

    def ref(detach):
        return sum(
            (reference_logps(model, collator, r, c, tokens, detach) * weights[i, : len(c)]).sum()
            for i, (r, c) in enumerate(zip(rows[:2], comps))
        )

    g_ref = grad_of(lambda: ref(False))
    g_det = grad_of(lambda: ref(True))
    scale = g_ref.abs().max()
    torch.testing.assert_close(g_trainer, g_ref, rtol=1e-4, atol=1e-6 * scale)
    assert (g_ref - g_det).abs().max() > 1e-3 * scale


# --------------------------------------------------------------------------- rollout latents as constants


def _span_bias(trainer, tokens, start=6.0):
    """Make the random model open latent spans (and never sample an image placeholder or stop early)."""
    tok = trainer.processing_class.tokenizer
    model = unwrap(trainer.model)
    bias = torch.zeros(model.lm_head.weight.shape[0])
    for name in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|im_end|>"):
        bias[tok.convert_tokens_to_ids(name)] = -30.0
    bias[tokens.start_id] = start
    model.get_output_embeddings().register_forward_hook(lambda m, a, out: out + bias.to(out.dtype))


def test_constant_rollout_latents_score_the_rollout_in_one_pass(rows, tmp_path):
    """`rollout_latents="constant"` keeps the latents each rollout fed with the batch (through TRL's generation and
    scoring) and feeds them again as constants: the log-probabilities equal the exact recomputation's (same weights),
    one forward instead of the rounds; the gradient equals the per-sample reference whose latents are detached, not
    the exact one."""
    from datasets import Dataset

    model, processor, tokens = fresh()
    trainer = MirageGRPOTrainer(
        model,
        args=_config(tmp_path, rollout_latents="constant", max_completion_length=14),
        train_dataset=Dataset.from_list(rows),
        processing_class=processor,
    )
    _span_bias(trainer, tokens)
    trainer.model.train()
    torch.manual_seed(0)
    batch = trainer._generate_and_score_completions(rows)
    C = batch["completion_ids"].shape[1]
    slots, _ = slot_masks(batch["completion_ids"], tokens)
    slots &= batch["completion_mask"].bool()
    assert batch["rollout_latents"].shape == (4, C, model.config.text_config.hidden_size)
    assert slots.sum() >= 2 * K  # the rollouts opened spans
    assert (
        (batch["rollout_latents"].norm(dim=-1) > 0).eq(slots).all()
    )  # a latent at every slot, zeros elsewhere

    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attn = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    kw = {k: batch[k] for k in ("pixel_values", "image_grid_thw", "num_images", "mm_token_type_ids")}
    calls = []
    hook = unwrap(trainer.model).get_input_embeddings().register_forward_hook(lambda m, a, o: calls.append(1))
    trainer._batch_rollout = batch["rollout_latents"]
    constant = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attn, C, **kw)[0]
    assert len(calls) == 1  # one pass
    trainer.args.rollout_latents = "recompute"
    with torch.no_grad():
        exact = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attn, C, **kw)[0]
    assert len(calls) > 2  # the rounds
    hook.remove()
    torch.testing.assert_close(constant.detach(), exact, rtol=0, atol=1e-4)

    # the gradient: d(sum of text log-probs)/d(embedding table), against the per-sample reference
    comps = [c[: int(m.sum())].tolist() for c, m in zip(batch["completion_ids"], batch["completion_mask"])]
    collator = MirageDataCollator(processor, tokens)
    text = batch["completion_mask"].float() * batch["tool_mask"].float()
    emb = unwrap(trainer.model).get_input_embeddings().weight

    def grad_of(fn):
        trainer.model.zero_grad()
        fn().backward()
        return emb.grad.detach().clone()

    trainer.args.rollout_latents = "constant"
    g_constant = grad_of(
        lambda: (
            trainer._get_per_token_logps_and_entropies(trainer.model, ids, attn, C, **kw)[0] * text
        ).sum()
    )
    trainer._train_latents = []

    def ref(detach):
        return sum(
            (reference_logps(unwrap(trainer.model), collator, r, c, tokens, detach) * text[i, : len(c)]).sum()
            for i, (r, c) in enumerate(zip(rows, comps))
        )

    g_det, g_exact = grad_of(lambda: ref(True)), grad_of(lambda: ref(False))
    scale = g_det.abs().max()
    torch.testing.assert_close(g_constant, g_det, rtol=1e-3, atol=1e-5 * scale)
    assert (g_exact - g_det).abs().max() > 1e-3 * scale


@pytest.mark.usefixtures("length_reward")
def test_constant_rollout_latents_stay_with_their_rows_through_trl_shuffle_and_split(rows, tmp_path):
    """Through `train()` with two steps per generation (TRL shuffles the generation batch and splits it): every
    training pass feeds each row the latents of its own rollout (nonzero exactly at its completion's slots), and the
    step trains."""
    from datasets import Dataset

    model, processor, tokens = fresh()
    trainer = MirageGRPOTrainer(
        model,
        args=_config(
            tmp_path,
            rollout_latents="constant",
            steps_per_generation=2,
            max_steps=2,
            reward_names=["format", "length"],
            reward_weights=[0.1, 1.0],
        ),
        train_dataset=Dataset.from_list(rows),
        processing_class=processor,
    )
    _span_bias(trainer, tokens)
    seen = []
    forward = trainer._forward_with_rollout_latents

    def checked(model, ids, attn, slot_mask, *args):
        rollout = trainer._batch_rollout if trainer._batch_rollout is not None else trainer._rollout_latents
        start, end = args[-2:]
        C = rollout.shape[1]
        fed = rollout[start:end].norm(dim=-1) > 0
        assert torch.equal(fed, slot_mask[:, -C:]), "a row got another rollout's latents"
        seen.append(int(fed.sum()))
        return forward(model, ids, attn, slot_mask, *args)

    trainer._forward_with_rollout_latents = checked
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert len(seen) >= 2 and sum(seen) > 0
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    assert trainer.state.log_history[0]["latent/norm"] > 0


def test_constant_rollout_latents_refuse_a_batch_without_them(trainer):
    trainer.args.rollout_latents = "constant"
    try:
        ids = torch.ones(1, 4, dtype=torch.long)
        with pytest.raises(MirageError, match="carries no rollout latents"):
            trainer._forward_with_rollout_latents(trainer.model, ids, ids, ids.bool(), None, {}, 0, 1)
    finally:
        trainer.args.rollout_latents = "recompute"


# --------------------------------------------------------------------------- one step


@pytest.mark.usefixtures("length_reward")
def test_one_training_step_updates_adapter_and_logs(rows, tmp_path):
    from datasets import Dataset

    model, processor, tokens = fresh()
    args = _config(
        tmp_path, reward_names=["accuracy", "format", "length"], reward_weights=[0.9, 0.1, 1.0], beta=0.01
    )
    tr = MirageGRPOTrainer(
        model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=processor,
        peft_config=_lora(),
    )
    # Make the random model open latent spans often, in rollouts and training alike (the head as PEFT wrapped it).
    bias = torch.zeros(model.lm_head.weight.shape[0])
    bias[tokens.start_id] = 6.0
    unwrap(tr.model).get_output_embeddings().register_forward_hook(lambda m, a, out: out + bias.to(out.dtype))
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in before)
    tr.train()
    changed = [n for n, p in tr.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("lora_" in n for n in changed)
    logs = tr.state.log_history[0]
    for key in (
        "reward",
        "reward_std",
        "rewards/accuracy_reward/mean",
        "rewards/format_reward/std",
        "accuracy",
        "latent/spans_mean",
        "completions/mean_length",
        "completions/mean_text_length",
        "kl",
        "latent/norm",
    ):
        assert key in logs, key
    assert logs["latent/spans_mean"] > 0 and logs["latent/norm"] > 0
    assert logs["completions/mean_text_length"] < logs["completions/mean_length"]
    assert 0.0 <= logs["accuracy"] <= 1.0


# --------------------------------------------------------------------------- bad input


def test_unknown_reward_name(tmp_path):
    with pytest.raises(MirageError, match="unknown reward 'speed'"):
        _config(tmp_path, reward_names=["accuracy", "speed"])


def test_generation_batch_not_divisible(tmp_path):
    with pytest.raises(MirageError, match=r"generation batch 3 .* not divisible by num_generations=2"):
        _config(tmp_path, per_device_train_batch_size=3)


@pytest.mark.parametrize("flag", ["use_liger_kernel", "torch_compile"])
def test_unsupported_training_switches_are_refused_before_upstream_checks(tmp_path, flag):
    """Liger's GRPO loss would replace the latent forward (and its import fails first where Liger is absent)."""
    with pytest.raises(MirageError, match=rf"^--{flag}: not supported by the Mirage trainers: "):
        _config(tmp_path, **{flag: True})


def test_unsupported_generation_settings(tmp_path):
    with pytest.raises(MirageError, match="use_vllm"):
        _config(tmp_path, use_vllm=True)
    with pytest.raises(MirageError, match="top_k"):
        _config(tmp_path, top_k=5)


def test_visual_bottleneck_is_refused_in_one_line(rows, tmp_path):
    from datasets import Dataset

    rows = Dataset.from_list(rows)
    with pytest.raises(
        MirageError, match=r"^--latent_bottleneck image: GRPO's rollouts .* --latent_bottleneck none$"
    ):
        _config(tmp_path, latent_bottleneck="image")
    model, processor, _ = fresh()
    MirageSettings.update(model, K, latent_bottleneck="image")  # a model trained under the bottleneck
    with pytest.raises(
        MirageError,
        match=r"^the model was trained with the visual bottleneck .*pass --latent_bottleneck none$",
    ):
        MirageGRPOTrainer(model=model, args=_config(tmp_path), train_dataset=rows, processing_class=processor)
    # told to go without it, GRPO trains it as an open model
    trainer = MirageGRPOTrainer(
        model=model,
        args=_config(tmp_path, latent_bottleneck="none"),
        train_dataset=rows,
        processing_class=processor,
    )
    assert trainer.model.config.mirage["latent_bottleneck"] == "none"


def test_benchmark_without_grader(rows, tmp_path):
    from datasets import Dataset

    model, processor, _ = fresh()
    bad = [dict(r, benchmark="mystery") for r in rows]
    with pytest.raises(MirageError, match="no grader for benchmark.*'mystery'"):
        MirageGRPOTrainer(
            model, args=_config(tmp_path), train_dataset=Dataset.from_list(bad), processing_class=processor
        )
    # Without the accuracy reward the benchmark does not matter.
    tr = MirageGRPOTrainer(
        model,
        args=_config(tmp_path, reward_names=["format"]),
        train_dataset=Dataset.from_list(bad),
        processing_class=processor,
    )
    assert tr.reward_weights.tolist() == pytest.approx([0.1])


def test_generation_batch_mixing_rows_with_and_without_images(trainer, rows):
    mixed = [rows[0], {**rows[1], "images": [], "source": "train.jsonl:7"}, rows[2], rows[3]]
    with pytest.raises(MirageError, match=r"mixes rows with and without images \(without: train.jsonl:7\)"):
        trainer._generate_and_score_completions(mixed)


# --------------------------------------------------------------------------- TRL's own rollout path


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_trl_rollout_and_scoring_match_reference_whatever_the_padding_side(
    trainer, rows, tmp_path, monkeypatch, padding_side
):
    """Prompts of different lengths and image sizes in one generation batch, through TRL's own
    `_generate_and_score_completions` and `_compute_loss`: TRL builds `mm_token_type_ids` with the
    tokenizer's padding side while the prompt ids are left-padded; the log-probs must not care."""
    tokens, tok = trainer.latent_tokens, trainer.processing_class.tokenizer
    long_row = _row(9, rows[1]["images"])
    long_row["messages"][0]["content"][0]["text"] = "Is this much longer plan number nine safe? " * 3
    batch = [rows[0], long_row, rows[2], rows[3]]  # 56x56 and 84x56 images, prompts of three lengths
    comps = completions(tokens, tok)
    monkeypatch.setattr(trainer, "_generate_single_turn", lambda *a, **k: (comps, None))
    monkeypatch.setattr(tok, "padding_side", padding_side)
    out = trainer._generate_and_score_completions(batch)
    assert len(set(out["prompt_mask"].sum(1).tolist())) == 3  # three prompt lengths (text and image tokens)

    seen = {"logps": trl_loss_logps(trainer, out, monkeypatch)}
    collator = MirageDataCollator(trainer.processing_class, tokens)
    with torch.no_grad():
        for i, (row, c) in enumerate(zip(batch, comps)):
            ref = reference_logps(trainer.model, collator, row, c, tokens)
            slots, forced = _expected_masks(c, tokens)
            text = [j for j in range(len(c)) if j not in slots and j not in forced]
            torch.testing.assert_close(seen["logps"][i, text], ref[text], rtol=0, atol=1e-5)
    trainer._train_latents = []


def test_grpo_honours_stage2_method(trainer, rows, monkeypatch):
    """`stage2_method` and `max_round_tokens` reach the GRPO training forward as they reach SFT's."""
    from mirage_trl.trainers import grpo

    methods = []
    real = grpo.self_latent_forward
    monkeypatch.setattr(
        grpo,
        "self_latent_forward",
        lambda *a, **kw: methods.append((kw.get("method"), kw.get("max_round_tokens"))) or real(*a, **kw),
    )
    monkeypatch.setattr(trainer.args, "stage2_method", "recompute")
    monkeypatch.setattr(trainer.args, "max_round_tokens", 7)
    comps = completions(trainer.latent_tokens, trainer.processing_class.tokenizer)
    ids, attn, C, kw, _ = _batch(trainer.processing_class, trainer.latent_tokens, rows, comps)
    with torch.no_grad():
        trainer._get_per_token_logps_and_entropies(trainer.model, ids, attn, C, batch_size=4, **kw)
    assert methods == [("recompute", 7)]
    with pytest.raises(MirageError, match="--stage2_method 'fast'"):
        _config("unused", stage2_method="fast")


def test_rollout_inputs_have_types_aligned_with_left_padded_ids(rows, tmp_path, monkeypatch):
    """With a right-padding tokenizer TRL hands over types padded on the right; the rollout derives them."""
    from datasets import Dataset

    from mirage_trl.trainers import grpo

    model, processor, _ = fresh()
    trainer = MirageGRPOTrainer(
        model, args=_config(tmp_path), train_dataset=Dataset.from_list(rows), processing_class=processor
    )

    tok = trainer.processing_class.tokenizer
    monkeypatch.setattr(tok, "padding_side", "right")
    long_row = _row(9, rows[1]["images"])
    long_row["messages"][0]["content"][0]["text"] = "A much longer prompt than the others. " * 3
    seen = {}
    real = grpo.generate_with_latents

    def spy(model, processor, inputs, **kw):
        seen.update(inputs)
        return real(model, processor, inputs, **kw)

    monkeypatch.setattr(grpo, "generate_with_latents", spy)
    trainer._generate_and_score_completions([rows[0], long_row, rows[2], rows[3]])
    image_id = unwrap(trainer.model).config.image_token_id
    assert (seen["input_ids"][:, 0] == tok.pad_token_id).any()  # left-padded ids of different lengths
    assert torch.equal(seen["mm_token_type_ids"].bool(), seen["input_ids"] == image_id)
