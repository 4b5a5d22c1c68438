"""lorakit's exception types: every failure a user can cause has its own, with a message that names
the module, the key and the expected and found values."""


class LoraError(Exception):
    """Base of every lorakit error."""


class ConfigError(LoraError, ValueError):
    """A LoraConfig (or another config) holds an invalid value."""


class TargetError(LoraError, ValueError):
    """target_modules matched nothing, or matched a module lorakit cannot adapt."""


class AdapterError(LoraError, KeyError):
    """An adapter name is unknown, already taken, or used in a way its state forbids."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class MergeError(LoraError, RuntimeError):
    """A merge/unmerge request conflicts with the layer's state (e.g. mixed batch while merged)."""


class AdapterLoadError(LoraError, ValueError):
    """An adapter file is missing, truncated, not safetensors, or does not fit the model."""


class DataError(LoraError, ValueError):
    """A training/eval data file is missing, empty, malformed, or lacks a column the job needs."""


class TrainingError(LoraError, RuntimeError):
    """Training cannot go on (a non-finite loss, a checkpoint that does not fit the run)."""


class QuantError(LoraError, ValueError):
    """A weight cannot be quantized (non-float, NaN/Inf, unknown quant type or block size) or a 4-bit state
    does not fit the layer it is loaded into."""
