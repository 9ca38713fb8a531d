"""The fx frontend (capture/fx.py): tracing errors name the module and the reason; partial tracing takes over."""
import pytest
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
