"""save_quantized / load_quantized: safetensors plus a small JSON config, written atomically, loaded
into a meta-device skeleton without a full-precision copy and without unpickling anything."""

import contextlib
import json
import os
import uuid
from typing import Callable, Dict, Optional, Union

import torch
from torch import nn

from ._files import atomic_write, make_directory, write_text
from ._ops import _FLOAT_DTYPES
from .embedding import QEmbedding
from .experts import QExpertsWeight, expert_projections, install_projection
from .nn import QLinear, scales_usable
from .weights import check_format

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "linquant.json"
FORMAT_VERSION = 1
# Written into both files by one save (the safetensors header metadata and linquant.json).
SAVE_ID_KEY = "linquant_save_id"


def save_quantized(model: nn.Module, path: str, metadata: Optional[dict] = None) -> None:
    """Writes `path`/model.safetensors (every parameter and persistent buffer) and
    `path`/linquant.json (which modules are QLinear and which experts projections QExpertsWeight,
    and their formats; tied tensors; for a Hugging
    Face model its class and config, so that `load_quantized(path)` rebuilds it alone; `metadata`,
    a JSON-serializable dict, e.g. the source model that `linquant eval` reloads). Everything is
    checked before either file is touched; both files carry the same random save id, so a pair
    from two saves (one interrupted between its two renames) is refused at load."""
    from safetensors.torch import save_file

    modules = {name: {"in_features": m.in_features, "out_features": m.out_features, "bits": m.bits,
                      "group_size": m.group_size, "symmetric": m.symmetric, "bias": m.bias is not None,
                      "dtype": str(m.scales.dtype).replace("torch.", "")}
               for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, QLinear)}
    experts = {name: {"num_experts": m.num_experts, "in_features": m.in_features, "out_features": m.out_features,
                      "bits": m.bits, "group_size": m.group_size, "symmetric": m.symmetric,
                      "dtype": str(m.scales.dtype).replace("torch.", "")}
               for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, QExpertsWeight)}
    embeddings = {name: {"num_embeddings": m.num_embeddings, "embedding_dim": m.embedding_dim,
                         "padding_idx": m.padding_idx, "bits": m.bits, "group_size": m.group_size,
                         "symmetric": m.symmetric, "dtype": str(m.scales.dtype).replace("torch.", "")}
                  for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, QEmbedding)}
    if not modules and not experts and not embeddings:
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
    save_id = uuid.uuid4().hex
    config = {"format": "linquant", "format_version": FORMAT_VERSION, "save_id": save_id, "modules": modules,
              "tied": tied, "metadata": {} if metadata is None else metadata}
    # Only when there are any, so that files without them stay readable by readers from before them.
    if experts:
        config["experts"] = experts
    if embeddings:
        config["embeddings"] = embeddings
    description = _transformers_description(model)
    if description is not None:
        config["transformers"] = description
    config_text = _config_text(config)
    make_directory(path, "linquant.save_quantized: path")
    atomic_write(os.path.join(path, WEIGHTS_NAME),
                 lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", SAVE_ID_KEY: save_id}))
    write_text(os.path.join(path, CONFIG_NAME), config_text)


def _transformers_description(model: nn.Module) -> Optional[dict]:
    """A Hugging Face model's class name and full config (what `model_class(config)` needs to
    build it again), or None for other models."""
    config = getattr(model, "config", None)
    if not type(model).__module__.startswith("transformers.") or not hasattr(config, "to_json_string"):
        return None
    return {"class": type(model).__name__, "config": json.loads(config.to_json_string(use_diff=False))}


def _config_text(config: dict) -> str:
    """linquant.json's text; only the caller's metadata can fail to serialize."""
    if not isinstance(config["metadata"], dict):
        raise ValueError("linquant.save_quantized: metadata must be a dict (a JSON object), got "
                         f"{type(config['metadata']).__name__}")
    try:  # allow_nan=False: NaN is not JSON, and other readers of the file would refuse it
        return json.dumps(config, indent=1, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"linquant.save_quantized: metadata must hold only JSON values (dict, list, str, "
                         f"finite number, bool, None): {e}") from None


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


def read_config(path: str) -> dict:
    """`path`/linquant.json, checked field by field: a hand-edited or damaged entry is a ValueError
    that names it, not a KeyError, TypeError or AttributeError from deep inside the loader."""
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"linquant.load_quantized: {cfg_path} not found (not a save_quantized directory)")
    try:
        with open(cfg_path) as f:
            config = json.load(f)
    except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"linquant.load_quantized: {cfg_path} is not valid JSON: {e}") from None
    except RecursionError:  # json nests one Python call per level: '[' * 100000 exhausts the stack
        raise ValueError(f"linquant.load_quantized: {cfg_path} is not a linquant config: its JSON nests too "
                         "deeply") from None
    if not isinstance(config, dict) or config.get("format") != "linquant" or \
            config.get("format_version") != FORMAT_VERSION:
        found = config if not isinstance(config, dict) else \
            f"format {config.get('format')!r}, version {config.get('format_version')!r}"
        raise ValueError(f"linquant.load_quantized: {cfg_path} is not a linquant format {FORMAT_VERSION} config "
                         f"({found})")
    modules, tied = config.get("modules"), config.get("tied", {})
    experts, embeddings = config.get("experts", {}), config.get("embeddings", {})
    if not isinstance(modules, dict) or not isinstance(tied, dict):
        raise ValueError(f"linquant.load_quantized: {cfg_path}: 'modules' and 'tied' must be JSON objects")
    for key, value in (("experts", experts), ("embeddings", embeddings)):
        if not isinstance(value, dict):
            raise ValueError(f"linquant.load_quantized: {cfg_path}: '{key}' must be a JSON object")
    for name, source in tied.items():
        if not isinstance(source, str):
            raise ValueError(f"linquant.load_quantized: {cfg_path}: 'tied' maps {name!r} to {source!r}; expected "
                             "the name of the tensor it shares (a string)")
    if not isinstance(config.get("metadata", {}), dict):
        raise ValueError(f"linquant.load_quantized: {cfg_path}: 'metadata' must be a JSON object, got "
                         f"{config['metadata']!r}")
    if not isinstance(config.get("save_id", ""), str):  # absent in files from before save ids
        raise ValueError(f"linquant.load_quantized: {cfg_path}: 'save_id' must be a string, got {config['save_id']!r}")
    description = config.get("transformers", {"class": "", "config": {"model_type": ""}})
    if not isinstance(description, dict) or not isinstance(description.get("class"), str) or \
            not isinstance(description.get("config"), dict) or \
            not isinstance(description["config"].get("model_type"), str):
        raise ValueError(f"linquant.load_quantized: {cfg_path}: 'transformers' must be an object with a 'class' "
                         "name and a 'config' object holding a 'model_type'")
    twice = sorted(set(modules) & set(embeddings) | set(modules) & set(experts) | set(embeddings) & set(experts))
    if twice:
        raise ValueError(f"linquant.load_quantized: {cfg_path} lists {twice[0]!r} twice (among modules, embeddings "
                         "and experts)")
    for name, spec in modules.items():
        _check_module_spec(f"linquant.load_quantized: {cfg_path}: module {name!r}", spec, _SPEC_TYPES)
    for name, spec in experts.items():
        _check_module_spec(f"linquant.load_quantized: {cfg_path}: experts projection {name!r}", spec,
                           _EXPERTS_SPEC_TYPES)
    for name, spec in embeddings.items():
        where = f"linquant.load_quantized: {cfg_path}: embedding {name!r}"
        _check_module_spec(where, spec, _EMBEDDING_SPEC_TYPES)
        rows, padding_idx = spec["num_embeddings"], spec["padding_idx"]
        if padding_idx is not None and not 0 <= padding_idx < rows:  # as save_quantized writes it: normalized
            raise ValueError(f"{where} has an invalid 'padding_idx' (expected null or an integer from 0 to "
                             f"num_embeddings - 1 = {rows - 1}, got {padding_idx})")
    return config


_SPEC_TYPES = {"in_features": int, "out_features": int, "bits": int, "group_size": (int, type(None)),
               "symmetric": bool, "bias": bool, "dtype": str}
_EXPERTS_SPEC_TYPES = {"num_experts": int, **{k: v for k, v in _SPEC_TYPES.items() if k != "bias"}}
_EMBEDDING_SPEC_TYPES = {"num_embeddings": int, "embedding_dim": int, "padding_idx": (int, type(None)),
                         **{k: v for k, v in _SPEC_TYPES.items() if k not in ("bias", "in_features", "out_features")}}
_SCALE_DTYPES = {str(d).replace("torch.", ""): d for d in _FLOAT_DTYPES}  # as save_quantized names them
# Far above any real layer, and low enough that out_features x in_features fits torch's int64 sizes.
_MAX_FEATURES = 2**31 - 1


def _check_module_spec(where: str, spec, types: dict) -> None:
    """A module or experts entry as save_quantized writes it, with the fields `types` lists."""
    if not isinstance(spec, dict):
        raise ValueError(f"{where} must be a JSON object")
    for key, kind in types.items():
        value = spec.get(key)
        if key not in spec or not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            expected = " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__
            raise ValueError(f"{where} has a missing or invalid {key!r} (expected {expected}, got {value!r})")
    for key in [k for k in ("num_experts", "in_features", "out_features", "num_embeddings", "embedding_dim")
                if k in types]:
        if not 0 <= spec[key] <= _MAX_FEATURES:
            raise ValueError(f"{where} has an invalid {key!r} (expected an integer from 0 to {_MAX_FEATURES}, "
                             f"got {spec[key]})")
    check_format(spec["bits"], spec["group_size"], where)
    if spec["dtype"] not in _SCALE_DTYPES:
        raise ValueError(f"{where} has an invalid 'dtype' (expected one of {', '.join(_SCALE_DTYPES)}, "
                         f"got {spec['dtype']!r})")


def _load_device(device) -> str:
    """The device the file's tensors are read onto, as safetensors spells it."""
    if device is None:
        return "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"linquant.load_quantized: device {device!r} is not a torch device ({e})") from None
    if dev.type == "meta":
        raise ValueError("linquant.load_quantized: device 'meta' is not a load target: meta tensors hold no data. "
                         "Build the model under `with torch.device('meta'):` for a skeleton without weights")
    if dev.type == "cuda" and not torch.cuda.is_available():  # said before safetensors' own driver error
        raise ValueError(f"linquant.load_quantized: device {device!r} needs a CUDA GPU, and torch sees none here "
                         "(torch.cuda.is_available() is False)")
    return str(dev)


def _read_weights(path: str, config: dict, device: str) -> Dict[str, torch.Tensor]:
    """model.safetensors' tensors, read onto `device`, if the file comes from the save that wrote
    `config`. Both files carry that save's id: a pair from two saves (one interrupted between its
    two renames, or files copied from two directories) would load one model's weights under
    another's formats and metadata. Files from before save ids have neither. The id and the
    tensors come from one open of the file, so a save running meanwhile cannot slip between them."""
    from safetensors import SafetensorError, safe_open

    weights = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"linquant.load_quantized: {weights} not found (an incomplete save_quantized "
                                "directory)")
    try:
        with safe_open(weights, framework="pt", device=device) as f:
            weights_id, config_id = (f.metadata() or {}).get(SAVE_ID_KEY), config.get("save_id")
            if weights_id != config_id:
                raise ValueError(f"linquant.load_quantized: {WEIGHTS_NAME} and {CONFIG_NAME} in {path} come from "
                                 f"different saves (save ids {weights_id!r} and {config_id!r}): a save_quantized was "
                                 "interrupted between its two files, or the files were copied from two saves; "
                                 "save the model again")
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"linquant.load_quantized: cannot read {weights}: {e} (truncated or corrupt file?)") from e


def _transformers_factory(path: str, config: dict) -> Callable[[], nn.Module]:
    """Builds the Hugging Face model that save_quantized described in linquant.json."""
    description = config.get("transformers")
    if description is None:
        raise ValueError(f"linquant.load_quantized: {path} holds no Hugging Face model description (saved from "
                         "another kind of model): pass model_or_factory, a callable that builds the model")
    try:
        import transformers
        from transformers import CONFIG_MAPPING
    except ImportError as e:
        raise ImportError(f"linquant.load_quantized: {path} holds a Hugging Face model; building it needs "
                          f"transformers ({e})") from None
    model_class = getattr(transformers, description["class"], None)
    model_type = description["config"]["model_type"]
    if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
        raise ValueError(f"linquant.load_quantized: {path}: transformers {transformers.__version__} has no model "
                         f"class {description['class']!r}")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"linquant.load_quantized: {path}: transformers {transformers.__version__} does not know "
                         f"model_type {model_type!r}")
    return lambda: model_class(CONFIG_MAPPING[model_type].from_dict(description["config"]))


def _build_model(model_or_factory) -> nn.Module:
    if isinstance(model_or_factory, nn.Module):
        return model_or_factory
    if not callable(model_or_factory):
        raise TypeError("linquant.load_quantized: model_or_factory must be an nn.Module or a callable that "
                        f"builds one, got {type(model_or_factory).__name__}")
    with _parameters_on_meta():
        model = model_or_factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"linquant.load_quantized: model_or_factory returned {type(model).__name__}, "
                        "expected an nn.Module")
    return model


def _put(model: nn.Module, name: str, layer: nn.Module) -> nn.Module:
    """`layer` in place of module `name`; the layer itself when the name is the model's ("")."""
    if not name:
        return layer
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    return model


def _retie(model: nn.Module, tied: Dict[str, str]) -> None:
    """Each tied name holds its source's very Parameter or buffer, as in the model that was saved
    (load_state_dict(assign=True) wraps each name's tensor in a Parameter of its own): a language
    model's lm_head its token embedding's weight, or a QLinear head its QEmbedding's table."""
    for name, source in tied.items():
        holder_name, _, attr = name.rpartition(".")
        source_name, _, source_attr = source.rpartition(".")
        holder, owner = model.get_submodule(holder_name), model.get_submodule(source_name)
        if attr in holder._parameters and source_attr in owner._parameters:
            holder._parameters[attr] = owner._parameters[source_attr]
        elif attr in holder._buffers and source_attr in owner._buffers:
            holder._buffers[attr] = owner._buffers[source_attr]


def load_quantized(path: str, model_or_factory: Union[nn.Module, Callable[[], nn.Module], None] = None,
                   device: Union[str, torch.device, None] = None) -> nn.Module:
    """Loads a save_quantized directory. `model_or_factory` is a callable that builds the model
    (called with its parameters on the meta device, so no full-precision copy is made) or a
    model, whose parameters are replaced; None (for a Hugging Face model's save) builds the model
    from the class and config that linquant.json records. QLinear layers are swapped in per the
    config (and QExpertsWeight in place of the experts projections it lists) and every tensor is
    assigned from the file; peak memory stays near the quantized size.
    With `device` (e.g. "cuda") the file's tensors are read straight onto that device and the
    model's other buffers follow. The model is returned in eval mode."""
    load_device = _load_device(device)
    config = read_config(path)
    state = _read_weights(path, config, load_device)
    model = _build_model(_transformers_factory(path, config) if model_or_factory is None else model_or_factory)
    for name, spec in config["modules"].items():
        try:
            model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"linquant.load_quantized: the model has no module {name!r} that the file "
                             "quantized; is this the right model?") from None
        layer = QLinear(spec["in_features"], spec["out_features"], spec["bias"], spec["bits"], spec["group_size"],
                        spec["symmetric"], device="meta", dtype=_SCALE_DTYPES[spec["dtype"]])
        model = _put(model, name, layer)
    for name, spec in config.get("embeddings", {}).items():
        try:
            model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"linquant.load_quantized: the model has no module {name!r} that the file "
                             "quantized; is this the right model?") from None
        table = QEmbedding(spec["num_embeddings"], spec["embedding_dim"], spec["bits"], spec["group_size"],
                           spec["symmetric"], spec["padding_idx"], device="meta", dtype=_SCALE_DTYPES[spec["dtype"]])
        model = _put(model, name, table)
    for name, spec in config.get("experts", {}).items():
        parent_name, _, attr = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
        except AttributeError:
            parent = None
        if parent is None or attr not in expert_projections(parent):
            raise ValueError(f"linquant.load_quantized: the model has no experts projection {name!r} that the file "
                             "quantized; is this the right model?")
        install_projection(parent, attr, QExpertsWeight(spec["num_experts"], spec["in_features"], spec["out_features"],
                                                        spec["bits"], spec["group_size"], spec["symmetric"],
                                                        device="meta", dtype=_SCALE_DTYPES[spec["dtype"]]))
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
    specs = {**config["modules"], **config.get("experts", {}), **config.get("embeddings", {})}  # no name twice
    for name, spec in specs.items():
        # The format's float tensors, which assign=True would take in any float dtype, and the
        # kernels refuse at the first forward: scales in the entry's dtype, a bias in one of
        # linear's (any of the three, whatever the scales' one).
        prefix = f"{name}." if name else ""
        scales = state[prefix + "scales"]
        if scales.dtype != _SCALE_DTYPES[spec["dtype"]]:
            raise ValueError(f"linquant.load_quantized: {prefix + 'scales'!r} is {scales.dtype} in the file but the "
                             f"layer's format needs {spec['dtype']}")
        bias = state[prefix + "bias"] if spec.get("bias") else None
        if bias is not None and bias.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"linquant.load_quantized: {prefix + 'bias'!r} is {bias.dtype} in the file but the "
                             "layer's format needs float32, float16 or bfloat16")
        # damaged scales: NaN or inf outputs, silently
        if not scales_usable(scales):
            raise ValueError(f"linquant.load_quantized: the scales of {name or 'the model'!r} hold values that are "
                             "not finite and positive (a damaged file?)")
    model.load_state_dict(state, assign=True, strict=True)
    _retie(model, config.get("tied", {}))
    if device is not None:
        model.to(load_device)  # buffers the file does not hold (rotary tables and the like)
    return model.eval()  # like from_pretrained: loaded for inference
