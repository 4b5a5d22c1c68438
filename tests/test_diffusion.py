"""LoRA on a diffusers UNet2DConditionModel: zero change at init, diffusers' load_lora_weights reads lorakit's
file (plain LoRA and DoRA, with and without metadata) and its UNet output matches lorakit's, lorakit reads it
back, training lowers a denoising loss, and bad files leave the UNet alone."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import lorakit as lk
from lorakit import diffusion as dk

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")  # diffusers loads LoRA through PEFT
warnings.filterwarnings("ignore")
from diffusers import DiffusionPipeline, UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin

TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, norm_num_groups=2, attention_head_dim=2,
    ).eval()


class UNetPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """A Stable Diffusion pipeline reduced to its UNet: ``load_lora_weights`` is StableDiffusionPipeline's own."""

    def __init__(self, unet, text_encoder=None):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder)


g = torch.Generator().manual_seed(1)
SAMPLE, STEPS, CONTEXT = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 5, 8, generator=g)


def run(unet):
    return unet(SAMPLE, STEPS, encoder_hidden_states=CONTEXT).sample


def randomize(model, std=0.2):
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * std)


@pytest.mark.parametrize("use_dora", [False, True])
def test_diffusers_loads_the_file_and_outputs_match(use_dora, tmp_path):
    base = tiny_unet()
    unet = copy.deepcopy(base)
    before = run(unet)
    summary = lk.inject(unet, dk.unet_lora_config(r=2, alpha=3, use_dora=use_dora))
    kinds = {type(layer.base_layer).__name__ for _, layer in lk.lora_layers(unet)}
    assert kinds == {"Linear", "Conv2d"} and len(summary.wrapped) == 55  # attention projections and convolutions
    assert torch.equal(run(unet), before)
    randomize(unet)
    ours = run(unet)
    assert (ours - before).abs().max() > 0.1
    path = dk.save_unet_lora(unet, tmp_path)
    assert path.name == "pytorch_lora_weights.safetensors"
    pipe = UNetPipeline(copy.deepcopy(base))
    pipe.load_lora_weights(tmp_path)
    torch.testing.assert_close(run(pipe.unet), ours, rtol=TOL, atol=TOL)

    again = copy.deepcopy(base)
    dk.load_unet_lora(again, tmp_path)
    torch.testing.assert_close(run(again), ours, rtol=TOL, atol=TOL)


def test_file_without_metadata_gives_the_same_unet(tmp_path):
    """The scale is folded into B: readers that ignore the metadata (alpha = r) compute the same update."""
    from safetensors.torch import load_file, save_file

    base = tiny_unet()
    unet = copy.deepcopy(base)
    lk.inject(unet, dk.unet_lora_config(r=4, alpha=16, convs=False, rank_pattern={"to_out.0": 2}))
    randomize(unet)
    ours = run(unet)
    path = dk.save_unet_lora(unet, tmp_path)
    save_file(load_file(path), path, metadata={"format": "pt"})  # drop lora_adapter_metadata
    pipe = UNetPipeline(copy.deepcopy(base))
    pipe.load_lora_weights(tmp_path)
    torch.testing.assert_close(run(pipe.unet), ours, rtol=TOL, atol=TOL)
    mine = copy.deepcopy(base)
    dk.load_unet_lora(mine, path)
    torch.testing.assert_close(run(mine), ours, rtol=TOL, atol=TOL)


def test_training_lowers_a_denoising_loss():
    unet = tiny_unet()
    lk.inject(unet, dk.unet_lora_config(r=4))
    gen = torch.Generator().manual_seed(5)
    clean = torch.randn(4, 4, 8, 8, generator=gen)
    noise = torch.randn(4, 4, 8, 8, generator=gen)
    steps = torch.randint(0, 1000, (4,), generator=gen)
    context = torch.randn(4, 5, 8, generator=gen)
    noisy = 0.7 * clean + 0.7 * noise
    opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-2)
    unet.train()
    losses = []
    for _ in range(12):
        loss = F.mse_loss(unet(noisy, steps, encoder_hidden_states=context).sample, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


def test_bad_files_leave_the_unet_alone(tmp_path):
    from safetensors.torch import save_file

    unet = tiny_unet()
    keys = set(unet.state_dict())
    save_file({"text_encoder.x.lora_A.weight": torch.zeros(2, 2)}, tmp_path / dk.WEIGHT_NAME)
    with pytest.raises(lk.AdapterLoadError, match="no keys starting with 'unet.'"):
        dk.load_unet_lora(unet, tmp_path)
    save_file({"unet.conv_in.lora_A.weight": torch.zeros(2, 4, 3, 3),
               "unet.conv_in.lora_B.weight": torch.zeros(5, 2, 1, 1)}, tmp_path / dk.WEIGHT_NAME)
    with pytest.raises(lk.AdapterLoadError, match="expects shape"):
        dk.load_unet_lora(unet, tmp_path)
    assert set(unet.state_dict()) == keys and not lk.list_adapters(unet)
    (tmp_path / dk.WEIGHT_NAME).write_bytes(b"not safetensors")
    with pytest.raises(lk.AdapterLoadError, match="not a safetensors"):
        dk.load_unet_lora(unet, tmp_path)
