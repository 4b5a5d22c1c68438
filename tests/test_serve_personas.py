"""lorakit.demos.personas end to end on a tiny random Llama: persona adapters are trained, saved as PEFT
folders, served together in one mixed batch, and each row shows its own persona's style."""

import pytest
import torch
from serve_helpers import save_tiny_model

from lorakit.demos import personas

pytestmark = pytest.mark.usefixtures("one_thread")


def test_personas_are_learned_and_served_per_row(tmp_path):
    base = save_tiny_model(tmp_path / "base", hidden_size=64, intermediate_size=128)
    torch.manual_seed(0)
    result = personas.run(steps=60, base_dir=base, out_dir=tmp_path / "out", batch_size=8, lr=1e-2,
                          max_new_tokens=16, personas=("pirate", "robot"), verbose=False)
    for name in ("pirate", "robot"):
        assert (result["adapters"] / name / "adapter_model.safetensors").is_file()
        assert result["losses"][name][-1] < 0.3 * result["losses"][name][0]
    # on questions never seen in training, each row speaks as its own adapter; the base row as neither
    assert result["hits"]["pirate"] >= 2 / 3 and result["hits"]["robot"] >= 2 / 3
    assert result["base_hits"] == {"pirate": 0.0, "robot": 0.0}
    # 3 questions x (base + 2 personas) decoded together: one by one would take 9 x 15 decode steps; base rows
    # may start before the adapters finish loading from disk, so allow a few steps more than one batch
    assert result["decode_steps"] <= 2 * 16


def test_persona_answers_are_distinct_styles():
    pirate, robot = personas.persona_answers("pirate"), personas.persona_answers("robot")
    assert len(pirate) == len(robot) == len(personas.QA)
    assert all(personas.style_hits("pirate", a) and not personas.style_hits("robot", a) for a in pirate)
    assert all(personas.style_hits("robot", a) and a.split(". ", 1)[1].isupper() for a in robot)
    with pytest.raises(ValueError, match="unknown persona"):
        personas.persona_answers("wizard")
