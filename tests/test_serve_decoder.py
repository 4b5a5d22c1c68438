"""lorakit.serve.decoder: the serving forward equals Hugging Face's forward (and lorakit's adapters) in fp32.

Tiny random models built from configs (Llama, Qwen2 with q/k/v biases, Qwen3 with q/k norms); adapters are
saved with lorakit.save_adapter and compared with the same folder loaded through lorakit.load_adapter into a
Hugging Face model. Tolerance 1e-4 on logits of order 1 (fp32, different matmul groupings).
"""

import pytest
import torch
from serve_helpers import load_model, save_random_adapter, save_tiny_model

import lorakit
from lorakit.errors import ConfigError
from lorakit.serve.cache import adapter_groups
from lorakit.serve.decoder import Decoder

ATOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoder")
    model_dir = save_tiny_model(root / "llama")
    adapters = {
        "a": save_random_adapter(model_dir, root / "a", seed=1, r=4),
        "b": save_random_adapter(model_dir, root / "b", seed=2, r=2, targets=("q_proj", "v_proj", "down_proj"),
                                 use_rslora=True),
        "c": save_random_adapter(model_dir, root / "c", seed=3, r=4, rank_pattern={r".*\.1\.mlp\.up_proj": 8},
                                 alpha_pattern={r".*\.0\.self_attn\.o_proj": 3.0}),
    }
    return model_dir, adapters


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_base_prefill_and_decode_match_hugging_face(tmp_path, model_type):
    model_dir = save_tiny_model(tmp_path / model_type, model_type)
    hf = load_model(model_dir)
    dec = Decoder(load_model(model_dir), max_batch=4, max_len=32, adapter_slots=1, max_rank=4)
    p1, p2 = [5, 6, 7, 8, 9, 10], [3, 4]
    logits = dec.prefill([p1, p2], [2, 0], [0, 0])  # right-padded batch, slots out of order
    assert torch.allclose(logits[0], hf_logits(hf, p1)[-1], atol=ATOL)
    assert torch.allclose(logits[1], hf_logits(hf, p2)[-1], atol=ATOL)
    # two decode steps: rows 0 and 2 at different positions, row 1 inactive
    seq1, seq2 = list(p1), list(p2)
    for t1, t2 in [(11, 12), (13, 14)]:
        out = dec.decode(torch.tensor([t2, 0, t1]), torch.tensor([len(seq2), 0, len(seq1)]),
                         torch.zeros(3, dtype=torch.long), torch.tensor([True, False, True]))
        seq1.append(t1)
        seq2.append(t2)
        assert torch.allclose(out[2], hf_logits(hf, seq1)[-1], atol=ATOL)
        assert torch.allclose(out[0], hf_logits(hf, seq2)[-1], atol=ATOL)


def test_fused_weights_leave_the_model_unchanged_and_share_memory(llama):
    model_dir, _ = llama
    model, ref = load_model(model_dir), load_model(model_dir)
    dec = Decoder(model, max_batch=2, max_len=16, adapter_slots=1, max_rank=4)
    ids = [4, 9, 2, 7]
    assert torch.allclose(hf_logits(model, ids), hf_logits(ref, ids), atol=1e-6)
    q = model.model.layers[0].self_attn.q_proj.weight
    assert q.data_ptr() == dec.layers[0].qkv.weight.data_ptr()  # a view, not a copy


def test_adapters_match_lorakit_per_row(llama):
    """Rows with different adapters in one batch (ranks 4, 2 with rsLoRA and a subset of targets, a rank and
    alpha pattern) each equal the Hugging Face model with that adapter loaded through lorakit."""
    model_dir, adapters = llama
    dec = Decoder(load_model(model_dir), max_batch=4, max_len=32, adapter_slots=3, max_rank=8)
    refs = {}
    for slot, (name, folder) in enumerate(adapters.items(), start=1):
        dec.write_adapter(slot, adapter_groups(dec, folder)[0])
        refs[slot] = load_model(model_dir)
        lorakit.load_adapter(refs[slot], folder)
    refs[0] = load_model(model_dir)
    prompts = [[5, 6, 7], [8, 9, 10, 11], [12, 13], [14, 15, 16, 17, 18]]
    slots = [1, 0, 3, 2]
    logits = dec.prefill(prompts, [0, 1, 2, 3], slots)
    for row, (p, s) in enumerate(zip(prompts, slots)):
        assert torch.allclose(logits[row], hf_logits(refs[s], p)[-1], atol=ATOL), f"row {row} adapter slot {s}"
    # the adapters change the output (the comparison is not trivially base vs base)
    assert (logits[0] - hf_logits(refs[0], prompts[0])[-1]).abs().max() > 1e-2
    tokens = torch.tensor([20, 21, 22, 23])
    out = dec.decode(tokens, torch.tensor([len(p) for p in prompts]), torch.tensor(slots))
    for row, (p, s) in enumerate(zip(prompts, slots)):
        assert torch.allclose(out[row], hf_logits(refs[s], p + [20 + row])[-1], atol=ATOL)


def test_a_rewritten_slot_serves_the_new_adapter(llama):
    model_dir, adapters = llama
    dec = Decoder(load_model(model_dir), max_batch=1, max_len=16, adapter_slots=1, max_rank=8)
    ref = load_model(model_dir)
    lorakit.load_adapter(ref, adapters["b"])
    dec.write_adapter(1, adapter_groups(dec, adapters["a"])[0])
    dec.write_adapter(1, adapter_groups(dec, adapters["b"])[0])  # "b" leaves o/k/gate/up untouched: zeroed
    assert torch.allclose(dec.prefill([[3, 4, 5]], [0], [1])[0], hf_logits(ref, [3, 4, 5])[-1], atol=ATOL)


def test_refuses_what_it_cannot_serve(tmp_path, llama):
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(ConfigError, match="model_type='gpt2'"):
        Decoder(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2)), 1, 8, 1, 4)
    model_dir, _ = llama
    with pytest.raises(ConfigError, match="max_len"):
        Decoder(load_model(model_dir), max_batch=1, max_len=0, adapter_slots=1, max_rank=4)
    mistral = save_tiny_model(tmp_path / "mistral", "mistral", sliding_window=16)
    with pytest.raises(ConfigError, match="sliding window"):
        Decoder(load_model(mistral), max_batch=1, max_len=64, adapter_slots=1, max_rank=4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and the Triton decode path need a GPU")
def test_cuda_graph_decode_matches_eager_and_hugging_face(llama):
    """On a GPU (fp32): the engine with CUDA graphs + Triton BGMV, the eager engine, and HF generate with the
    adapter loaded through lorakit give the same greedy tokens, with rows on different adapters."""
    from serve_helpers import offline_generate

    from lorakit.serve.engine import Engine, EngineConfig
    from lorakit.serve.sampling import SamplingParams

    model_dir, adapters = llama
    prompts = [[5, 6, 7], [8, 9, 10, 11], [12, 13], [14, 15, 16, 17, 18], [3, 4, 5]]
    names = ["a", "b", None, "c", "a"]
    want = []
    for p, name in zip(prompts, names):
        ref = load_model(model_dir).cuda()
        if name is not None:
            lorakit.load_adapter(ref, adapters[name])
        want.append(offline_generate(model_dir, None, p, 12, model=ref))
    params = SamplingParams(max_tokens=12, temperature=0)
    for graphs in (True, False):
        config = EngineConfig(max_batch=8, max_model_len=64, max_adapters_gpu=2, max_lora_rank=8, cuda_graphs=graphs)
        with Engine(load_model(model_dir).cuda(), None, model_dir.parent, config) as engine:
            outs = engine.generate(prompts, params, names)
            assert [o.token_ids for o in outs] == want, f"cuda_graphs={graphs}"
            if graphs:
                assert engine.decoder._graphs  # the graph path really ran


@pytest.mark.parametrize("bits", [4, 8])
def test_packed_base_matches_the_same_packed_model_per_row(llama, bits):
    """QLoRA serving: over a base streamed into packed projections (load_quantized: NF4 + double quant, or
    int8), each row of a mixed batch equals the Hugging Face model loaded the same way with that adapter
    loaded through lorakit - prefill and decode. The packed base really differs from the 16-bit one."""
    from lorakit.layers import FrozenPackedLinear

    model_dir, adapters = llama

    def packed():
        return lorakit.load_quantized(model_dir, bits=bits, dtype=torch.float32, compute_dtype=torch.float32).eval()

    model = packed()
    dec = Decoder(model, max_batch=3, max_len=32, adapter_slots=2, max_rank=8)
    assert all(isinstance(m, FrozenPackedLinear) for g in (dec.layers[0].qkv, dec.layers[1].down) for m in g.packed)
    refs = {0: packed()}
    for slot, name in ((1, "a"), (2, "c")):
        dec.write_adapter(slot, adapter_groups(dec, adapters[name])[0])
        refs[slot] = packed()
        lorakit.load_adapter(refs[slot], adapters[name])
    prompts, slots = [[5, 6, 7], [8, 9, 10, 11], [12, 13]], [1, 0, 2]
    logits = dec.prefill(prompts, [0, 1, 2], slots)
    for row, (p, s) in enumerate(zip(prompts, slots)):
        assert torch.allclose(logits[row], hf_logits(refs[s], p)[-1], atol=ATOL), f"row {row} adapter slot {s}"
    dense = hf_logits(load_model(model_dir), prompts[1])[-1]
    assert (logits[1] - dense).abs().max() > 1e-3  # quantization changed the base: the comparison is not trivial
    out = dec.decode(torch.tensor([20, 21, 22]), torch.tensor([len(p) for p in prompts]), torch.tensor(slots))
    for row, (p, s) in enumerate(zip(prompts, slots)):
        assert torch.allclose(out[row], hf_logits(refs[s], p + [20 + row])[-1], atol=ATOL)


def test_a_group_with_packed_and_dense_layers_is_refused(llama):
    model_dir, _ = llama
    model = load_model(model_dir)
    lorakit.quantize_model(model, skip=["q_proj"])  # k/v packed, q dense: no one fused q|k|v matmul
    with pytest.raises(ConfigError, match="mixes packed and dense layers"):
        Decoder(model, max_batch=1, max_len=16, adapter_slots=1, max_rank=4)
