"""quantize_model (swap nn.Linear / transformers' Conv1D for QLinear in place) and footprint."""

import fnmatch
import logging
import warnings
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

from torch import nn

from .nn import QLinear
from .weights import check_format

log = logging.getLogger("linquant")

Exclude = Union[str, Iterable[str], Callable[[str, nn.Module], bool], None]


def _is_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D (GPT-2): a linear layer whose weight is stored [in, out].
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def _excluded(name: str, module: nn.Module, exclude: Exclude) -> bool:
    if exclude is None:
        return False
    if callable(exclude):
        return bool(exclude(name, module))
    patterns = [exclude] if isinstance(exclude, str) else list(exclude)
    last = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(last, p) for p in patterns)


def quantizable_layers(model: nn.Module, exclude: Exclude = ("lm_head",)) -> List[Tuple[str, nn.Module, bool]]:
    """(name, module, transposed) of every nn.Linear / Conv1D that `exclude` does not name, under
    every name it has (a module registered at two places is listed at both). `exclude` takes
    names or glob patterns, matched against the full module name or its last component, or a
    predicate (name, module) -> bool."""
    found = []
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, nn.Linear) or _is_conv1d(module):
            if not _excluded(name, module, exclude):
                found.append((name, module, _is_conv1d(module)))
    return found


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantize_model(model: nn.Module, bits: int = 8, group_size: Optional[int] = None, symmetric: bool = True,
                   exclude: Exclude = ("lm_head",), progress: Optional[bool] = None,
                   verbose: bool = False) -> nn.Module:
    """Replaces, in place, every nn.Linear and transformers Conv1D (but those `exclude` names) with
    a QLinear of `bits` bits (per output channel when group_size is None) and returns the model
    (the QLinear itself when the model is a bare Linear). bits and group_size are checked before
    any layer changes. `progress` shows a bar (default: when there are more than 16 layers); the
    summary is logged to the "linquant" logger and printed when verbose."""
    check_format(bits, group_size, "linquant.quantize_model")
    layers = quantizable_layers(model, exclude)
    if not layers:
        warnings.warn("linquant.quantize_model: nothing to quantize (no nn.Linear or Conv1D outside exclude)",
                      stacklevel=2)
        return model
    iterator = layers
    if progress or (progress is None and len(layers) > 16):
        try:
            from tqdm.auto import tqdm
            iterator = tqdm(layers, desc=f"quantizing to {bits} bits", unit="layer")
        except ImportError:
            pass
    # A layer registered at two places becomes one QLinear at both: listed once (named_modules'
    # default), its second place would keep the float layer, quietly half quantizing the model.
    quantized: Dict[int, QLinear] = {}
    for name, module, transposed in iterator:
        try:
            layer = quantized.get(id(module)) or QLinear.from_linear(module, bits, group_size, symmetric,
                                                                     transposed=transposed)
        except ValueError as e:  # e.g. NaN weights: say which layer
            raise ValueError(f"linquant.quantize_model: layer {name or '(the model)'!r}: {e}") from e
        quantized[id(module)] = layer
        if name:
            _set_submodule(model, name, layer)
        else:  # the model is itself a Linear: nothing holds it, so the QLinear is what comes back
            model = layer
    summary = (f"linquant: replaced {len(quantized)} layers with {bits}-bit QLinear "
               f"({'per-channel' if group_size is None else f'group_size={group_size}'}, "
               f"{'symmetric' if symmetric else 'asymmetric'})")
    log.info(summary)
    if verbose:
        print(summary)
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
