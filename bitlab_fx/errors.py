"""Errors raised by bitlab_fx.

Every user mistake raises a subclass of :class:`BitlabError` whose message names the layer, the
mapping rule or the shapes involved and says what to do about it.
"""


class BitlabError(Exception):
    """Base class of every error bitlab_fx raises on purpose."""


class ConfigError(BitlabError, ValueError):
    """A quantization config or mapping rule is invalid, or does not fit the layer it matched."""


class CaptureError(BitlabError, RuntimeError):
    """The model could not be captured as a graph (torch.fx or torch.export)."""


class ConvertError(BitlabError, RuntimeError):
    """A prepared model could not be lowered to packed weights and bitlab ops."""


class KernelError(BitlabError, RuntimeError):
    """A bitlab op was called with inputs it cannot handle (shape, dtype, device, format)."""


class ExportError(BitlabError, ValueError):
    """A model cannot be written in a deployment format (GGUF, ONNX): not converted, an architecture or a
    shape the format cannot hold."""
