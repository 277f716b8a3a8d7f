"""``qdetr::W4A8Linear`` as Python ``IPluginV3`` classes, for TensorRT 10.3 (JetPack 6), which has no
``tensorrt.plugin``.

Same interface as the quickly deployable form (five inputs, attributes ``k, x_step, x_zero_point, qmin,
qmax``, outputs ``y`` and two int32 scratch tensors). ``enqueue`` wraps TensorRT's device pointers as torch
tensors through ``__cuda_array_interface__`` (``runner.as_tensor``: no cupy, no cuda-python) and runs the
tested Triton kernels on TensorRT's stream. The engine needs Python (and this registration) at run time.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kernels.trt_plugins.runner import PluginAttrs, as_tensor, run_on_stream, w4a8_forward

NAME, NAMESPACE, VERSION = "W4A8Linear", "qdetr", "1"
INT_FIELDS = ("k", "x_zero_point", "qmin", "qmax")
N_INPUTS, N_SCRATCH = 5, 2


def attrs_from_fields(fields: Any) -> PluginAttrs:
    """PluginAttrs from a PluginFieldCollection (ONNX attributes at build, serialized fields at run time)."""
    values = {f.name: np.asarray(f.data).reshape(-1) for f in fields}
    missing = [n for n in (*INT_FIELDS, "x_step") if n not in values or values[n].size == 0]
    if missing:
        raise ValueError(f"{NAMESPACE}::{NAME} lacks the attributes {missing}")
    ints = {n: int(values[n][0]) for n in INT_FIELDS}
    return PluginAttrs(ints["k"], float(np.float32(values["x_step"][0])), ints["x_zero_point"], ints["qmin"],
                       ints["qmax"])


def _field_collection(trt: Any, attrs: PluginAttrs | None) -> Any:
    def field(name: str, value: float | int | None, kind: Any, dtype: type) -> Any:
        data = np.array([] if value is None else [value], dtype=dtype)
        return trt.PluginField(name, data, kind)

    get = (lambda n: None) if attrs is None else (lambda n: getattr(attrs, n))
    fields = [field(n, get(n), trt.PluginFieldType.INT32, np.int32) for n in INT_FIELDS]
    fields.append(field("x_step", get("x_step"), trt.PluginFieldType.FLOAT32, np.float32))
    return trt.PluginFieldCollection(fields)


def make_creator(trt: Any) -> Any:
    """The ``IPluginCreatorV3One`` of ``qdetr::W4A8Linear`` for the installed ``tensorrt`` module."""
    dtypes = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32}

    bases = (trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime)

    class W4A8LinearPlugin(*bases):
        def __init__(self, attrs: PluginAttrs, phase: Any = None) -> None:
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.plugin_name, self.plugin_namespace, self.plugin_version = NAME, NAMESPACE, VERSION
            self.num_outputs, self.timing_cache_id = 1 + N_SCRATCH, ""
            self.attrs, self.phase = attrs, phase

        def get_capability_interface(self, type: Any) -> Any:
            return self

        def get_output_data_types(self, input_types: list[Any]) -> list[Any]:
            return [input_types[0]] + [trt.int32] * N_SCRATCH

        def get_output_shapes(self, inputs: list[Any], shape_inputs: list[Any], builder: Any) -> list[Any]:
            out = trt.DimsExprs(inputs[0])
            out[len(out) - 1] = inputs[1][0]  # [..., K] -> [..., N]
            scratch = []
            for _ in range(N_SCRATCH):
                one = trt.DimsExprs(1)
                one[0] = builder.constant(1)
                scratch.append(one)
            return [out, *scratch]

        def get_fields_to_serialize(self) -> Any:
            return _field_collection(trt, self.attrs)

        def configure_plugin(self, inp: Any, out: Any) -> None:
            pass

        def on_shape_change(self, inp: Any, out: Any) -> None:
            pass

        def supports_format_combination(self, pos: int, in_out: list[Any], num_inputs: int) -> bool:
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            if pos in (0, N_INPUTS):  # x and y: float32 or float16, the same
                same = pos == 0 or desc.type == in_out[0].desc.type
                return desc.type in (trt.float32, trt.float16) and same
            return desc.type == (trt.float32 if pos in (2, 4) else trt.int32)

        def enqueue(self, input_desc: list[Any], output_desc: list[Any], inputs: list[int],
                    outputs: list[int], workspace: int, stream: int) -> None:
            descs, ptrs = [*input_desc[:N_INPUTS], output_desc[0]], [*inputs[:N_INPUTS], outputs[0]]
            t = [as_tensor(p, tuple(d.dims), dtypes[d.type]) for p, d in zip(ptrs, descs)]
            run_on_stream(stream, w4a8_forward, *t[:N_INPUTS], self.attrs, t[N_INPUTS])

        def attach_to_context(self, context: Any) -> Any:
            return self.clone()

        def get_valid_tactics(self) -> list[int]:
            return []

        def set_tactic(self, tactic: int) -> None:
            pass

        def clone(self) -> W4A8LinearPlugin:
            cloned = W4A8LinearPlugin(self.attrs, self.phase)
            cloned.__dict__.update(self.__dict__)
            return cloned

    class W4A8LinearCreator(trt.IPluginCreatorV3One):
        def __init__(self) -> None:
            trt.IPluginCreatorV3One.__init__(self)
            self.name, self.plugin_namespace, self.plugin_version = NAME, NAMESPACE, VERSION
            self.field_names = _field_collection(trt, None)

        def create_plugin(self, name: str, fc: Any, phase: Any) -> W4A8LinearPlugin:
            return W4A8LinearPlugin(attrs_from_fields(fc), phase)

    return W4A8LinearCreator()


def register_v3(trt: Any) -> Any:
    """Register the creator with TensorRT's plugin registry (namespace "qdetr"); returns the creator."""
    creator = make_creator(trt)
    if not trt.get_plugin_registry().register_creator(creator, NAMESPACE):
        raise RuntimeError(f"TensorRT refused to register {NAMESPACE}::{NAME}")
    return creator
