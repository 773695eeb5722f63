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
  reported perplexity is over the same tokens of in-distribution (val) and held-out plain captions.
- Binding continuations (`LMConfig.binding_continuations`, off by default): that share of the
  two-object training captions gets a sentence about its scene that only the binding predicts,
  "a red circle and a blue square . the circle is red ." (`binding_continuation`), inside the caption
  span, so the loss covers it. Next-token prediction of captions alone never needs "which colour goes with
  which object"; these questions do. Measured, they teach the LM to look the answer up when asked rather than
  to store the binding in the caption's states (docs/shapes_oracle_probe.md). The adapter sees plain captions.
- All pairings (`LMConfig.all_pairings`, off by default): the LM's training text is drawn over every
  colour-shape pairing and relation, the held-out ones included, as a real LLM's pretraining text mentions
  white triangles whatever a diffusion dataset holds out. The images (UNet, adapter data) keep the split.
  Without it, an LM can answer "the triangle is" from the colours triangles had in training instead of
  reading the caption, and held-out pairings are exactly where that memorised prior is wrong.
- Binding auxiliary loss (`LMConfig.binding_aux`, off by default; the shipped assets' LM is trained with it at
  1.0, bench/shapes/shipped.py): a linear head on the last block's state at each noun of a two-object caption
  predicts that object's colour, trained with the LM and thrown away after. It asks the caption's own states, the ones the adapter reads, to hold the binding, where real
  LLMs are known to keep it. Labels exist only for pairings outside the held-out split, so a probe's score on
  held-out pairings (bench.shapes.probe) still measures a binding the LM computes, not one it was shown.

    folder, stats = build_tiny_lm("assets/shapes-bow/tiny-lm", LMConfig(), seed=0)
    python -m bench.shapes.tiny_lm --out outputs/tiny-lm-binding --binding-continuations 0.5 [--steps 600]
    python -m bench.shapes.tiny_lm --out outputs/tiny-lm-aux --binding-aux 1.0 [--all-pairings]
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .fitting import loss_summary, optimizer_step
from .scenes import PlacedObject, Sample, generate
from .splits import HELDOUT, HeldOut

__all__ = ["CHAT_TEMPLATE", "CONTINUATION_WORDS", "SPECIAL_TOKENS", "LMConfig", "binding_continuation",
           "build_tiny_lm", "build_tokenizer", "noun_colours", "text_samples", "train_lm"]

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
    """Sizes and training budget. The defaults are the bag-of-words assets' LM (the shipped LM: binding_aux 1.0 and
    2,000 steps, bench/shapes/shipped.py); `quick()` is for tests (seconds)."""

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
    # share of the training captions that get a binding continuation (0 = plain captions, the default)
    binding_continuations: float = 0.0
    # loss weight of a continuation's answer word against 1 for every other token: about 1 token in 20 is an
    # answer, the only one that needs the binding, so at 1 its signal is a few percent of the loss
    answer_weight: float = 1.0
    # draw the training text over every pairing, the held-out ones included (see the module docstring)
    all_pairings: bool = False
    # weight of the binding auxiliary loss against the next-token loss (0 = off; see the module docstring)
    binding_aux: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.binding_continuations <= 1.0:
            raise ValueError(f"binding_continuations is a share of the captions, in [0, 1]; got "
                             f"{self.binding_continuations}")
        if not self.answer_weight > 0:
            raise ValueError(f"answer_weight must be positive, got {self.answer_weight}")
        if not self.binding_aux >= 0:
            raise ValueError(f"binding_aux is a loss weight, 0 (off) or positive; got {self.binding_aux}")

    @classmethod
    def quick(cls) -> "LMConfig":
        return cls(hidden_size=32, intermediate_size=64, num_layers=2, train_captions=200, eval_captions=50,
                   steps=5, batch_size=16, warmup=1)


# Every word a continuation can use; added to the tokenizer's corpus whenever continuations are on, so a
# rare question form can never be <unk>.
CONTINUATION_WORDS = ". the one is a left right top bottom"
# position question -> (axis of the grid cell, whether the smaller index is meant)
_POSITION_WORDS = {"left": (1, True), "right": (1, False), "top": (0, True), "bottom": (0, False)}


def binding_continuation(objects: tuple[PlacedObject, ...] | list[PlacedObject], rng: np.random.Generator,
                         positions_asserted: bool = False) -> str | None:
    """A sentence about one object of a scene that only the binding predicts, or None if the scene has none.

    Read from the scene's objects, not from its caption: "the circle is red ." (colour given shape),
    "the red one is a circle ." (shape given colour), "the left one is blue ." / "the top one is a square ."
    (an attribute given the position, when the two objects differ along that axis; only where the caption
    asserts where the objects are, `positions_asserted`, i.e. relation captions: a pair caption does not say
    which object is left, so the answer would be a coin flip that teaches nothing). A question is only
    asked when its key picks out exactly one object and its answer differs from another object's, so that
    the answer is neither ambiguous nor guessable without knowing which attribute goes with which object.
    Scenes whose objects are all alike (one object, or n identical ones) get None. One question is drawn
    uniformly from those that qualify.
    """
    questions = []
    for key, answer in (("shape", "colour"), ("colour", "shape")):
        for o in objects:
            unique = sum(getattr(p, key) == getattr(o, key) for p in objects) == 1
            if unique and any(getattr(p, answer) != getattr(o, answer) for p in objects):
                subject = f"the {o.shape}" if key == "shape" else f"the {o.colour} one"
                questions.append(f"{subject} is {o.colour if answer == 'colour' else 'a ' + o.shape} .")
    if positions_asserted and len(objects) == 2:
        for word, (axis, smaller) in _POSITION_WORDS.items():
            a, b = sorted(objects, key=lambda p: p.cell[axis], reverse=not smaller)
            if a.cell[axis] == b.cell[axis]:
                continue
            for answer in ("colour", "shape"):
                if getattr(a, answer) != getattr(b, answer):
                    questions.append(f"the {word} one is {a.colour if answer == 'colour' else 'a ' + a.shape} .")
    return questions[rng.integers(len(questions))] if questions else None


def training_texts(samples: list[Sample], share: float, seed: int) -> list[str]:
    """The samples' captions; with probability `share` each one that has a continuation gets it appended."""
    if share == 0:
        return [s.caption for s in samples]
    rng = np.random.default_rng([seed, 17])  # its own stream: the scenes themselves do not move
    texts = []
    for sample in samples:
        continuation = (binding_continuation(sample.objects, rng, sample.spec.relation is not None)
                        if rng.random() < share else None)
        texts.append(sample.caption if continuation is None else f"{sample.caption} . {continuation}")
    return texts


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


def _batch(tokenizer, captions: list[str], answer_weight: float = 1.0,
           binding_labels: bool = False) -> dict[str, torch.Tensor]:
    """Chat-rendered captions + EOS, right-padded; labels only on the caption and what follows it; `weights`:
    each label's loss weight, `answer_weight` on the answer word of a text with a binding continuation;
    with `binding_labels`, `colours`: the binding auxiliary loss's labels (`noun_colours`, which parses every
    caption, so only when that loss is on)."""
    rows, labels, weights, colours = [], [], [], []
    prefix = len(tokenizer.apply_chat_template([{"role": "user", "content": ""}], tokenize=False).split("<|end|>")[0])
    for caption in captions:
        text = tokenizer.apply_chat_template([{"role": "user", "content": caption}], tokenize=False)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoded["input_ids"] + [tokenizer.eos_token_id]
        # the template prefix (<s><|user|>) is the same in every row: predicting it teaches nothing
        first = next(i for i, (start, _) in enumerate(encoded["offset_mapping"]) if start >= prefix)
        rows.append(ids)
        labels.append([-100] * first + ids[first:])
        weight = [0.0] * first + [1.0] * (len(ids) - first)
        if has_continuation(caption):
            weight[len(ids) - ANSWER_FROM_END] = answer_weight
        weights.append(weight)
        if binding_labels:
            colours.append(noun_colours(tokenizer, caption, ids, first))
    length = max(map(len, rows))
    pad = lambda seq, value: seq + [value] * (length - len(seq))  # noqa: E731
    batch = {
        "input_ids": torch.tensor([pad(r, tokenizer.pad_token_id) for r in rows]),
        "attention_mask": torch.tensor([pad([1] * len(r), 0) for r in rows]),
        "labels": torch.tensor([pad(lab, -100) for lab in labels]),
        "weights": torch.tensor([pad(w, 0.0) for w in weights]),
    }
    if binding_labels:
        batch["colours"] = torch.tensor([pad(c, -100) for c in colours])
    return batch


def noun_colours(tokenizer, text: str, ids: list[int], start: int) -> list[int]:
    """Per token of `ids`: the colour index (captions.COLOURS) of the object whose noun sits there, for the two
    objects of a pair or relation caption (the text before any continuation); -100 at every other token and at
    a noun whose colour-shape pairing is held out, so no held-out binding is ever a training label."""
    from .captions import COLOURS
    from .probe import binding_objects, noun_positions, single_token_id

    labels = [-100] * len(ids)
    found = binding_objects([text.split(" . ")[0] if has_continuation(text) else text])
    if found:
        objects = found[0][1]
        where = noun_positions(ids, [single_token_id(tokenizer, o.shape) for o in objects], start)
        for o, at in zip(objects, where):
            if (o.colour, o.shape) not in HELDOUT.colour_shapes:
                labels[at] = COLOURS.index(o.colour)
    return labels


# a rendered row ends: ... answer "." <|end|> </s>
ANSWER_FROM_END = 4


def has_continuation(text: str) -> bool:
    """Whether a training text carries a binding continuation ("caption . question answer .")."""
    return text.endswith(" .") and " . " in text


def weighted_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy of the model's `logits` [B, T, V], each label weighted by `batch['weights']`
    (normalised by their sum): with every weight 1 it is the model's own mean loss."""
    labels, weights = batch["labels"][:, 1:], batch["weights"][:, 1:]
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels, ignore_index=-100, reduction="none")
    return (losses * weights).sum() / weights.sum()


def binding_aux_loss(head: torch.nn.Linear, last_states: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of `head` on the last block's states [B, T, H] at the labelled nouns (0 if none is)."""
    labelled = colours != -100
    if not labelled.any():
        return last_states.sum() * 0
    return F.cross_entropy(head(last_states[labelled]).float(), colours[labelled])


@torch.no_grad()
def perplexity(model, tokenizer, captions: list[str], batch_size: int = 256) -> float:
    """exp(mean next-token loss) over the labelled tokens of the captions (see `_batch`)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(captions), batch_size):
        batch = _batch(tokenizer, captions[i:i + batch_size])
        n = int((batch["labels"][:, 1:] != -100).sum())  # the loss is averaged over shifted labels
        total += float(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             labels=batch["labels"]).loss) * n
        count += n
    return math.exp(total / count)


def train_lm(model, tokenizer, captions: list[str], config: LMConfig, seed: int) -> dict:
    """AdamW with linear warmup and cosine decay over `config.steps` batches; returns loss statistics."""
    from .captions import COLOURS

    generator = torch.Generator().manual_seed(seed)
    # the binding head is trained with the LM and not saved: the LM folder stays a plain Llama
    head = torch.nn.Linear(config.hidden_size, len(COLOURS)) if config.binding_aux else None
    params = list(model.parameters()) + (list(head.parameters()) if head is not None else [])
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / config.warmup) * 0.5
                                                 * (1 + math.cos(math.pi * min(step / config.steps, 1.0))))
    model.train()
    losses, aux_losses = [], []
    for step in range(config.steps):
        picks = torch.randint(len(captions), (config.batch_size,), generator=generator).tolist()
        batch = _batch(tokenizer, [captions[i] for i in picks], config.answer_weight, binding_labels=head is not None)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                    output_hidden_states=head is not None)
        # the model's own loss unless answers are weighted, so the default LM is built as it always was
        loss = out.loss if config.answer_weight == 1 else weighted_loss(out.logits, batch)
        if head is not None:
            # hidden_states[-1] is the last block's state after the final norm: a per-feature rescaling of what
            # the probe's lm-last reader sees, which a linear map absorbs
            aux = binding_aux_loss(head, out.hidden_states[-1], batch["colours"])
            aux_losses.append(float(aux.detach()))
            loss = loss + config.binding_aux * aux
        losses.append(optimizer_step(loss, optimizer, schedule, clip_params=params))
        if step % 100 == 0 or step == config.steps - 1:
            logger.info("tiny LM step %d/%d loss %.4f%s", step + 1, config.steps, losses[-1],
                        f" (binding aux {aux_losses[-1]:.4f})" if aux_losses else "")
    model.eval()
    stats = loss_summary(losses, "final_train_loss")
    if aux_losses:
        stats["final_binding_aux_loss"] = loss_summary(aux_losses, "final")["final"]
    return stats


def text_samples(config: LMConfig, seed: int) -> list[Sample]:
    """The scenes whose captions the LM trains on: the train split, or every combination with `all_pairings`."""
    # an empty held-out set makes the "train" split every combination
    text_split = HeldOut(frozenset(), frozenset()) if config.all_pairings else HELDOUT
    return generate("train", config.train_captions, seed, heldout=text_split)


def build_tiny_lm(dest: str | Path, config: LMConfig = LMConfig(), seed: int = 0) -> tuple[Path, dict]:
    """Train tokenizer and model on `text_samples`' captions and save the HF folder at `dest` (must not exist)."""
    dest = Path(dest)
    start = time.perf_counter()
    torch.manual_seed(seed)
    captions = training_texts(text_samples(config, seed), config.binding_continuations, seed)
    tokenizer = build_tokenizer(captions + [CONTINUATION_WORDS] if config.binding_continuations else captions)
    model = _make_model(tokenizer, config)
    stats = train_lm(model, tokenizer, captions, config, seed)
    val = [s.caption for s in generate("val", config.eval_captions, seed)]
    heldout_samples = generate("heldout", config.eval_captions, seed)
    heldout = [s.caption for s in heldout_samples]
    stats.update(
        val_perplexity=perplexity(model, tokenizer, val),
        heldout_perplexity=perplexity(model, tokenizer, heldout),
        vocab_size=len(tokenizer),
        parameters=sum(p.numel() for p in model.parameters()),
        train_seconds=round(time.perf_counter() - start, 1),
        config=asdict(config),
    )
    if config.binding_continuations:
        stats["heldout_continuation_accuracy"] = continuation_accuracy(model, tokenizer, heldout_samples, seed)
    dest.mkdir(parents=True)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    logger.info("tiny LM: val perplexity %.3f, held-out %.3f, %d parameters, %.0f s -> %s",
                stats["val_perplexity"], stats["heldout_perplexity"], stats["parameters"], stats["train_seconds"], dest)
    return dest, stats


def save_stats(folder: str | Path, stats: dict) -> None:
    """The LM's stats.json beside its weights: what `bench.shapes.assets --lm-from` reads."""
    (Path(folder) / "stats.json").write_text(json.dumps(stats, indent=1) + "\n", encoding="utf-8")


@torch.no_grad()
def continuation_accuracy(model, tokenizer, samples: list[Sample], seed: int) -> float:
    """How often the LM's top next token is the answer word of a held-out scene's binding continuation.

    Every sample with a continuation is rendered "caption . question answer ." and the model is scored
    on the answer word alone (the last word before the final "."), greedy, given everything before it.
    """
    texts = [t for t in training_texts(samples, 1.0, seed) if has_continuation(t)]
    if not texts:
        return float("nan")
    model.eval()
    batch = _batch(tokenizer, texts)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    lengths = batch["attention_mask"].sum(1)
    answer_at = lengths - ANSWER_FROM_END
    rows = torch.arange(len(texts))
    predicted = logits[rows, answer_at - 1].argmax(-1)
    return float((predicted == batch["input_ids"][rows, answer_at]).float().mean())


def main(argv: list[str] | None = None) -> dict:
    defaults = LMConfig()
    parser = argparse.ArgumentParser(prog="python -m bench.shapes.tiny_lm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the LM folder to write (must not exist)")
    parser.add_argument("--binding-continuations", type=float, default=defaults.binding_continuations,
                        help="share of training captions that get a continuation only the binding predicts")
    parser.add_argument("--answer-weight", type=float, default=defaults.answer_weight,
                        help="loss weight of a continuation's answer word (other tokens: 1)")
    parser.add_argument("--all-pairings", action="store_true",
                        help="train on text over every colour-shape pairing and relation, the held-out ones included")
    parser.add_argument("--binding-aux", type=float, default=defaults.binding_aux,
                        help="weight of an auxiliary loss asking each noun's state for its object's colour (0: off)")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.out.exists():
        parser.error(f"{args.out} already exists; remove it or choose another --out")
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    try:
        config = replace(defaults, binding_continuations=args.binding_continuations, steps=args.steps,
                         answer_weight=args.answer_weight, all_pairings=args.all_pairings,
                         binding_aux=args.binding_aux)
    except ValueError as err:
        parser.error(str(err))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(1)
    folder, stats = build_tiny_lm(args.out, config, args.seed)
    save_stats(folder, stats)
    print(json.dumps(stats, indent=1))
    return stats


if __name__ == "__main__":
    main()
