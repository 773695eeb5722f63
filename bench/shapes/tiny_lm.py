"""The shapes benchmark's tiny decoder-only LM: a word-level tokenizer and a 4-block Llama, trained on captions.

It stands in for the user's LLM (docs/design.md section 6): a normal Hugging Face folder (config.json,
model.safetensors, tokenizer.json + tokenizer_config.json with a chat template) that
`adapter.load_llm(folder)` loads exactly like a downloaded Llama, so the adapter sees it through the
same code path, chat template and user-span search included.

- Tokenizer: word level (`tokenizers` WordLevel over lowercase words and punctuation), trained on the
  train-split captions. Every word of the grammar occurs in training captions, so held-out prompts
  never hit `<unk>`; lowercasing keeps offsets, so "A Red Circle" works too. It has `<s>`, `</s>`,
  `<pad>`, `<unk>` and a tiny chat template (`<s><|user|>...<|end|>`) whose role markers are special
  tokens, so the adapter's template code (render with a marker, find the span by offsets) is exercised.
- Model: `LlamaForCausalLM`, hidden 128, 4 blocks, 4 heads with 2 KV heads (grouped-query attention,
  as in real Llama 3 / Qwen 2.5), tied embeddings. About 0.6M parameters.
- Training: next-token prediction on the chat-rendered train captions (what the adapter will feed it),
  loss on the caption's tokens and the closing markers only (the template prefix is constant). The
  reported perplexity is over the same tokens of in-distribution (val) and held-out captions.

    folder, stats = build_tiny_lm("assets/shapes/tiny-lm", LMConfig(), seed=0)
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .fitting import loss_summary, optimizer_step
from .scenes import generate

__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "LMConfig", "build_tiny_lm", "build_tokenizer", "train_lm"]

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
# A minimal chat format: role marker, content, end marker. The adapter renders prompts through it.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


@dataclass(frozen=True)
class LMConfig:
    """Sizes and training budget. The defaults are the shipped model; `quick()` is for tests (seconds)."""

    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    train_captions: int = 20_000
    eval_captions: int = 1_000
    steps: int = 600
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 30

    @classmethod
    def quick(cls) -> "LMConfig":
        return cls(hidden_size=32, intermediate_size=64, num_layers=2, train_captions=200, eval_captions=50,
                   steps=5, batch_size=16, warmup=1)


def build_tokenizer(captions: list[str]):
    """A word-level PreTrainedTokenizerFast over the captions' words, with BOS/EOS/PAD/UNK and the chat template."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()  # keeps offsets (the adapter's span search needs them)
    backend.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation runs: "left," -> "left" ","
    backend.train_from_iterator(captions, trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS)))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        chat_template=CHAT_TEMPLATE, model_max_length=256,
    )


def _make_model(tokenizer, config: LMConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def _batch(tokenizer, captions: list[str]) -> dict[str, torch.Tensor]:
    """Chat-rendered captions + EOS, right-padded; labels only on the caption and what follows it."""
    rows, labels = [], []
    prefix = len(tokenizer.apply_chat_template([{"role": "user", "content": ""}], tokenize=False).split("<|end|>")[0])
    for caption in captions:
        text = tokenizer.apply_chat_template([{"role": "user", "content": caption}], tokenize=False)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoded["input_ids"] + [tokenizer.eos_token_id]
        # the template prefix (<s><|user|>) is the same in every row: predicting it teaches nothing
        first = next(i for i, (start, _) in enumerate(encoded["offset_mapping"]) if start >= prefix)
        rows.append(ids)
        labels.append([-100] * first + ids[first:])
    length = max(map(len, rows))
    pad = lambda seq, value: seq + [value] * (length - len(seq))  # noqa: E731
    return {
        "input_ids": torch.tensor([pad(r, tokenizer.pad_token_id) for r in rows]),
        "attention_mask": torch.tensor([pad([1] * len(r), 0) for r in rows]),
        "labels": torch.tensor([pad(lab, -100) for lab in labels]),
    }


@torch.no_grad()
def perplexity(model, tokenizer, captions: list[str], batch_size: int = 256) -> float:
    """exp(mean next-token loss) over the labelled tokens of the captions (see `_batch`)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(captions), batch_size):
        batch = _batch(tokenizer, captions[i:i + batch_size])
        n = int((batch["labels"][:, 1:] != -100).sum())  # the loss is averaged over shifted labels
        total += float(model(**batch).loss) * n
        count += n
    return math.exp(total / count)


def train_lm(model, tokenizer, captions: list[str], config: LMConfig, seed: int) -> dict:
    """AdamW with linear warmup and cosine decay over `config.steps` batches; returns loss statistics."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / config.warmup) * 0.5
                                                 * (1 + math.cos(math.pi * min(step / config.steps, 1.0))))
    model.train()
    losses = []
    for step in range(config.steps):
        picks = torch.randint(len(captions), (config.batch_size,), generator=generator).tolist()
        loss = model(**_batch(tokenizer, [captions[i] for i in picks])).loss
        losses.append(optimizer_step(loss, optimizer, schedule, clip_params=model.parameters()))
        if step % 100 == 0 or step == config.steps - 1:
            logger.info("tiny LM step %d/%d loss %.4f", step + 1, config.steps, losses[-1])
    model.eval()
    return loss_summary(losses, "final_train_loss")


def build_tiny_lm(dest: str | Path, config: LMConfig = LMConfig(), seed: int = 0) -> tuple[Path, dict]:
    """Train tokenizer and model on train-split captions and save the HF folder at `dest` (must not exist)."""
    dest = Path(dest)
    start = time.perf_counter()
    torch.manual_seed(seed)
    captions = [s.caption for s in generate("train", config.train_captions, seed)]
    tokenizer = build_tokenizer(captions)
    model = _make_model(tokenizer, config)
    stats = train_lm(model, tokenizer, captions, config, seed)
    val = [s.caption for s in generate("val", config.eval_captions, seed)]
    heldout = [s.caption for s in generate("heldout", config.eval_captions, seed)]
    stats.update(
        val_perplexity=perplexity(model, tokenizer, val),
        heldout_perplexity=perplexity(model, tokenizer, heldout),
        vocab_size=len(tokenizer),
        parameters=sum(p.numel() for p in model.parameters()),
        train_seconds=round(time.perf_counter() - start, 1),
        config=asdict(config),
    )
    dest.mkdir(parents=True)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    logger.info("tiny LM: val perplexity %.3f, held-out %.3f, %d parameters, %.0f s -> %s",
                stats["val_perplexity"], stats["heldout_perplexity"], stats["parameters"], stats["train_seconds"], dest)
    return dest, stats
