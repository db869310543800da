"""The context-rot study's evaluations: episodes (research/needles.py) scored by one model, row by row.

Each evaluation returns rows (dicts) that become a CSV and a figure. The episodes of a cell are drawn from a
seed fixed by the cell (not by the model), so every model answers exactly the same episodes.

An answer is correct when greedy decoding reproduces the value's ids exactly. That is computed teacher-
forced: one forward pass over the prompt followed by the answer, correct when the argmax at every answer
position is the answer's next id, which is what greedy decoding would emit token by token.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from configs.context_rot import Study
from models.attention_probe import last_query_attention
from models.config import ModelConfig
from models.transformer import Transformer
from research.needles import Episode, Pieces, episode, min_length

Row = dict[str, Any]


@dataclasses.dataclass
class Model:
    """One model under evaluation and its tokenizer's task pieces."""
    cfg: ModelConfig
    params: Any
    pieces: Pieces
    prefix: np.ndarray  # [0 or 1]: bos, for tokenizers whose models always saw it first

    def __post_init__(self) -> None:
        self.forward: Callable = jax.jit(lambda p, ids: Transformer(self.cfg).apply({"params": p}, ids)[0])


def cell_rng(*cell: Any) -> np.random.Generator:
    """The episodes' generator of a cell: a function of the cell's name and coordinates only."""
    return np.random.default_rng([zlib.crc32(repr(cell).encode())])


def greedy_matches(model: Model, episodes: Sequence[Episode], answers: Sequence[np.ndarray], batch: int) -> np.ndarray:
    """[n] bool: does greedy decoding after episode i's prompt emit answers[i] exactly? Prompts of equal length."""
    out = []
    for start in range(0, len(episodes), batch):
        eps, ans = episodes[start:start + batch], answers[start:start + batch]
        width = max(len(a) for a in ans)
        prompt = len(model.prefix) + len(eps[0].tokens)
        ids = np.zeros((len(eps), prompt + width), np.int32)
        for i, (ep, a) in enumerate(zip(eps, ans)):
            ids[i, :prompt + len(a)] = np.concatenate([model.prefix, ep.tokens, a])
        predicted = np.asarray(jnp.argmax(model.forward(model.params, ids)[:, prompt - 1:-1], -1))
        out += [bool(np.all(predicted[i, :len(a)] == a)) for i, a in enumerate(ans)]
    return np.array(out, bool)


def accuracy(model: Model, episodes: Sequence[Episode], study: Study) -> tuple[float, int]:
    correct = greedy_matches(model, episodes, [ep.answer for ep in episodes], study.batch)
    return float(correct.mean()), len(correct)


def episodes(model: Model, study: Study, cell: tuple, **kwargs: Any) -> list[Episode]:
    rng = cell_rng(*cell)
    return [episode(model.pieces, rng, **kwargs) for _ in range(study.examples)]


def niah(model: Model, study: Study) -> list[Row]:
    """Accuracy over context length x needle depth (Kamradt's heatmap)."""
    rows = []
    for length in study.lengths:
        for depth in study.depths:
            acc, n = accuracy(model, episodes(model, study, ("niah", length, depth), length=length, depth=depth), study)
            rows.append({"length": length, "depth": depth, "accuracy": acc, "n": n})
    return rows


def distractors(model: Model, study: Study) -> list[Row]:
    """Accuracy against length for each number of distractors, and, when wrong, whose value was answered.
    A length is left out for a count whose facts would fill more than half of it (no haystack to speak of)."""
    rows = []
    for length in study.lengths:
        for count in study.distractors:
            if min_length(model.pieces, 1 + count) > length // 2 + len(model.pieces.question("x")):
                continue
            eps = episodes(model, study, ("distractors", length, count), length=length, distractors=count)
            answered = {kind: 0 for kind in ("needle", "near_miss", "stale", "other")}
            for kind in ("needle", "near_miss", "stale"):
                # A value may be answered once at most: greedy decoding emits one sequence.
                values = [[f.value for _, _, f in ep.spans if f.kind == kind] for ep in eps]
                for j in range(max(map(len, values))):
                    pick = [i for i, v in enumerate(values) if len(v) > j]
                    hits = greedy_matches(model, [eps[i] for i in pick],
                                          [model.pieces.answer(values[i][j]) for i in pick], study.batch)
                    answered[kind] += int(hits.sum())
            answered["other"] = len(eps) - sum(answered.values())
            rows.append({"length": length, "distractors": count, "accuracy": answered["needle"] / len(eps),
                         "n": len(eps), **{f"answered_{k}": v for k, v in answered.items()}})
    return rows


def lost_in_the_middle(model: Model, study: Study) -> list[Row]:
    """Accuracy against the gold fact's position among k facts, with closed-book (the question alone) and
    oracle (the gold fact alone, then the question) references."""
    rows = []
    for k in study.items:
        length = k * study.item_tokens
        for gold in sorted({int(round(x)) for x in np.linspace(0, k - 1, study.gold_positions)}):
            eps = episodes(model, study, ("litm", k, gold), length=length, others=k - 1, gold_index=gold)
            acc, n = accuracy(model, eps, study)
            rows.append({"items": k, "length": length, "position": gold + 1, "setting": "context", "accuracy": acc,
                         "n": n})
    for setting in ("closed_book", "oracle"):
        rng = cell_rng("litm", setting)
        eps = [reference_episode(model.pieces, rng, setting) for _ in range(study.examples)]
        acc, n = accuracy(model, eps, study)
        rows.append({"items": 0, "length": len(eps[0].tokens), "position": 0, "setting": setting, "accuracy": acc,
                     "n": n})
    return rows


def reference_episode(pieces: Pieces, rng: np.random.Generator, setting: str) -> Episode:
    """closed_book: the question alone; oracle: the gold fact, then the question."""
    full = episode(pieces, rng, length=64, depth=1.0)
    (start, end), question = full.needle, full.tokens[-len(pieces.question(full.key)):]
    tokens = question if setting == "closed_book" else np.concatenate([full.tokens[start:end], question])
    return dataclasses.replace(full, tokens=tokens, spans=(), haystack_tokens=0)


def haystack_and_similarity(model: Model, study: Study) -> list[Row]:
    """Accuracy against length for a coherent or sentence-shuffled haystack, with the needle worded like the
    question (`same`) or not (`paraphrase`): Chroma's two manipulations."""
    rows = []
    for length in study.lengths:
        for haystack in ("coherent", "shuffled"):
            for template in ("same", "paraphrase"):
                eps = episodes(model, study, ("haystack", length, haystack, template), length=length,
                               shuffled=haystack == "shuffled", template=template)
                acc, n = accuracy(model, eps, study)
                rows.append({"length": length, "haystack": haystack, "needle": template, "accuracy": acc, "n": n})
    return rows


def dilution(model: Model, study: Study) -> list[Row]:
    """Per layer: the attention mass that the query answering the question puts on the needle's tokens, and
    its attention entropy (both averaged over heads, then episodes), beside accuracy, against length.

    The query is the position that predicts the value's first non-space id: the prompt's last token, plus
    the answer's leading whitespace ids (our SentencePiece vocabulary spells " 167" as "▁", "1", "6", "7")."""
    rows = []
    lead = leading_space_ids(model)
    for length in study.lengths:
        eps = episodes(model, study, ("dilution", length), length=length)
        acc, n = accuracy(model, eps, study)
        masses, entropies = [], []
        for start in range(0, len(eps), study.batch):
            chunk = eps[start:start + study.batch]
            ids = np.stack([np.concatenate([model.prefix, ep.tokens, ep.answer[:lead]]) for ep in chunk])
            probs = last_query_attention(model.cfg, model.params, ids)  # [layers, B, N, S]
            offset = len(model.prefix)
            needle = np.zeros(ids.shape, bool)
            for i, ep in enumerate(chunk):
                s, e = ep.needle
                needle[i, offset + s:offset + e] = True
            masses.append((probs * needle[None, :, None, :]).sum(-1).mean(-1))  # [layers, B]
            entropies.append(-(probs * np.log(np.maximum(probs, 1e-30))).sum(-1).mean(-1))
        mass, entropy = np.concatenate(masses, 1).mean(1), np.concatenate(entropies, 1).mean(1)
        for layer in range(len(mass)):
            rows.append({"length": length, "layer": layer, "needle_mass": float(mass[layer]),
                         "entropy": float(entropy[layer]), "log_length": float(np.log(length)), "accuracy": acc,
                         "n": n})
    return rows


def leading_space_ids(model: Model) -> int:
    """How many of an answer's first ids spell whitespace only."""
    answer = model.pieces.answer("123")
    return next((i for i in range(len(answer)) if model.pieces.tokenizer.decode(answer[:i + 1].tolist()).strip()),
                0)


EVALUATIONS: dict[str, Callable[[Model, Study], list[Row]]] = {
    "niah": niah, "distractors": distractors, "lost_in_the_middle": lost_in_the_middle,
    "haystack_similarity": haystack_and_similarity, "dilution": dilution}
