"""The compact CPU lm_head (cpuft.fastpaths.chunked_loss) computes what the plain path computes.

The yardstick is Hugging Face's own loss: the model's full-logits cross-entropy, `model(...,
labels=...)`, and its gradients. Tolerances (fp32): |loss difference| <= 1e-5, every LoRA
gradient within 1e-5 of the largest gradient's magnitude, entropy and top-1 against torch's own
softmax of the full logits.
"""

from __future__ import annotations

import pytest

from cpuft.hardware.tiles import lm_head_vocab_chunk
from tests.test_fused_lora import lora_llama, loss_and_grads


def test_vocab_chunk_keeps_a_tile_at_one_million_elements():
    # Hand-computed: the largest power of two with tokens x chunk <= 2**20, within [256, 32768].
    assert lm_head_vocab_chunk(512) == 2048
    assert lm_head_vocab_chunk(2048) == 512
    assert lm_head_vocab_chunk(600) == 1024  # 600 x 2048 > 2**20
    assert lm_head_vocab_chunk(1) == 32768  # capped at TRL's own width
    assert lm_head_vocab_chunk(100_000) == 256  # the kernel works on 4096 tokens at a time


def _batch(vocab: int):
    """Two rows of 320 tokens; the second padded after 200; prompt positions unlabelled."""
    import torch

    ids = torch.randint(0, vocab, (2, 320), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 200:] = 0
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[:, :40] = -100  # a prompt: no loss there
    return ids, mask, labels


@pytest.mark.parametrize("vocab", [4096, 300])  # 4096: several vocabulary tiles; 300: one, not a power of two
def test_compact_head_matches_full_logits_loss_and_gradients(vocab):
    import torch

    from cpuft.fastpaths.chunked_loss import patch_compact_head

    model = lora_llama(vocab, tied=True)
    ids, mask, labels = _batch(vocab)
    assert lm_head_vocab_chunk(int((labels[:, 1:] != -100).sum())) < 4096  # the 4096 case really tiles
    plain_loss, plain_grads = loss_and_grads(model, dict(input_ids=ids, attention_mask=mask, labels=labels))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]

    patch_compact_head(model.get_base_model())
    fast = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    fast.loss.backward()
    fast_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    assert abs(float(fast.loss.detach()) - float(plain_loss)) <= 1e-5
    scale = max(g.abs().max() for g in plain_grads.values())
    assert scale > 0
    for name, grad in plain_grads.items():
        assert (fast_grads[name] - grad).abs().max() <= 1e-5 * scale, name

    # TRL's logs read entropy and top-1 at labelled positions: check them against the full softmax.
    targets = labels[:, 1:]
    labelled = targets != -100
    assert torch.equal(fast.label_mask, labelled)
    log_p = torch.log_softmax(logits, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    assert torch.allclose(fast.entropy[labelled], entropy[labelled], atol=1e-4)
    top1 = logits.argmax(-1) == targets
    assert torch.equal(fast.is_top1[labelled].bool(), top1[labelled])
    assert float(fast.log_probs[~labelled].abs().max()) == 0.0  # nothing scored where no label is

    # Without fused_lm_head the model's own forward runs: generation and evaluation are unchanged.
    model.zero_grad(set_to_none=True)
    again = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert abs(float(again.loss) - float(plain_loss)) <= 1e-6


def test_sft_trainer_loss_is_the_same_with_the_compact_head(tiny_model_dir, tmp_path):
    """Through TRL's own SFTTrainer.compute_loss (its fused head, then cpuft's), on one real batch."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from cpuft.fastpaths.chunked_loss import use_cpu_lm_head

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    rows = [{"messages": [{"role": "user", "content": f"question {i} about cpu cores"},
                          {"role": "assistant", "content": "an answer " * (3 + 4 * i)}]} for i in range(4)]
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_length=64, use_cpu=True,
                     bf16=False, report_to=[], gradient_checkpointing=False, max_steps=1)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                                task_type="CAUSAL_LM"))
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert int((batch["labels"] == -100).sum()) > 0  # padding in the batch: positions the head skips
    trl_loss = float(trainer.compute_loss(trainer.model, dict(batch)))
    assert use_cpu_lm_head(trainer)
    cpuft_loss = float(trainer.compute_loss(trainer.model, dict(batch)))
    assert abs(cpuft_loss - trl_loss) <= 1e-5
    for metric in ("entropy", "mean_token_accuracy"):
        first, second = trainer._metrics["train"][metric]
        assert abs(first - second) <= 1e-4, metric


def test_models_that_transform_logits_keep_trls_head():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from cpuft.fastpaths.chunked_loss import why_not_cpu_lm_head

    config = Gemma2Config(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=30.0)
    assert "final_logit_softcapping" in why_not_cpu_lm_head(Gemma2ForCausalLM(config))


def _full_logits_reference(hidden, weight, bias, targets, entropy_weight: float):
    """Torch's own autograd over the whole [rows, vocab] logits in fp32: -sum(log p(target)) +
    entropy_weight * sum(entropy); the yardstick for the compact head's backward."""
    import torch

    hidden = hidden.detach().float().requires_grad_(True)
    weight_ = weight.detach().float().requires_grad_(weight.requires_grad)
    logits = hidden @ weight_.t() + (0 if bias is None else bias.detach().float())
    log_p = torch.log_softmax(logits, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    loss = -log_p.gather(-1, targets[:, None]).sum() + entropy_weight * entropy.sum()
    loss.backward()
    return hidden.grad, weight_.grad


@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-5), ("bfloat16", 2e-2)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_compact_head_backward_in_row_blocks_matches_full_logits(dtype, tolerance, with_bias, monkeypatch):
    """The compact head's own backward (several row blocks, the last one short; several vocabulary
    tiles, the last one narrow) against autograd over the full logits, the entropy's gradient
    included. Tolerance relative to the largest gradient: fp32 rounding, or bf16's (2**-8 per value,
    over a sum of 1,000 terms)."""
    import torch

    from cpuft.fastpaths import chunked_loss

    # At most 64 rows a block (the minimum) at this vocabulary: 300 rows make 5 blocks of 60.
    monkeypatch.setattr(chunked_loss, "HEAD_BACKWARD_BUFFER_BYTES", 1)
    assert chunked_loss.head_backward_rows(300, 1000, 4) == 60  # 5 blocks of 60: none short
    generator = torch.Generator().manual_seed(3)
    torch_dtype = getattr(torch, dtype)
    weight = (torch.randn(1000, 48, generator=generator) * 0.3).to(torch_dtype)
    bias = (torch.randn(1000, generator=generator) * 0.1).to(torch_dtype) if with_bias else None
    hidden = torch.randn(300, 48, generator=generator).to(torch_dtype).requires_grad_(True)
    targets = torch.randint(0, 1000, (300,), generator=generator)

    log_probs, entropy, is_top1 = chunked_loss.head_log_probs(hidden, weight, bias, targets)
    (-log_probs.sum() + 0.25 * entropy.sum()).backward()
    expected, _ = _full_logits_reference(hidden, weight, bias, targets, entropy_weight=0.25)

    assert hidden.grad.dtype == torch_dtype
    scale = float(expected.abs().max())
    assert scale > 0
    assert float((hidden.grad.float() - expected).abs().max()) <= tolerance * scale


def test_a_trainable_lm_head_still_gets_its_weight_gradient():
    """Where the lm_head itself trains (full fine-tuning, modules_to_save), the compact head's
    backward hands over to TRL's, which also returns the weight's gradient."""
    import torch

    from cpuft.fastpaths.chunked_loss import head_log_probs

    generator = torch.Generator().manual_seed(4)
    weight = (torch.randn(700, 32, generator=generator) * 0.3).requires_grad_(True)
    hidden = torch.randn(50, 32, generator=generator).requires_grad_(True)
    targets = torch.randint(0, 700, (50,), generator=generator)
    log_probs, _, _ = head_log_probs(hidden, weight, None, targets)
    (-log_probs.sum()).backward()
    expected_hidden, expected_weight = _full_logits_reference(hidden, weight, None, targets, entropy_weight=0.0)
    assert torch.allclose(hidden.grad, expected_hidden, atol=1e-5)
    assert torch.allclose(weight.grad, expected_weight, atol=1e-5)


def test_a_micro_batch_without_labels_gives_zero_gradients():
    """Every position masked (a micro-batch of prompts only): the head sees no rows, and its
    backward still returns a gradient of the right (empty) shape, so the step goes on."""
    import torch

    from cpuft.fastpaths.chunked_loss import head_backward_rows, head_log_probs

    assert head_backward_rows(0, 151_936, 2) == 1
    weight = torch.randn(500, 32).bfloat16()
    hidden = torch.randn(0, 32).bfloat16().requires_grad_(True)
    log_probs, entropy, is_top1 = head_log_probs(hidden, weight, None, torch.zeros(0, dtype=torch.long))
    assert log_probs.shape == entropy.shape == is_top1.shape == (0,)
    log_probs.sum().backward()
    assert hidden.grad.shape == (0, 32)
