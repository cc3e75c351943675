"""quantize_pretrained: a Hugging Face checkpoint quantized while it is read, one tensor at a time,
into a model built on the meta device, so peak memory is the quantized model plus one layer's
weight instead of the full-precision model (from_pretrained + quantize_model)."""

import json
import os
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from ._ops import _FLOAT_DTYPES
from .embedding import QEmbedding
from .experts import QExpertsWeight, install_projection, quantize_projection
from .model import (DEFAULT_EXCLUDE, Exclude, Format, layers_to_quantize, parameter_holders, replace_layers,
                    report_replaced, scheme_name, table_format)
from .nn import QLinear
from .serialization import _parameters_on_meta
from .weights import check_format, check_method

WHO = "linquant.quantize_pretrained"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointMismatch(ValueError):
    """The checkpoint's tensors do not map onto the model's parameters one by one (tensors that
    transformers merges or splits while loading them, such as the experts of a mixture of experts,
    or a checkpoint for another model class)."""


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
            model = model_class._from_config(config, dtype=dtype)
        elif hasattr(model_class, "from_config"):  # AutoModel, AutoModelForCausalLM, ...
            model = model_class.from_config(config, dtype=dtype)
        else:
            raise TypeError(f"{WHO}: model_class must be a transformers model class or Auto class, got "
                            f"{model_class!r}")
    _keep_in_float32(model, dtype)
    return model


def _keep_in_float32(model: nn.Module, dtype: torch.dtype) -> None:
    """The parameters and persistent buffers from_pretrained keeps in float32 at this dtype (its
    dtype plan: the model's _keep_in_fp32_modules at float16, _keep_in_fp32_modules_strict at
    float16 and bfloat16, e.g. T5's `wo`), converted to it, as from_pretrained loads them: a
    layer quantized from one then has float32 scales and bias, as quantize_model gives it."""
    plan = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}
    if not plan:
        return
    from transformers.core_model_loading import build_glob_alternation
    pattern, group_glob, _ = build_glob_alternation(list(plan))
    persistent = {name for name, _ in model.named_buffers(remove_duplicate=False)} & set(model.state_dict())
    for name, tensor in list(model.named_parameters(remove_duplicate=False)) + \
            [(n, b) for n, b in model.named_buffers(remove_duplicate=False) if n in persistent]:
        found = pattern.search(name)
        if found is None or not tensor.is_floating_point() or tensor.dtype == plan[group_glob[found.lastgroup]]:
            continue
        _replace(model, name, tensor.to(plan[group_glob[found.lastgroup]]))


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


class _KeyMap:
    """Checkpoint keys to the model's names as from_pretrained maps them: transformers' weight
    conversions for the model (transformers 5: a key renamed, e.g. GPT-NeoX's `embed_out` to
    `lm_head`, ViT's `encoder.layer.N.attention.attention.query` to `layers.N.attention.q_proj`,
    LayerNorm's `gamma` to `weight`), then the base model's prefix added or removed. A key one of
    its converters takes (tensors merged or split, e.g. a mixture of experts' per-expert weights
    fused into one 3-D parameter) is reported with the converter and the source pattern it matched."""

    def __init__(self, model: nn.Module):
        self.prefix = getattr(model, "base_model_prefix", "") or ""
        self.renamings, self.converters, self.apply_renamings = [], [], None
        try:  # transformers >= 5; earlier versions load checkpoints by name as they are
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightConverter, WeightRenaming, apply_renamings
        except ImportError:
            return
        conversions = get_model_conversion_mapping(model)
        self.renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
        self.converters = [c for c in conversions if isinstance(c, WeightConverter)]
        self.apply_renamings = apply_renamings

    def __call__(self, key: str, names: Dict[str, Tuple[str, str]]) -> Tuple[Optional[str], object, Optional[str]]:
        """(the model's name for `key` among `names`, or None; the converter that takes it, or None;
        the converter's source pattern it matched), as transformers' rename_source_key: every
        renaming, then the first converter that matches."""
        if self.apply_renamings is None:
            return _resolve(key, names, self.prefix), None, None
        renamed = self.apply_renamings(key, self.renamings)
        for converter in self.converters:
            converted, pattern = converter.rename_source_key(renamed)
            if pattern is not None:
                name = _resolve(converted, names, self.prefix)
                return (key, None, None) if name is None and key in names else (name, converter, pattern)
        name = _resolve(renamed, names, self.prefix)
        return (key, None, None) if name is None and key in names else (name, None, None)


# How transformers builds an experts projection from per-expert tensors (Mixtral, Qwen2/3-MoE,
# OLMoE, Phi-MoE, DeepSeek-V3, ...): stacked by expert, and for gate_up_proj the gate's and up's
# concatenated along the rows. Each row is quantized alone, so each tensor can be quantized
# into its rows of the projection as it is read, with the bits quantizing the merged one gives.
_STACKED_OPS = (("MergeModulelist", 0),), (("MergeModulelist", 0), ("Concatenate", 1))


def _stacks_experts(converter) -> bool:
    return tuple((type(op).__name__, getattr(op, "dim", None)) for op in converter.operations) in _STACKED_OPS


def _plan_converted(files: List[str], keys: List[List[str]], key_map: _KeyMap, names: Dict[str, Tuple[str, str]],
                    projection_of: Dict[Tuple[str, str], nn.Module], path: str) -> Dict[str, tuple]:
    """For each checkpoint key a converter takes: (experts module, projection attribute, expert,
    first row) of the rows it fills in a projection to quantize. Checkpoint tensors that transformers
    merges or splits otherwise cannot be read one at a time: refused before any layer is quantized."""
    from safetensors import safe_open
    from transformers.core_model_loading import dot_natural_key

    refused, groups = [], {}
    for file, file_keys in zip(files, keys):
        with safe_open(file, framework="pt", device="cpu") as f:
            for key in file_keys:
                name, converter, pattern = key_map(key, names)
                if converter is None or name is None:
                    continue
                target = projection_of.get(names[name])
                if target is None or target.is_transposed or not _stacks_experts(converter):
                    refused.append((key, name))
                    continue
                groups.setdefault(name, (converter, {}))[1].setdefault(pattern, []).append(
                    (key, tuple(f.get_slice(key).get_shape())))
    if refused:
        examples = ", ".join(f"{key} -> {name}" for key, name in refused[:3])
        raise CheckpointMismatch(
            f"{WHO}: transformers converts {len(refused)} of the checkpoint's tensors in {path} while loading "
            f"it, merging or splitting them into the model's parameters ({examples}"
            f"{', ...' if len(refused) > 3 else ''}), which reading one tensor at a time cannot do; load it with "
            "from_pretrained and quantize it with quantize_model")
    plan = {}
    for name, (converter, by_pattern) in groups.items():
        module = projection_of[names[name]]
        attr = names[name][1]
        num_experts, out_features, in_features = module._parameters[attr].shape
        start = 0
        for pattern in [p for p in converter.source_patterns if p in by_pattern]:  # Concatenate's order
            tensors = sorted(by_pattern[pattern], key=lambda item: dot_natural_key(item[0]))  # the loader's order
            shapes = {shape for _, shape in tensors}
            if len(tensors) != num_experts or len(shapes) != 1 or len(next(iter(shapes))) != 2 or \
                    next(iter(shapes))[1] != in_features:
                raise CheckpointMismatch(
                    f"{WHO}: the checkpoint's {len(tensors)} tensors for {name!r} ({tensors[0][0]}, ...) are "
                    f"{sorted(shapes)}; the model's {num_experts} experts take one [rows, {in_features}] each")
            for expert, (key, _) in enumerate(tensors):
                plan[key] = (module, attr, expert, start)
            start += next(iter(shapes))[0]
        if start != out_features:
            raise CheckpointMismatch(f"{WHO}: the checkpoint's tensors for {name!r} give each expert {start} rows; "
                                     f"the model's have {out_features}")
    return plan


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Gives parameter or buffer `name` the checkpoint's tensor, in the skeleton's dtype. A
    parameter held by several modules (tied weights) gets one Parameter at every holder."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    current = module._parameters[attr] if attr in module._parameters else module._buffers[attr]
    _check_shape(name, tensor, tuple(current.shape))
    _replace(model, name, tensor.to(current.dtype))


def _replace(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Puts `value` in place of parameter or buffer `name`: a parameter at every module that holds
    it (tied weights), keeping its requires_grad."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr not in module._parameters:
        module._buffers[attr] = value
        return
    current = module._parameters[attr]
    param = nn.Parameter(value, requires_grad=current.requires_grad)
    for holder in model.modules():  # every module that holds this parameter
        for holder_attr, p in holder._parameters.items():
            if p is current:
                holder._parameters[holder_attr] = param


def _check_shape(name: str, tensor: torch.Tensor, expected: tuple) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise CheckpointMismatch(f"{WHO}: {name!r} is {list(tensor.shape)} in the checkpoint but "
                                 f"{list(expected)} in the model")


def _tied_sources(model: nn.Module, layers, attr: str = "weight") -> Dict[int, str]:
    """For each layer to quantize whose `attr` (weight or bias) a module that stays also holds
    (lm_head tied to the token embedding, BERT's MLM decoder bias to `cls.predictions.bias`; one
    of the names is kept out of the checkpoint by save_pretrained), that module's parameter name:
    the layer takes it from there."""
    holders = parameter_holders(model)
    replaced = {id(module) for _, module, _ in layers}  # another layer to quantize holds no parameter after
    sources = {}
    for _, module, _ in layers:
        tensor = getattr(module, attr, None)
        others = [f"{module_name}.{name}" if module_name else name
                  for module_name, name, holder in holders.get(id(tensor), []) if id(holder) not in replaced] \
            if tensor is not None else []
        if others:
            sources[id(module)] = others[0]
    return sources


def quantize_pretrained(path: str, bits: int = 8, group_size: Optional[int] = None, symmetric: bool = True,
                        exclude: Exclude = DEFAULT_EXCLUDE, dtype: Union[torch.dtype, str] = torch.float32,
                        model_class=None,
                        device=None, progress: Optional[bool] = None, verbose: bool = False,
                        method: str = "minmax", embeddings: Union[bool, int] = False) -> nn.Module:
    """Loads the Hugging Face model in directory `path` (config.json and safetensors weights,
    sharded or not) quantized, reading its tensors one at a time: equal, tensor for tensor, to
    quantize_model(model_class.from_pretrained(path, dtype=dtype), bits, group_size, symmetric,
    exclude, method=method, embeddings=embeddings), with peak memory near the quantized model's size. `dtype` is the model's
    float dtype (scales, biases and the layers left in float; "auto": the one config.json records,
    as from_pretrained's dtype="auto"). `model_class` defaults to the class
    config.json names (e.g. AutoModel for an encoder's base model). The tensors are read and
    quantized on `device` (default CPU). Returned in eval mode, with the directory's
    generation_config.json when it has one. Checkpoint names are mapped as from_pretrained maps them
    (transformers' renamings for the model, the base model's prefix added or removed). Raises
    CheckpointMismatch when the checkpoint's tensors do not map onto the model one by one: a
    weight the checkpoint lacks (but those the model declares it may lack and initialises the same
    way every time), a shape that differs, tensors transformers merges or splits while loading
    (use from_pretrained and quantize_model for those)."""
    from safetensors import safe_open

    check_format(bits, group_size, WHO)
    check_method(method, WHO)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{WHO}: {path} is not a Hugging Face model directory (no config.json)")
    files = _checkpoint_files(path)
    model = build_skeleton(path, model_class, dtype)
    keys = []
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            keys.append(list(f.keys()))
    tables_in = table_format(embeddings, Format(bits, group_size, symmetric), WHO)
    layers, projections, tables = layers_to_quantize(model, bits, group_size, method, exclude, WHO,
                                                     tables_in is not None)
    # Embeddings to quantize take the layers' route; a head tied to one shares its table at the end
    # (and takes the table's format from the start, should the checkpoint hold it under its own name).
    table_of = {id(module.weight): module for _, module in tables}
    shares = {id(module): table_of[id(module.weight)] for _, module, t in layers if not t and id(module.weight) in table_of}
    layers = layers + [(name, module, False) for name, module in tables]
    # Experts projections are quantized as they are read: stored whole (3-D, as the model holds
    # them), or per expert, each tensor into its rows (_plan_converted).
    projection_of = {(name.rpartition(".")[0], attr): module for name, module, attr in projections}
    scheme = scheme_name(bits, group_size, symmetric, method)
    transposed = {id(module): t for _, module, t in layers}
    tied, tied_bias = _tied_sources(model, layers), _tied_sources(model, layers, "bias")
    # Tied parameters, as from_pretrained's tie_weights leaves them: one Parameter from whichever of
    # their names the checkpoint holds, from the first name (the embedding, not the head) when it
    # holds several alike; a name it holds with other values is untied, keeping its own.
    canonical = {id(p): name for name, p in model.named_parameters()}
    canonical_name = {name: canonical[id(p)] for name, p in model.named_parameters(remove_duplicate=False)}
    loaded_from: Dict[str, str] = {}  # by first name: the name its tensor was read under
    untied: Dict[str, torch.Tensor] = {}  # names whose tensor differs from their first name's

    def load_tied(name: str, tensor: torch.Tensor) -> None:
        first = canonical_name.get(name, name)  # buffers and untied parameters: their own
        previous = loaded_from.get(first)
        if previous is None or name == first:
            before = model.get_parameter(previous) if previous not in (None, name) else None
            _set_tensor(model, name, tensor)
            loaded_from[first] = name
            if before is not None and not torch.equal(before, model.get_parameter(name)):
                untied[previous] = before  # read under another name first: that one keeps it
        elif previous != first or not torch.equal(tensor.to(model.get_parameter(name).dtype),
                                                  model.get_parameter(name)):
            untied[name] = tensor  # differs from the first name's, or may (checked again in _untie)

    skeleton_tables: Dict[int, QEmbedding] = {}  # by weight: embeddings holding one weight share one table

    def skeleton(name: str, module: nn.Module, is_transposed: bool) -> nn.Module:
        if isinstance(module, nn.Embedding):
            return skeleton_tables.setdefault(id(module.weight), QEmbedding(
                module.num_embeddings, module.embedding_dim, *tables_in, module.padding_idx, device="meta",
                dtype=module.weight.dtype))
        in_features, out_features = module.weight.shape if is_transposed else module.weight.shape[::-1]
        return QLinear(in_features, out_features, getattr(module, "bias", None) is not None,
                       *(tables_in if id(module) in shares else (bits, group_size, symmetric)), device="meta",
                       dtype=module.weight.dtype)

    key_map = _KeyMap(model)  # transformers' conversions for the model, found before its layers are replaced
    model, by_id = replace_layers(model, layers, skeleton, WHO, scheme, progress=False)
    quantized = {name: by_id[id(module)] for name, module, _ in layers}  # under every name it has
    source_of = {id(layer): module_id for module_id, layer in by_id.items()}
    names = _tensor_names(model, quantized)
    expert_rows = _plan_converted(files, keys, key_map, names, projection_of, path)
    device = torch.device("cpu") if device is None else torch.device(device)
    filled, unexpected = set(), []

    def quantize_into(layer: nn.Module, module_name: str, name: str, weight: torch.Tensor) -> None:
        is_transposed = transposed[source_of[id(layer)]]
        if isinstance(layer, QEmbedding):
            _check_shape(name, weight, (layer.num_embeddings, layer.embedding_dim))
        else:
            _check_shape(name, weight, (layer.in_features, layer.out_features) if is_transposed else
                         (layer.out_features, layer.in_features))
        w = weight.to(device=device, dtype=layer.scales.dtype)
        try:
            layer.set_weight(w.t() if is_transposed else w, method)
        except ValueError as e:  # NaN or infinite weights
            raise ValueError(f"{WHO}: layer {module_name!r}: {e}") from e
        filled.add(id(layer))

    bar = _progress_bar(progress, keys, scheme)
    for file, file_keys in zip(files, keys):
        with safe_open(file, framework="pt", device="cpu") as f:
            for key in file_keys:
                name, _, _ = key_map(key, names)
                if bar is not None:
                    bar.update(1)
                if name is None:
                    unexpected.append(key)
                    continue
                module_name, attr = names[name]
                if module_name in quantized:
                    layer = quantized[module_name]
                    tensor = f.get_tensor(key)
                    holder = (tied_bias if attr == "bias" else tied).get(source_of[id(layer)])
                    if holder is not None and _on_meta(model, holder):  # the tied parameter's only name here,
                        _set_tensor(model, holder, tensor.to(device))  # unless its own comes later
                    if attr == "bias":
                        _check_shape(name, tensor, (layer.out_features,))
                        layer.set_bias(tensor.to(device))
                    elif id(layer) not in filled:  # a layer at two places may be saved under both
                        quantize_into(layer, module_name, name, tensor)
                elif key in expert_rows:
                    _quantize_expert_rows(*expert_rows[key], f.get_tensor(key), bits, group_size, symmetric, method,
                                          device, name)
                elif (module_name, attr) in projection_of:
                    module = projection_of[module_name, attr]
                    if attr in module._parameters:  # not yet read under another name of the module
                        weight = f.get_tensor(key)
                        _check_shape(name, weight, tuple(module._parameters[attr].shape))
                        weight = weight.to(device=device, dtype=module._parameters[attr].dtype)
                        try:
                            quantize_projection(module, attr, bits, group_size, symmetric, method, weight)
                        except ValueError as e:  # NaN or infinite weights
                            raise ValueError(f"{WHO}: experts projection {name!r}: {e}") from e
                else:
                    load_tied(name, f.get_tensor(key).to(device))
    if bar is not None:
        bar.close()
    _untie(model, untied)
    # A layer whose weight or bias the checkpoint holds only under the name of a module it is tied
    # to takes that parameter's tensor, as quantize_model quantizes the tied weight and copies the
    # tied bias.
    for name, layer in quantized.items():
        module_id = source_of[id(layer)]
        if module_id in tied and id(layer) not in filled and not _on_meta(model, tied[module_id]):
            quantize_into(layer, name, tied[module_id], model.get_parameter(tied[module_id]))
        if module_id in tied_bias and layer.bias.device.type == "meta" and not _on_meta(model, tied_bias[module_id]):
            layer.set_bias(model.get_parameter(tied_bias[module_id]))
    _share_tables(shares, by_id, filled)
    _initialise_declared_missing(model, device)
    _check_complete(model, quantized, filled, path)
    _warn_unexpected(unexpected, getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
    report_replaced(len(by_id) - len({id(m) for _, m in tables}), scheme, verbose, len(projections),
                    len(skeleton_tables), None if tables_in is None else scheme_name(*tables_in, method))
    _attach_generation_config(model, path)
    return model.to(device).eval()


def _share_tables(shares: Dict[int, nn.Module], by_id: Dict[int, nn.Module], filled: set) -> None:
    """A head tied to a quantized embedding holds the embedding's very table, as quantize_model's
    tied_head gives it after from_pretrained ties them: read under either name (the checkpoint
    keeps one), or under both with the same values. Held under both with different values,
    from_pretrained unties them, and each keeps its own."""
    for head_id, embedding in shares.items():
        head, table = by_id[head_id], by_id[id(embedding)]
        if id(head) in filled and id(table) in filled and not all(
                torch.equal(getattr(head, a), getattr(table, a)) for a in ("qweight", "scales", "zeros")
                if getattr(head, a) is not None):
            continue
        source, target = (table, head) if id(table) in filled else (head, table)
        if id(source) in filled:
            target.qweight, target.scales, target.zeros = source.qweight, source.scales, source.zeros
            filled.add(id(target))


def _quantize_expert_rows(module: nn.Module, attr: str, expert: int, start: int, tensor: torch.Tensor, bits: int,
                          group_size: Optional[int], symmetric: bool, method: str, device: torch.device,
                          name: str) -> None:
    """Quantizes one per-expert checkpoint tensor into its rows of experts projection `attr`,
    which becomes a QExpertsWeight (its buffers on `device`) at the first."""
    layer = getattr(module, attr)
    if not isinstance(layer, QExpertsWeight):
        num_experts, out_features, in_features = layer.shape
        dtype = layer.dtype
        layer = QExpertsWeight(num_experts, in_features, out_features, bits, group_size, symmetric, device="meta",
                               dtype=dtype)
        layer.allocate(device)
        install_projection(module, attr, layer)
    try:
        layer.set_rows(expert, start, tensor.to(device=device, dtype=layer.scales.dtype), method)
    except ValueError as e:  # NaN or infinite weights
        raise ValueError(f"{WHO}: experts projection {name!r}: {e}") from e


def _untie(model: nn.Module, untied: Dict[str, torch.Tensor]) -> None:
    """Names of a tied parameter the checkpoint holds with values other than the tensor the tie
    took get a Parameter of their own, as from_pretrained's tie_weights does not tie parameters
    whose checkpoint tensors differ."""
    for name, tensor in untied.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        current = module._parameters[attr]
        _check_shape(name, tensor, tuple(current.shape))
        value = tensor.to(current.dtype)
        if not torch.equal(value, current):
            module._parameters[attr] = nn.Parameter(value, requires_grad=current.requires_grad)


def _initialise_declared_missing(model: nn.Module, device: torch.device) -> None:
    """Parameters the checkpoint lacks that the model declares it may lack
    (_keys_to_ignore_on_load_missing; e.g. Marian's sinusoidal position tables, which
    save_pretrained leaves out) are initialised as from_pretrained initialises them, by the
    model's _init_weights, where that gives the same values under any random seed; those
    initialised at random stay on meta, for _check_complete to name."""
    import re
    patterns = list(getattr(model, "_keys_to_ignore_on_load_missing", None) or [])
    missing = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if not patterns or not missing:
        return
    from transformers import PreTrainedModel
    try:
        from transformers import initialization  # transformers >= 5: the init functions from_pretrained guards
    except ImportError:
        return
    declared = re.compile("|".join(f"(?:{pattern})" for pattern in patterns))
    by_module: Dict[str, List[str]] = {}
    for name in missing:
        module_name, _, attr = name.rpartition(".")
        by_module.setdefault(module_name, []).append(attr)
    owners = [(name, module) for name, module in model.named_modules() if isinstance(module, PreTrainedModel)]
    for module_name, attrs in by_module.items():
        if any(declared.search(f"{module_name}.{attr}" if module_name else attr) is None for attr in attrs):
            continue  # a weight the checkpoint should hold: missing
        module = model.get_submodule(module_name)
        # The innermost model holding it dispatches its init, as from_pretrained's initialize_weights.
        owner = max((o for o in owners if not o[0] or module_name == o[0] or module_name.startswith(o[0] + ".")),
                    key=lambda o: len(o[0]))[1]
        for attr, p in module._parameters.items():  # loaded: _init_weights leaves them, as from_pretrained marks them
            if p is not None and attr not in attrs:
                p._is_hf_initialized = True
        placeholders = {attr: module._parameters[attr] for attr in attrs}
        runs = []
        try:
            for seed in (0, 1):
                for attr, p in placeholders.items():
                    module._parameters[attr] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype),
                                                            requires_grad=p.requires_grad)
                with torch.random.fork_rng(devices=[]), torch.no_grad(), initialization.guard_torch_init_functions():
                    torch.manual_seed(seed)
                    owner._init_weights(module)
                runs.append({attr: module._parameters[attr].detach() for attr in attrs})
        except Exception:  # noqa: BLE001  an init that needs more than the module: left missing, and named
            runs = []
        module._parameters.update(placeholders)  # so that _replace finds every holder of each
        if runs and all(torch.equal(runs[0][attr], runs[1][attr]) for attr in attrs):
            for attr in attrs:
                _replace(model, f"{module_name}.{attr}" if module_name else attr, runs[1][attr].to(device))


def _on_meta(model: nn.Module, name: str) -> bool:
    return model.get_parameter(name).device.type == "meta"


def _progress_bar(progress: Optional[bool], keys: List[List[str]], scheme: str):
    """A tqdm bar over the checkpoint's tensors (`keys`: each file's) when asked (default: more
    than one shard)."""
    if not (progress or (progress is None and len(keys) > 1)):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=sum(len(file_keys) for file_keys in keys), desc=f"quantizing to {scheme}", unit="tensor")


def _check_complete(model: nn.Module, quantized: Dict[str, QLinear], filled: set, path: str) -> None:
    """Every parameter and quantized layer came from the checkpoint (a missing one would be left
    on meta, or as the skeleton's placeholder)."""
    missing = [name for name, layer in quantized.items() if id(layer) not in filled]
    missing += [name for name, p in model.named_parameters(remove_duplicate=False) if p.device.type == "meta"]
    missing += [f"{name}.bias" if name else "bias" for name, layer in quantized.items()
                if getattr(layer, "bias", None) is not None and layer.bias.device.type == "meta"]
    if missing:
        raise CheckpointMismatch(f"{WHO}: the checkpoint in {path} has no tensor for {len(missing)} of the model's "
                                 f"weights ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}), which "
                                 "from_pretrained would initialise rather than load; is model_class the checkpoint's "
                                 "model?")


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
