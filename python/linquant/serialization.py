"""save_quantized / load_quantized: safetensors plus a small JSON config, written atomically, loaded
into a meta-device skeleton without a full-precision copy and without unpickling anything."""

import contextlib
import json
import os
from typing import Callable, Dict, Optional, Union

import torch
from torch import nn

from ._files import atomic_write, write_json
from .nn import QLinear

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "linquant.json"
FORMAT_VERSION = 1


def save_quantized(model: nn.Module, path: str, metadata: Optional[dict] = None) -> None:
    """Writes `path`/model.safetensors (every parameter and persistent buffer) and
    `path`/linquant.json (which modules are QLinear and their formats; tied tensors; `metadata`,
    e.g. the source model that `linquant eval` reloads)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    modules = {name: {"in_features": m.in_features, "out_features": m.out_features, "bits": m.bits,
                      "group_size": m.group_size, "symmetric": m.symmetric, "bias": m.bias is not None,
                      "dtype": str(m.scales.dtype).replace("torch.", "")}
               for name, m in model.named_modules() if isinstance(m, QLinear)}
    if not modules:
        raise ValueError("linquant.save_quantized: the model has no QLinear layers; run quantize_model first")
    tensors: Dict[str, torch.Tensor] = {}
    tied: Dict[str, str] = {}
    first_by_storage: Dict[tuple, str] = {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in first_by_storage:
            tied[name] = first_by_storage[key]  # safetensors refuses shared storage: keep one copy
            continue
        first_by_storage[key] = name
        tensors[name] = t.detach().contiguous()
    config = {"format": "linquant", "format_version": FORMAT_VERSION, "modules": modules, "tied": tied,
              "metadata": metadata or {}}
    atomic_write(os.path.join(path, WEIGHTS_NAME), lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_json(os.path.join(path, CONFIG_NAME), config)


@contextlib.contextmanager
def _parameters_on_meta():
    """Parameters created inside go to the meta device; buffers (rotary tables and other
    non-persistent state that files do not hold) are built for real, as they are small."""
    original = nn.Module.register_parameter

    def register_parameter(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _read_config(path: str) -> dict:
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"linquant.load_quantized: {cfg_path} not found (not a save_quantized directory)")
    try:
        with open(cfg_path) as f:
            config = json.load(f)
    except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"linquant.load_quantized: {cfg_path} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or config.get("format") != "linquant" or \
            config.get("format_version") != FORMAT_VERSION:
        found = config if not isinstance(config, dict) else \
            f"format {config.get('format')!r}, version {config.get('format_version')!r}"
        raise ValueError(f"linquant.load_quantized: {cfg_path} is not a linquant format {FORMAT_VERSION} config "
                         f"({found})")
    modules, tied = config.get("modules"), config.get("tied", {})
    if not isinstance(modules, dict) or not isinstance(tied, dict):
        raise ValueError(f"linquant.load_quantized: {cfg_path}: 'modules' and 'tied' must be JSON objects")
    for name, spec in modules.items():
        _check_module_spec(cfg_path, name, spec)
    return config


_SPEC_TYPES = {"in_features": int, "out_features": int, "bits": int, "group_size": (int, type(None)),
               "symmetric": bool, "bias": bool, "dtype": str}


def _check_module_spec(cfg_path: str, name: str, spec) -> None:
    """A module entry as save_quantized writes it; a hand-edited or damaged one is named, not a
    KeyError or AttributeError from deep inside the loader."""
    if not isinstance(spec, dict):
        raise ValueError(f"linquant.load_quantized: {cfg_path}: module {name!r} must be a JSON object")
    for key, kind in _SPEC_TYPES.items():
        value = spec.get(key)
        if key not in spec or not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            expected = " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__
            raise ValueError(f"linquant.load_quantized: {cfg_path}: module {name!r} has a missing or invalid "
                             f"{key!r} (expected {expected}, got {value!r})")
    if not isinstance(getattr(torch, spec["dtype"], None), torch.dtype):
        raise ValueError(f"linquant.load_quantized: {cfg_path}: module {name!r} has dtype {spec['dtype']!r}, "
                         "which is not a torch dtype (e.g. 'float16')")


def load_quantized(path: str, model_or_factory: Union[nn.Module, Callable[[], nn.Module]],
                   device: Union[str, torch.device, None] = None) -> nn.Module:
    """Loads a save_quantized directory. `model_or_factory` is a callable that builds the model
    (called with its parameters on the meta device, so no full-precision copy is made) or a
    model, whose parameters are replaced. QLinear layers are swapped in per the config and every
    tensor is assigned from the file; peak memory stays near the quantized size. With `device`
    (e.g. "cuda") the file's tensors are read straight onto that device and the model's other
    buffers follow. The model is returned in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = _read_config(path)
    if isinstance(model_or_factory, nn.Module):
        model = model_or_factory
    else:
        with _parameters_on_meta():
            model = model_or_factory()
    for name, spec in config["modules"].items():
        try:
            model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"linquant.load_quantized: the model has no module {name!r} that the file "
                             "quantized; is this the right model?") from None
        layer = QLinear(spec["in_features"], spec["out_features"], spec["bias"], spec["bits"], spec["group_size"],
                        spec["symmetric"], device="meta", dtype=getattr(torch, spec["dtype"]))
        if not name:  # the model is itself the quantized layer
            model = layer
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    weights = os.path.join(path, WEIGHTS_NAME)
    try:
        state = load_file(weights, device=str(torch.device(device)) if device is not None else "cpu")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"linquant.load_quantized: cannot read {weights}: {e} (truncated or corrupt file?)") from e
    for name, source in config.get("tied", {}).items():
        if source not in state:
            raise ValueError(f"linquant.load_quantized: {name!r} is tied to {source!r}, which the file does not hold")
        state[name] = state[source]
    expected = model.state_dict()
    for key in expected:
        if key not in state:
            raise ValueError(f"linquant.load_quantized: the file has no tensor for {key!r}; is this the right model?")
    for key, t in state.items():
        if key not in expected:
            raise ValueError(f"linquant.load_quantized: the model has no parameter or buffer {key!r} from the file")
        if tuple(expected[key].shape) != tuple(t.shape):
            raise ValueError(f"linquant.load_quantized: {key!r} is {list(t.shape)} in the file but "
                             f"{list(expected[key].shape)} in the model")
        # Float tensors keep the file's float dtype (assign=True); integer ones (qweight, zeros) are
        # the format itself. Another dtype would only fail at the first forward.
        want = expected[key]
        same_kind = t.is_floating_point() == want.is_floating_point()
        if not same_kind or (not want.is_floating_point() and t.dtype != want.dtype):
            raise ValueError(f"linquant.load_quantized: {key!r} is {t.dtype} in the file but the model "
                             f"expects {want.dtype}")
    for name in config["modules"]:  # damaged scales would make every output NaN or inf, silently
        scales = state[f"{name}.scales" if name else "scales"]
        if scales.numel() and not bool(torch.isfinite(scales).logical_and_(scales > 0).all()):
            raise ValueError(f"linquant.load_quantized: the scales of {name or 'the model'!r} hold values that are "
                             "not finite and positive (a damaged file?)")
    model.load_state_dict(state, assign=True, strict=True)
    if hasattr(model, "tie_weights") and config.get("tied"):
        model.tie_weights()
    if device is not None:
        model.to(device)  # buffers the file does not hold (rotary tables and the like)
    return model.eval()  # like from_pretrained: loaded for inference
