"""quantize_pretrained: a Hugging Face checkpoint quantized while it is read, one tensor at a time,
into a model built on the meta device, so peak memory is the quantized model plus one layer's
weight instead of the full-precision model (from_pretrained + quantize_model)."""

import json
import os
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from ._ops import _FLOAT_DTYPES
from .model import DEFAULT_EXCLUDE, Exclude, layers_to_quantize, replace_layers, report_replaced, scheme_name
from .nn import QLinear
from .serialization import _parameters_on_meta
from .weights import check_format, check_method

WHO = "linquant.quantize_pretrained"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointMismatch(ValueError):
    """The checkpoint's tensor names do not map onto the model's parameters by name (a checkpoint
    that transformers converts while loading it, or one for another model class)."""


def _checkpoint_files(path: str) -> List[str]:
    """The safetensors files of a Hugging Face model directory: model.safetensors, or the shards
    that model.safetensors.index.json names."""
    single, index = os.path.join(path, SINGLE_FILE), os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{WHO}: {index} is not a safetensors index (a JSON object with a 'weight_map'): "
                             f"{e}") from None
        files = [os.path.join(path, shard) for shard in shards]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(f"{WHO}: {INDEX_FILE} names shards that are not in {path}: {missing[:3]}")
        return files
    if os.path.isfile(single):
        return [single]
    raise CheckpointMismatch(f"{WHO}: {path} holds no safetensors weights ({SINGLE_FILE} or {INDEX_FILE}); load a "
                             "checkpoint in another format with from_pretrained and quantize it with quantize_model")


def build_skeleton(path: str, model_class, dtype: Union[torch.dtype, str]) -> nn.Module:
    """The model of `path`'s config.json with its parameters on the meta device (buffers real), in
    `dtype`, or with "auto" in the dtype config.json records (float32 when it records none)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers import AutoConfig, PreTrainedModel

    config = AutoConfig.from_pretrained(path)
    if dtype == "auto":
        recorded = getattr(config, "dtype", None)
        dtype = getattr(torch, recorded) if isinstance(recorded, str) else recorded or torch.float32
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{WHO}: dtype must be float32, float16, bfloat16 or 'auto', got {dtype!r}")
    if model_class is None:
        names = config.architectures or []
        model_class = getattr(transformers, names[0], None) if names else None
        if model_class is None:
            raise ValueError(f"{WHO}: {path}/config.json names no architecture transformers "
                             f"{transformers.__version__} has ({names}); pass model_class, e.g. AutoModel")
    with _parameters_on_meta():
        if isinstance(model_class, type) and issubclass(model_class, PreTrainedModel):
            return model_class._from_config(config, dtype=dtype)
        if hasattr(model_class, "from_config"):  # AutoModel, AutoModelForCausalLM, ...
            return model_class.from_config(config, dtype=dtype)
    raise TypeError(f"{WHO}: model_class must be a transformers model class or Auto class, got {model_class!r}")


def _tensor_names(model: nn.Module, quantized: Dict[str, QLinear]) -> Dict[str, Tuple[str, str]]:
    """Every name a checkpoint tensor can take, as (module name, attribute): the model's
    parameters and persistent buffers under all their names, and the `weight` / `bias` of each
    layer replaced by a QLinear (whose own buffers no Hugging Face checkpoint holds)."""
    names = {}
    for name, _ in list(model.named_parameters(remove_duplicate=False)) + \
            list(model.named_buffers(remove_duplicate=False)):
        module_name, _, attr = name.rpartition(".")
        if module_name not in quantized:
            names[name] = (module_name, attr)
    for module_name in quantized:
        prefix = f"{module_name}." if module_name else ""
        names[f"{prefix}weight"] = (module_name, "weight")
        names[f"{prefix}bias"] = (module_name, "bias")
    return names


def _resolve(key: str, names: Dict[str, Tuple[str, str]], prefix: str) -> Optional[str]:
    """The model's name for a checkpoint key: as it is, or with the base model's prefix added or
    removed (a base-model checkpoint loaded with its head class, and the reverse), as
    from_pretrained matches them."""
    if key in names:
        return key
    if prefix and f"{prefix}.{key}" in names:
        return f"{prefix}.{key}"
    if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1:] in names:
        return key[len(prefix) + 1:]
    return None


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Gives parameter or buffer `name` the checkpoint's tensor, in the skeleton's dtype. A
    parameter held by several modules (tied weights) gets one Parameter at every holder."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    current = module._parameters[attr] if attr in module._parameters else module._buffers[attr]
    _check_shape(name, tensor, tuple(current.shape))
    value = tensor.to(current.dtype)
    if attr not in module._parameters:
        module._buffers[attr] = value
        return
    param = nn.Parameter(value, requires_grad=current.requires_grad)
    for holder in model.modules():  # every module that holds this parameter
        for holder_attr, p in holder._parameters.items():
            if p is current:
                holder._parameters[holder_attr] = param


def _check_shape(name: str, tensor: torch.Tensor, expected: tuple) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise CheckpointMismatch(f"{WHO}: {name!r} is {list(tensor.shape)} in the checkpoint but "
                                 f"{list(expected)} in the model")


def _tied_sources(model: nn.Module, layers) -> Dict[int, str]:
    """For each layer to quantize whose weight another module also holds (lm_head tied to the
    token embedding, kept out of the checkpoint by save_pretrained), that module's parameter
    name: the layer is quantized from it, as quantize_model quantizes the tied weight."""
    names_by_param: Dict[int, List[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_by_param.setdefault(id(p), []).append(name)
    sources = {}
    for name, module, _ in layers:
        own = f"{name}.weight" if name else "weight"
        others = [n for n in names_by_param.get(id(module.weight), []) if n != own]
        if others:
            sources[id(module)] = others[0]
    return sources


def quantize_pretrained(path: str, bits: int = 8, group_size: Optional[int] = None, symmetric: bool = True,
                        exclude: Exclude = DEFAULT_EXCLUDE, dtype: Union[torch.dtype, str] = torch.float32,
                        model_class=None,
                        device=None, progress: Optional[bool] = None, verbose: bool = False,
                        method: str = "minmax") -> nn.Module:
    """Loads the Hugging Face model in directory `path` (config.json and safetensors weights,
    sharded or not) quantized, reading its tensors one at a time: equal, tensor for tensor, to
    quantize_model(model_class.from_pretrained(path, dtype=dtype), bits, group_size, symmetric,
    exclude, method=method), with peak memory near the quantized model's size. `dtype` is the model's
    float dtype (scales, biases and the layers left in float; "auto": the one config.json records,
    as from_pretrained's dtype="auto"). `model_class` defaults to the class
    config.json names (e.g. AutoModel for an encoder's base model). The tensors are read and
    quantized on `device` (default CPU). Returned in eval mode, with the directory's
    generation_config.json when it has one. Raises CheckpointMismatch when the checkpoint's
    tensors do not map onto the model by name (checkpoints transformers converts while loading:
    use from_pretrained and quantize_model for those)."""
    from safetensors import safe_open

    check_format(bits, group_size, WHO)
    check_method(method, WHO)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{WHO}: {path} is not a Hugging Face model directory (no config.json)")
    files = _checkpoint_files(path)
    model = build_skeleton(path, model_class, dtype)
    layers = layers_to_quantize(model, bits, group_size, method, exclude, WHO)
    scheme = scheme_name(bits, group_size, symmetric, method)
    transposed = {id(module): t for _, module, t in layers}
    tied = _tied_sources(model, layers)
    # A tied parameter takes the tensor of its first name (the embedding, not the head) when the
    # checkpoint holds both, as from_pretrained's tie_weights leaves it.
    canonical = {id(p): name for name, p in model.named_parameters()}
    canonical_name = {name: canonical[id(p)] for name, p in model.named_parameters(remove_duplicate=False)}

    def skeleton(name: str, module: nn.Module, is_transposed: bool) -> QLinear:
        in_features, out_features = module.weight.shape if is_transposed else module.weight.shape[::-1]
        return QLinear(in_features, out_features, getattr(module, "bias", None) is not None, bits, group_size,
                       symmetric, device="meta", dtype=module.weight.dtype)

    model, by_id = replace_layers(model, layers, skeleton, WHO, scheme, progress=False)
    quantized = {name: by_id[id(module)] for name, module, _ in layers}  # under every name it has
    source_of = {id(layer): module_id for module_id, layer in by_id.items()}
    names = _tensor_names(model, quantized)
    prefix = getattr(model, "base_model_prefix", "") or ""
    device = torch.device("cpu") if device is None else torch.device(device)
    filled, unexpected = set(), []

    def quantize_into(layer: QLinear, module_name: str, name: str, weight: torch.Tensor) -> None:
        is_transposed = transposed[source_of[id(layer)]]
        _check_shape(name, weight, (layer.in_features, layer.out_features) if is_transposed else
                     (layer.out_features, layer.in_features))
        w = weight.to(device=device, dtype=layer.scales.dtype)
        try:
            layer.set_weight(w.t() if is_transposed else w, method)
        except ValueError as e:  # NaN or infinite weights
            raise ValueError(f"{WHO}: layer {module_name!r}: {e}") from e
        filled.add(id(layer))

    bar = _progress_bar(progress, files, scheme)
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for key in f.keys():
                name = _resolve(key, names, prefix)
                if bar is not None:
                    bar.update(1)
                if name is None:
                    unexpected.append(key)
                    continue
                module_name, attr = names[name]
                if module_name in quantized:
                    layer = quantized[module_name]
                    if attr == "bias":
                        bias = f.get_tensor(key)
                        _check_shape(name, bias, (layer.out_features,))
                        layer.set_bias(bias.to(device))
                    elif id(layer) not in filled:  # a layer at two places may be saved under both
                        quantize_into(layer, module_name, name, f.get_tensor(key))
                elif canonical_name.get(name, name) == name or _on_meta(model, name):
                    _set_tensor(model, name, f.get_tensor(key).to(device))
    if bar is not None:
        bar.close()
    for name, layer in quantized.items():  # tied to a parameter the checkpoint holds under its other name
        module_id = source_of[id(layer)]
        if id(layer) not in filled and module_id in tied and not _on_meta(model, tied[module_id]):
            quantize_into(layer, name, tied[module_id], model.get_parameter(tied[module_id]))
    _check_complete(model, quantized, filled, path)
    _warn_unexpected(unexpected, getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
    report_replaced(len(by_id), scheme, verbose)
    _attach_generation_config(model, path)
    return model.to(device).eval()


def _on_meta(model: nn.Module, name: str) -> bool:
    return model.get_parameter(name).device.type == "meta"


def _progress_bar(progress: Optional[bool], files: List[str], scheme: str):
    """A tqdm bar over the checkpoint's tensors when asked (default: more than one shard)."""
    if not (progress or (progress is None and len(files) > 1)):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    from safetensors import safe_open
    total = 0
    for file in files:
        with safe_open(file, framework="pt") as f:
            total += len(list(f.keys()))
    return tqdm(total=total, desc=f"quantizing to {scheme}", unit="tensor")


def _check_complete(model: nn.Module, quantized: Dict[str, QLinear], filled: set, path: str) -> None:
    """Every parameter and quantized layer came from the checkpoint (a missing one would be left
    on meta, or as the skeleton's placeholder)."""
    missing = [name for name, layer in quantized.items() if id(layer) not in filled]
    missing += [name for name, p in model.named_parameters(remove_duplicate=False) if p.device.type == "meta"]
    missing += [f"{name}.bias" if name else "bias" for name, layer in quantized.items()
                if layer.bias is not None and layer.bias.device.type == "meta"]
    if missing:
        raise CheckpointMismatch(f"{WHO}: the checkpoint in {path} has no tensor for {len(missing)} of the model's "
                                 f"weights ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); "
                                 "is model_class the checkpoint's model? Checkpoints that transformers converts "
                                 "while loading need from_pretrained and quantize_model")


def _warn_unexpected(unexpected: List[str], ignore: List[str]) -> None:
    """Checkpoint tensors the model has no place for (a head the chosen class lacks), as
    from_pretrained reports them; the patterns the model class declares ignorable are not."""
    import re
    import warnings
    left = [key for key in unexpected if not any(re.search(pattern, key) for pattern in ignore)]
    if left:
        warnings.warn(f"{WHO}: {len(left)} checkpoint tensors have no place in the model and were skipped "
                      f"({', '.join(left[:5])}{', ...' if len(left) > 5 else ''})", stacklevel=3)


def _attach_generation_config(model: nn.Module, path: str) -> None:
    """from_pretrained reads generation_config.json too (generate's defaults)."""
    if os.path.isfile(os.path.join(path, "generation_config.json")) and hasattr(model, "generation_config"):
        from transformers import GenerationConfig
        model.generation_config = GenerationConfig.from_pretrained(path)
