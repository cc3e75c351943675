"""quantize_model (swap nn.Linear / transformers' Conv1D for QLinear in place) and footprint."""

import fnmatch
import logging
import warnings
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

from torch import nn

from .nn import QLinear
from .weights import check_format, check_method

log = logging.getLogger("linquant")

Exclude = Union[str, Iterable[str], Callable[[str, nn.Module], bool], None]
# Models without a head (encoders) lack it by design, so this pattern alone never warns unmatched.
DEFAULT_EXCLUDE = ("lm_head",)


def scheme_name(bits: int, group_size: Optional[int], symmetric: bool, method: str = "minmax") -> str:
    """The quantization scheme in words, e.g. "4-bit g128 asymmetric", "8-bit per-channel symmetric",
    "2-bit g64 asymmetric, mse scales" (minmax, the default, goes unsaid)."""
    granularity = "per-channel" if group_size is None else f"g{group_size}"
    scales = "" if method == "minmax" else f", {method} scales"
    return f"{bits}-bit {granularity} {'symmetric' if symmetric else 'asymmetric'}{scales}"


def _is_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D (GPT-2): a linear layer whose weight is stored [in, out].
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def _patterns(exclude: Exclude) -> List[str]:
    """The names / glob patterns of a non-callable `exclude`."""
    if exclude is None:
        return []
    return [exclude] if isinstance(exclude, str) else list(exclude)


def _matches(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], pattern)


def _excluded(name: str, module: nn.Module, exclude: Exclude) -> bool:
    if callable(exclude):
        return bool(exclude(name, module))
    return any(_matches(name, p) for p in _patterns(exclude))


def _linear_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(name, module) of every nn.Linear / Conv1D under every name it has."""
    return [(name, module) for name, module in model.named_modules(remove_duplicate=False)
            if isinstance(module, nn.Linear) or _is_conv1d(module)]


def _not_excluded(linears: List[Tuple[str, nn.Module]], exclude: Exclude) -> List[Tuple[str, nn.Module, bool]]:
    return [(name, module, _is_conv1d(module)) for name, module in linears if not _excluded(name, module, exclude)]


def quantizable_layers(model: nn.Module, exclude: Exclude = DEFAULT_EXCLUDE) -> List[Tuple[str, nn.Module, bool]]:
    """(name, module, transposed) of every nn.Linear / Conv1D that `exclude` does not name, under
    every name it has (a module registered at two places is listed at both). `exclude` takes
    names or glob patterns, matched against the full module name or its last component, or a
    predicate (name, module) -> bool."""
    return _not_excluded(_linear_layers(model), exclude)


def _warn_unmatched_patterns(linears: List[Tuple[str, nn.Module]], exclude: Exclude, who: str) -> None:
    """A pattern that names no layer is most likely a typo, and since `exclude` replaces the
    default, it also stops lm_head from being kept: say so rather than quantize it silently."""
    if callable(exclude):
        return
    for pattern in _patterns(exclude):
        if pattern not in DEFAULT_EXCLUDE and not any(_matches(name, pattern) for name, _ in linears):
            warnings.warn(f"{who}: exclude pattern {pattern!r} matches no nn.Linear or Conv1D "
                          f"layer, so it keeps nothing in full precision (a pattern matches a layer's full name "
                          f"or its last component; exclude replaces the default {list(DEFAULT_EXCLUDE)})",
                          stacklevel=4)


def parameter_holders(model: nn.Module) -> Dict[int, List[Tuple[str, str, nn.Module]]]:
    """By parameter (its id): (module name, attribute, module) of every module holding it, under
    every name the module has, in named_modules' order (tied weights have several)."""
    holders: Dict[int, List[Tuple[str, str, nn.Module]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, param in module._parameters.items():
            if param is not None:
                holders.setdefault(id(param), []).append((module_name, attr, module))
    return holders


def _warn_tied_weights(model: nn.Module, layers: List[Tuple[str, nn.Module, bool]], who: str) -> None:
    """A layer whose weight another module also holds (lm_head tied to the token embedding):
    quantizing it unties them, the other module keeps the float weight, and the model grows by
    the quantized copy."""
    holders = parameter_holders(model)
    for name, module, _ in layers:
        others = [other for other, _, holder in holders.get(id(module.weight), []) if holder is not module]
        if others:
            warnings.warn(f"{who}: layer {name!r} shares its weight with {others[0]!r} (tied "
                          f"weights); quantizing it breaks the tie and adds the quantized copy to the model's "
                          f"bytes (exclude {name!r} to keep the tie)", stacklevel=4)


def layers_to_quantize(model: nn.Module, bits: int, group_size: Optional[int], method: str, exclude: Exclude,
                       who: str) -> List[Tuple[str, nn.Module, bool]]:
    """quantizable_layers after checking the format and method, with the warnings `who`
    (quantize_model, quantize_pretrained) gives: an exclude pattern that matches no layer, nothing
    to quantize, a layer whose weight is tied to another module's."""
    check_format(bits, group_size, who)
    check_method(method, who)
    linears = _linear_layers(model)
    _warn_unmatched_patterns(linears, exclude, who)
    layers = _not_excluded(linears, exclude)
    if not layers:
        warnings.warn(f"{who}: nothing to quantize (no nn.Linear or Conv1D outside exclude)", stacklevel=3)
    _warn_tied_weights(model, layers, who)
    return layers


def replace_layers(model: nn.Module, layers: List[Tuple[str, nn.Module, bool]],
                   make_layer: Callable[[str, nn.Module, bool], QLinear], who: str, scheme: str,
                   progress: Optional[bool] = None) -> Tuple[nn.Module, Dict[int, QLinear]]:
    """Puts make_layer(name, module, transposed) in place of each of `layers` (in place; the
    QLinear itself comes back when the model is the layer) and returns the model and the
    QLinears by id of the module they replace. A module registered at two places becomes one
    QLinear at both: listed once (named_modules' default), its second place would keep the float
    layer, quietly half quantizing the model. `progress` shows a bar (default: more than 16 layers)."""
    iterator = layers
    if progress or (progress is None and len(layers) > 16):
        try:
            from tqdm.auto import tqdm
            iterator = tqdm(layers, desc=f"quantizing to {scheme}", unit="layer")
        except ImportError:
            pass
    quantized: Dict[int, QLinear] = {}
    for name, module, transposed in iterator:
        try:
            layer = quantized.get(id(module)) or make_layer(name, module, transposed)
        except ValueError as e:  # e.g. NaN weights: say which layer
            raise ValueError(f"{who}: layer {name or '(the model)'!r}: {e}") from e
        quantized[id(module)] = layer
        if name:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        else:  # the model is itself a Linear: nothing holds it, so the QLinear is what comes back
            model = layer
    return model, quantized


def report_replaced(count: int, scheme: str, verbose: bool) -> None:
    """The summary line, to the "linquant" logger and, when verbose, to stdout."""
    summary = f"linquant: replaced {count} layers with {scheme} QLinear"
    log.info(summary)
    if verbose:
        print(summary)


def quantize_model(model: nn.Module, bits: int = 8, group_size: Optional[int] = None, symmetric: bool = True,
                   exclude: Exclude = DEFAULT_EXCLUDE, progress: Optional[bool] = None,
                   verbose: bool = False, method: str = "minmax") -> nn.Module:
    """Replaces, in place, every nn.Linear and transformers Conv1D (but those `exclude` names) with
    a QLinear of `bits` bits (per output channel when group_size is None; scales chosen by
    `method`, quantize_weight's "minmax" or "mse") and returns the model
    (the QLinear itself when the model is a bare Linear). bits and group_size are checked before
    any layer changes. `progress` shows a bar (default: when there are more than 16 layers); the
    summary is logged to the "linquant" logger and printed when verbose. Warns of an exclude pattern
    that matches no layer and of a layer whose weight is tied to another module's."""
    who = "linquant.quantize_model"
    layers = layers_to_quantize(model, bits, group_size, method, exclude, who)
    if not layers:
        return model
    scheme = scheme_name(bits, group_size, symmetric, method)
    model, quantized = replace_layers(
        model, layers, lambda name, module, transposed: QLinear.from_linear(module, bits, group_size, symmetric,
                                                                            transposed=transposed, method=method),
        who, scheme, progress)
    report_replaced(len(quantized), scheme, verbose)
    return model


def footprint(model: nn.Module) -> Dict[str, object]:
    """Bytes of every parameter and buffer, packed buffers at their real size: {"total": int,
    "by_module": {module name: bytes of its own tensors}}. Tensors shared between modules (tied
    weights) count once, as in transformers' get_memory_footprint."""
    seen = set()
    by_module: Dict[str, int] = {}
    total = 0
    for mod_name, module in model.named_modules():
        own = 0
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.dtype) if t.device.type != "meta" \
                else id(t)
            if key in seen:
                continue
            seen.add(key)
            own += t.numel() * t.element_size()
        if own:
            by_module[mod_name] = own
            total += own
    return {"total": total, "by_module": by_module}
