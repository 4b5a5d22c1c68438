"""Tiny offline fixtures for the serve tests: a Llama-shaped model built from a config, a byte-level BPE
tokenizer trained on a few sentences (no download), and adapters with non-zero random B saved as PEFT folders."""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, how are you today?",
    "a pirate sails the seven seas in search of treasure",
    "the robot computes the answer: forty two",
    "<|user|>what is the capital of france?\n<|assistant|>paris is the capital",
]


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 5, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(model_type: str = "llama", vocab: int = 320, **overrides):
    from transformers import AutoConfig

    kw = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, eos_token_id=1, pad_token_id=0,
              bos_token_id=None, tie_word_embeddings=False)
    if model_type == "qwen2":
        kw["use_sliding_window"] = False
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def save_tiny_model(directory: Path, model_type: str = "llama", seed: int = 0, **overrides) -> Path:
    """A random tiny causal LM + tokenizer saved as a Hugging Face folder (weights scaled up so that the
    greedy tokens depend on the prompt and the adapter)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3 if "embed" in name or "lm_head" in name else 0.15)
    model.generation_config.eos_token_id = 1
    model.generation_config.pad_token_id = 0
    directory = Path(directory)
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def load_model(directory: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()


def save_random_adapter(model_dir: Path, out_dir: Path, seed: int, r: int = 4,
                        targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                        alpha: float | None = None, **config) -> Path:
    """An adapter with random A and B (strong enough to change the greedy tokens) saved as a PEFT folder."""
    import lorakit

    model = load_model(model_dir)
    cfg = lorakit.LoraConfig(r=r, alpha=alpha if alpha is not None else 2.0 * r, target_modules=list(targets),
                             **config)
    lorakit.inject(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            for p in layer.adapter_parameters("default"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    lorakit.save_adapter(model, out_dir, base_model_name_or_path=str(model_dir))
    return Path(out_dir)


def offline_generate(model_dir: Path, adapter_dir: Path | None, prompt_ids: list[int], max_new_tokens: int,
                     model=None) -> list[int]:
    """Greedy tokens from Hugging Face generate with the adapter loaded through lorakit (the oracle)."""
    import lorakit

    if model is None:
        model = load_model(model_dir)
        if adapter_dir is not None:
            lorakit.load_adapter(model, adapter_dir)
    ids = torch.tensor([prompt_ids], device=next(model.parameters()).device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=1, pad_token_id=0, temperature=None, top_p=None, top_k=None)
    return out[0, len(prompt_ids):].tolist()


class LiveServer:
    """uvicorn serving ``app`` on 127.0.0.1 (an ephemeral port) in a thread; ``stop()`` shuts it down
    gracefully (in-flight requests drain) and waits, bounded."""

    def __init__(self, app):
        import socket
        import threading

        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=30, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        import time

        for _ in range(500):
            if self.server.started:
                break
            time.sleep(0.01)
        assert self.server.started, "uvicorn did not start within 5 s"

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "server did not stop"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.thread.is_alive():
            self.stop()
