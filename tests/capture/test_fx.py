"""The fx frontend (capture/fx.py): tracing errors name the module and the reason; partial tracing takes over."""
import pytest
import torch
from torch import nn

import bitlab_fx as bfx


def test_untraceable_model_names_the_module_and_reason():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return self.fc(x)
            return x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Gate()

        def forward(self, x):
            return self.inner(x)

    with pytest.raises(bfx.CaptureError, match=r"module 'inner' \(Gate\).*TraceError"):
        bfx.prepare_qat(Net(), bfx.ternary(), frontend="fx_whole")
    pm = bfx.prepare_qat(Net(), bfx.ternary())  # default: partial tracing quantizes inner.fc anyway
    assert bfx.summary(pm).traced == {"inner.fc": "layer"}
    assert "TraceError" in bfx.summary(pm).untraced["inner"]


def test_an_fx_error_about_a_decorated_forward_is_said_in_plain_words():
    import functools

    from bitlab_fx.capture import first_line

    def deco(f):
        @functools.wraps(f)
        def wrapped(*args, **kwargs):
            return f(*args, **kwargs)
        return wrapped

    class Decorated(torch.nn.Module):
        @deco
        def forward(self, x, mask=None, **kwargs):
            return x + 1

    with pytest.raises(ValueError) as info:
        torch.fx.symbolic_trace(Decorated())
    assert "forward wrapped by a (*args, **kwargs) decorator" in first_line(info.value)
