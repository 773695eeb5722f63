"""Linear probes for binding: does a text encoder's per-token state say which colour goes with which object?

    python -m bench.shapes.probe [--assets assets/shapes] [--readers lm-all lm-last base] [--toy-clip FOLDER]
                                 [--lm FOLDER] [--offset 0] [--train 2000] [--test 500] [--out outputs/shapes-probe]
                                 [--holdout pairings|scenes]

For every object of a two-object caption (pair and relation scenes: "a red circle left of a blue square"),
the probe reads the encoder's state at that object's noun token (the shape word; objects are found in the
order the caption mentions them) and predicts the object's colour, one of six, with a multinomial logistic
regression (standardised features, L2). It is trained on train-split captions and scored on held-out-split
captions; `heldout pairs` scores only the objects whose colour-shape pairing never occurs in training
("white triangle"), the compositional case. Both come from the --assets base's design of the split (`--holdout`
overrides it; bench/shapes/splits.py): with "scenes", the shipped one, held-out pairings occur in training
captions, alone only. A state that is a
function of its own token id (the bag-of-words base) can only guess from the shape: near chance. A state that
mixed in its context can bind.

Readers (what the adapter or the UNet gets to see):
    lm-all   the tiny LM's states of every block (embedding output included), each RMS-normalised as the
             adapter's per-layer normalisation does, concatenated: what all-layer fusion can draw on
    lm-last  the tiny LM's last block only (pre final norm): what last-layer fusion sees
             (both read `--lm FOLDER` if given, e.g. a `python -m bench.shapes.tiny_lm` build, else the assets'
             tiny LM; the captions are always the plain ones, as the adapter sees them)
    base     the base model's own text encoder (`last_hidden_state`, 77 tokens, no attention mask, as SD)
    toy-clip a toy CLIP text encoder folder (bench.shapes.toy_clip), read like the base's
The shuffled control trains the same probe on permuted training labels: it must land near chance (1/6).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .splits import HOLDOUTS, holdout_named

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

__all__ = ["LinearProbe", "binding_objects", "fit_probe", "noun_positions", "probe_reader", "single_token_id"]

logger = logging.getLogger(__name__)

TWO_OBJECT_KINDS = ("pair", "relation")
READERS = ("lm-all", "lm-last", "base", "toy-clip")

# captions -> (states [B, T, D], token ids [B, T]); each reader also knows the noun token ids
Reader = Callable[[list[str]], "tuple[torch.Tensor, torch.Tensor]"]


@dataclass
class LinearProbe:
    """Standardise, then a linear map to class logits."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor  # [D, K]
    bias: torch.Tensor  # [K]

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return (((x - self.mean) / self.std) @ self.weight + self.bias).argmax(-1)

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return float((self.predict(x) == y).float().mean()) if len(y) else float("nan")


def fit_probe(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float = 1e-3, steps: int = 100) -> LinearProbe:
    """Multinomial logistic regression by full-batch L-BFGS on standardised features (deterministic)."""
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y) or len(y) == 0:
        raise ValueError(f"fit_probe needs features [n, d] and labels [n] with n > 0, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    if int(y.min()) < 0 or int(y.max()) >= classes:
        raise ValueError(f"labels must lie in [0, {classes}), got {int(y.min())}..{int(y.max())}")
    x = x.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    weight = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ weight + bias, y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return LinearProbe(mean.float(), std.float(), weight.detach().float(), bias.detach().float())


def single_token_id(tokenizer, word: str) -> int:
    """The id of `word` as one token of this tokenizer (a shape word inside a caption); ValueError otherwise."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(f"{word!r} is {len(ids)} tokens for this tokenizer; the probe reads one state per noun "
                         f"and needs every shape word to be a single token")
    return ids[0]


def noun_positions(ids: list[int], nouns: list[int], start: int = 0) -> list[int]:
    """Positions of the noun ids in mention order: each searched after the previous one, from `start`."""
    positions, at = [], start
    for noun in nouns:
        try:
            at = ids.index(noun, at)
        except ValueError:
            raise ValueError(f"token {noun} does not occur after position {at} in {ids}") from None
        positions.append(at)
        at += 1
    return positions


def binding_objects(captions: list[str], kinds: tuple[str, ...] = TWO_OBJECT_KINDS) -> list[tuple[str, list]]:
    """[(caption, [ObjectSpec in mention order])] for the captions of the given kinds."""
    from .captions import parse_caption

    out = []
    for caption in captions:
        spec = parse_caption(caption)
        if spec.kind in kinds:
            out.append((caption, list(spec.objects)))
    return out


def features(reader: Reader, tokenizer, items: list[tuple[str, list]], batch_size: int = 256,
             start: int = 0, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
    """(states at each object's noun, or `offset` tokens after it, [n, D], colour labels [n], (colour, shape) per row).

    A causal encoder may bind an adjective to its noun only at a later token (the one that reads both);
    `offset` 1 reads the token right after the noun.
    """
    from .captions import COLOURS, SHAPES

    noun_id = {shape: single_token_id(tokenizer, shape) for shape in SHAPES}
    rows, labels, pairs = [], [], []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        with torch.no_grad():
            states, ids = reader([c for c, _ in chunk])
        for b, (_, objects) in enumerate(chunk):
            where = noun_positions(ids[b].tolist(), [noun_id[o.shape] for o in objects], start)
            for o, position in zip(objects, where):
                if position + offset >= states.shape[1]:
                    raise ValueError(f"offset {offset} reads past the end of {ids.shape[1]} tokens; use a smaller one")
                rows.append(states[b, position + offset].float())
                labels.append(COLOURS.index(o.colour))
                pairs.append((o.colour, o.shape))
    return torch.stack(rows), torch.tensor(labels), pairs


def clip_reader(folder: Path) -> tuple[Reader, object]:
    """A diffusers-style folder's text_encoder/ + tokenizer/ (the base, or a toy CLIP): last_hidden_state."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from .tiny_base import tokenize

    encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True).eval()
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)

    def read(captions: list[str]):
        ids = tokenize(tokenizer, captions)
        return encoder(ids).last_hidden_state, ids
    return read, tokenizer


def lm_reader(folder: Path, layers: str) -> tuple[Reader, object]:
    """The tiny LM through the adapter's own template and state extraction; `layers` is 'all' or 'last'."""
    from adapter import TemplateConfig, load_llm
    from adapter.model import rms_normalize
    from adapter.template import tokenize_prompts

    llm = load_llm(folder)
    template = TemplateConfig()

    def read(captions: list[str]):
        tokens = tokenize_prompts(llm.tokenizer, template, captions)
        states = rms_normalize(llm.hidden_states(tokens.input_ids, tokens.attention_mask).float())  # [B, L+1, T, H]
        if layers == "last":
            states = states[:, -1]
        else:
            states = states.permute(0, 2, 1, 3).flatten(2)  # [B, T, (L+1) H]
        return states, tokens.input_ids
    return read, llm.tokenizer


def probe_reader(reader: Reader, tokenizer, train: list[tuple[str, list]], test: list[tuple[str, list]],
                 heldout_pairs: frozenset, seed: int = 0, l2: float = 1e-3, offset: int = 0) -> dict:
    """Fit on `train`, score on `test` (all objects, and the held-out colour-shape pairs), plus the shuffled control."""
    from .captions import COLOURS

    x_train, y_train, _ = features(reader, tokenizer, train, offset=offset)
    x_test, y_test, pairs = features(reader, tokenizer, test, offset=offset)
    probe = fit_probe(x_train, y_train, len(COLOURS), l2)
    novel = torch.tensor([p in heldout_pairs for p in pairs])
    shuffled = y_train[torch.randperm(len(y_train), generator=torch.Generator().manual_seed(seed))]
    return {"dims": int(x_train.shape[1]), "train_objects": len(y_train), "test_objects": len(y_test),
            "heldout_pair_objects": int(novel.sum()),
            "train_accuracy": probe.accuracy(x_train, y_train),
            "test_accuracy": probe.accuracy(x_test, y_test),
            "heldout_pair_accuracy": probe.accuracy(x_test[novel], y_test[novel]),
            "shuffled_control": fit_probe(x_train, shuffled, len(COLOURS), l2).accuracy(x_test, y_test)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.shapes.probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets", type=Path, default=Path("assets/shapes"))
    parser.add_argument("--readers", nargs="*", default=["lm-all", "lm-last", "base"], choices=READERS[:3],
                        help="built-in readers (none: only the --toy-clip folders)")
    parser.add_argument("--toy-clip", type=Path, action="append", default=[],
                        help="a toy CLIP folder (bench.shapes.toy_clip); repeat to compare several")
    parser.add_argument("--lm", type=Path, default=None,
                        help="the LM folder the lm-* readers read (default: the assets' tiny-lm), e.g. one built by "
                             "`python -m bench.shapes.tiny_lm --out FOLDER`")
    parser.add_argument("--train", type=int, default=2000, help="train-split scenes to draw (two-object ones are used)")
    parser.add_argument("--test", type=int, default=500, help="held-out-split scenes to draw")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--l2", type=float, default=1e-3,
                        help="L2 penalty on the probe's weights (standardised features)")
    parser.add_argument("--offset", type=int, default=0,
                        help="read the state this many tokens after each noun (0: at the noun)")
    parser.add_argument("--out", type=Path, default=None, help="write results.json and results.md here")
    parser.add_argument("--holdout", choices=HOLDOUTS, default=None,
                        help="the split design train and held-out captions come from (bench/shapes/splits.py; "
                             "default: the --assets base's own, or pairings without assets)")
    args = parser.parse_args(argv)
    if not args.readers and not args.toy_clip:
        parser.error("nothing to probe: give --readers and/or --toy-clip FOLDER")
    if args.l2 < 0:
        parser.error(f"--l2 must be non-negative, got {args.l2}")
    if args.offset < 0:
        parser.error(f"--offset must be non-negative (a causal state never sees later tokens), got {args.offset}")
    if args.train < 1 or args.test < 1:
        parser.error(f"--train and --test must be at least 1, got {args.train} and {args.test}")
    if args.lm is not None:
        if not any(r.startswith("lm-") for r in args.readers):
            parser.error("--lm is read by the lm-all / lm-last readers: add them to --readers")
        if not (args.lm / "config.json").is_file():
            parser.error(f"{args.lm} is not an LM folder (no config.json): build one with "
                         f"`python -m bench.shapes.tiny_lm --out {args.lm}`")
    needs_assets = "base" in args.readers or (args.lm is None and bool(args.readers))
    if needs_assets and not (args.assets / "manifest.json").is_file():
        parser.error(f"{args.assets} holds no shapes assets (no manifest.json): run `make shapes-assets` first")
    for folder in args.toy_clip:
        if not (folder / "text_encoder" / "config.json").is_file():
            parser.error(f"{folder} is not a toy CLIP folder (no text_encoder/config.json): train one with "
                         f"`python -m bench.shapes.toy_clip --out {folder}`")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from .assets import BASE_FOLDER, LM_FOLDER, holdout_of
    from .report import markdown_table
    from .scenes import generate

    heldout = holdout_named(args.holdout) if args.holdout else holdout_of(args.assets, if_missing="pairings")
    torch.set_num_threads(1)
    train = binding_objects([s.caption for s in generate("train", args.train, args.seed, heldout)])
    test = binding_objects([s.caption for s in generate("heldout", args.test, args.seed, heldout)])
    readers: dict[str, Callable] = {}
    lm_folder = args.lm if args.lm is not None else args.assets / LM_FOLDER
    for name in args.readers:
        readers[name] = (lambda: clip_reader(args.assets / BASE_FOLDER)) if name == "base" else (
            lambda layers=name.split("-")[1]: lm_reader(lm_folder, layers))
    for folder in args.toy_clip:
        readers[f"toy-clip {folder}"] = lambda folder=folder: clip_reader(folder)
    results = {}
    for name, make in readers.items():
        read, tokenizer = make()
        results[name] = probe_reader(read, tokenizer, train, test, heldout.colour_shapes, args.seed, args.l2,
                                     args.offset)
        logger.info("%s: %s", name, results[name])
    table = markdown_table(
        ["reader", "dims", "held-out objects", "held-out pairs only", "shuffled control", "train"],
        [[n, r["dims"], r["test_accuracy"], r["heldout_pair_accuracy"], r["shuffled_control"], r["train_accuracy"]]
         for n, r in results.items()])
    where = "at its noun" if args.offset == 0 else f"{args.offset} token(s) after its noun"
    text = (f"Colour of each object from the state {where}, {results[next(iter(results))]['train_objects']} "
            f"train objects, {results[next(iter(results))]['test_objects']} held-out objects of the \"{heldout.name}\" "
            "split (chance 1/6 = 0.167).\n\n"
            + table + "\n")
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
        (args.out / "results.md").write_text(text, encoding="utf-8")
    return results


if __name__ == "__main__":
    main()
