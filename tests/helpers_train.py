"""Tiny offline models, tokenizers and data for the trainer and CLI tests (no hub, no downloads).

The tokenizer is a `tokenizers` WordLevel model over a fixed word list, wrapped in PreTrainedTokenizerFast,
with special tokens and a chat template set here; models are built from configs and saved to a folder.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SUBJECTS = ["the cat", "a dog", "my friend", "the teacher", "a bird", "the child"]
VERBS = ["sees", "likes", "finds", "takes", "wants", "makes"]
OBJECTS = ["the ball", "a book", "some bread", "the red box", "a green apple", "the small key"]
POSITIVE = ["good", "great", "happy", "lovely", "nice", "fine"]
NEGATIVE = ["bad", "awful", "sad", "poor", "ugly", "wrong"]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} ." for _ in range(n)]


def vocabulary() -> list[str]:
    words = set()
    for phrase in SUBJECTS + VERBS + OBJECTS + POSITIVE + NEGATIVE:
        words.update(phrase.split())
    words.update([".", "?", "answer", "question", "is", "it", "yes", "no", "this", "was"])
    words.update(str(i) for i in range(10))
    return sorted(words)


def make_tokenizer(directory: str | Path, classifier: bool = False):
    """A word-level fast tokenizer saved to ``directory``: [PAD]=0, [UNK]=1, <s>, </s>, [CLS], [SEP], roles"""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "<s>", "</s>", "[CLS]", "[SEP]", "<|user|>", "<|assistant|>", "<|system|>"]
    vocab = {tok: i for i, tok in enumerate(specials + vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if classifier:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="<s>",
        eos_token="</s>",
        cls_token="[CLS]",
        sep_token="[SEP]",
        additional_special_tokens=specials[6:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(directory))
    return fast


def make_causal_lm(directory: str | Path, family: str = "llama", max_positions: int = 128, seed: int = 0):
    """A 2-layer Llama (or GPT-2) with the test tokenizer, saved to ``directory``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    tokenizer = make_tokenizer(directory)
    torch.manual_seed(seed)
    if family == "llama":
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=max_positions,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        )
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_embd=48,
            n_layer=2,
            n_head=4,
            n_positions=max_positions,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        )
        model = GPT2LMHeadModel(config)
    model.save_pretrained(directory)
    return model, tokenizer


def make_classifier(directory: str | Path, num_labels: int = 2, seed: int = 0):
    """A 2-layer BERT sequence classifier with the test tokenizer ([CLS] ... [SEP]) saved to ``directory``"""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    directory = Path(directory)
    tokenizer = make_tokenizer(directory, classifier=True)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=64,
        num_labels=num_labels,
        pad_token_id=0,
    )
    model = BertForSequenceClassification(config)
    model.save_pretrained(directory)
    return model, tokenizer


def write_jsonl(path: str | Path, records: list[dict]) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def text_records(n: int = 64, seed: int = 0) -> list[dict]:
    return [{"text": s} for s in sentences(n, seed)]


def sentiment_records(n: int = 80, seed: int = 0) -> list[dict]:
    """'this was <adjective> .' with label 1 for positive words, 0 for negative: learnable in a few steps."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.randrange(2)
        word = rng.choice(POSITIVE if label else NEGATIVE)
        out.append({"text": f"{rng.choice(SUBJECTS)} was {word} .", "label": label})
    return out
