"""Capturing a model as a graph, and everything about train/eval mode that capture bakes in.

The only package that calls ``torch.fx.symbolic_trace``/``torch.export``:

- :mod:`.fx`: the fx frontend (and the train/eval second trace), errors naming the failing module;
- :mod:`.export`: the ``torch.export`` frontend;
- :mod:`.inputs`: ``example_inputs``/``example_kwargs`` checks and None-default parameters;
- :mod:`.modes`: modules that make a captured graph follow ``.train()``/``.eval()``;
- :mod:`.partial`: which parts of a model that does not trace whole do trace.
"""
from .export import trace_export
from .fx import first_line, trace_fx, user_frame
from .inputs import check_example_inputs

__all__ = ["check_example_inputs", "first_line", "trace_export", "trace_fx", "user_frame"]
