"""lorakit/_malloc.py: the CPU allocator tuning the command line applies to its own process."""

import subprocess
import sys

import pytest

CHECK = ("import ctypes, sys; from lorakit._malloc import tune_for_training; ok = tune_for_training(); "
         "print(ok)")


def run(env_value=None):
    import os

    env = dict(os.environ)
    env.pop("LORAKIT_MALLOC", None)
    if env_value is not None:
        env["LORAKIT_MALLOC"] = env_value
    # in a child process: the setting is process-wide and must not leak into the test run
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_applies_on_glibc_and_can_be_turned_off():
    import platform

    expected = "True" if platform.libc_ver()[0] == "glibc" else "False"
    assert run() == expected
    assert run("default") == "False"


@pytest.mark.parametrize("command,expected", [("train", True), ("generate", False)])
def test_the_command_line_tunes_its_training_commands_only(command, expected, monkeypatch, tmp_path, capsys):
    from lorakit import _malloc, cli

    calls = []
    monkeypatch.setattr(_malloc, "tune_for_training", lambda: calls.append(1) or True)
    extra = ["--data", "x"] if command == "train" else ["--prompt", "p"]
    assert cli.main([command, "--model", str(tmp_path / "missing"), *extra]) == 2  # fails after the tuning
    assert bool(calls) == expected
    capsys.readouterr()
