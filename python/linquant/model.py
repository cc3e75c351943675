"""quantize_model (swap nn.Linear / transformers' Conv1D for QLinear in place) and footprint."""

import fnmatch
import logging
import warnings
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .embedding import QEmbedding
from .experts import expert_projections, experts_modules, quantize_projection
from .nn import QLinear
from .weights import check_format, check_method, is_int

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


class Format(NamedTuple):
    bits: int
    group_size: Optional[int]
    symmetric: bool


def table_format(embeddings: Union[bool, int], layers: Format, who: str) -> Optional[Format]:
    """The format quantize_model gives the embeddings (and the heads tied to them): none when
    `embeddings` is False, the layers' when True, `embeddings` bits per channel, symmetric, when
    it is a bit count (a language model's table and tied head at 8 bits beside 4-bit layers)."""
    if embeddings is True or embeddings is False:
        return layers if embeddings else None
    if not is_int(embeddings) or embeddings not in (8, 4, 2):
        raise ValueError(f"{who}: embeddings must be True, False or the tables' bits (8, 4 or 2), got {embeddings!r}")
    return Format(embeddings, None, True)


def _is_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D (GPT-2): a linear layer whose weight is stored [in, out].
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def _computes_linear(module: nn.Linear) -> bool:
    """nn.Linear, or a subclass whose forward still computes x W^T + b (Falcon's FalconLinear writes
    it out), checked on a probe input: not one computing something else with a Linear's weight
    (Phi-MoE's and Llama 4's routers return top-k choices), which QLinear would silently replace.
    On the meta device (quantize_pretrained's skeleton) only the output's type and shape can be
    checked."""
    if type(module).forward is nn.Linear.forward:
        return True
    w = module.weight
    x = torch.randn(2, module.in_features, generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
    with torch.no_grad():
        try:
            y = module(x)
        except Exception:  # noqa: BLE001 - a forward that cannot take [batch, in_features] is no plain linear
            return False
        if not isinstance(y, torch.Tensor) or tuple(y.shape) != (2, module.out_features):
            return False
        if w.device.type == "meta":
            return True
        expected = F.linear(x, w, module.bias).float()
    return bool(torch.allclose(y.float(), expected, rtol=1e-2, atol=1e-2 * float(expected.abs().max().clamp_min(1))))


def _checked_exclude(exclude: Exclude, who: str) -> Exclude:
    """`exclude` as the selection reads it, an iterable of patterns made a tuple (a generator would
    be used up by the first layer), after checking its type: an int would fail deep inside as
    "not iterable", a list holding one in fnmatch."""
    if exclude is None or isinstance(exclude, str) or callable(exclude):
        return exclude
    patterns = tuple(exclude) if isinstance(exclude, Iterable) else None
    if patterns is None or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{who}: exclude must be a name or glob pattern (str), an iterable of them, a predicate "
                        f"(name, module) -> bool, or None; got {type(exclude).__name__} {exclude!r}")
    return patterns


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
    """(name, module) of every nn.Linear (that computes a linear layer) / Conv1D under every name it has."""
    return [(name, module) for name, module in model.named_modules(remove_duplicate=False)
            if (isinstance(module, nn.Linear) and _computes_linear(module)) or _is_conv1d(module)]


def _not_excluded(linears: List[Tuple[str, nn.Module]], exclude: Exclude) -> List[Tuple[str, nn.Module, bool]]:
    return [(name, module, _is_conv1d(module)) for name, module in linears if not _excluded(name, module, exclude)]


def quantizable_layers(model: nn.Module, exclude: Exclude = DEFAULT_EXCLUDE) -> List[Tuple[str, nn.Module, bool]]:
    """(name, module, transposed) of every nn.Linear / Conv1D that `exclude` does not name, under
    every name it has (a module registered at two places is listed at both). `exclude` takes
    names or glob patterns, matched against the full module name or its last component, or a
    predicate (name, module) -> bool."""
    return _not_excluded(_linear_layers(model), exclude)


def _projection_name(module_name: str, attr: str) -> str:
    return f"{module_name}.{attr}" if module_name else attr


def quantizable_projections(model: nn.Module, exclude: Exclude = DEFAULT_EXCLUDE) -> List[Tuple[str, nn.Module, str]]:
    """(name, experts module, attribute) of every float 3-D projection of a transformers experts
    module (experts.py) that `exclude` does not name: as for layers, a pattern matches the
    projection's full name ("model.layers.0.mlp.experts.down_proj") or its last component, or the
    experts module's ("experts" keeps them all); a predicate gets the projection's name and the
    experts module."""
    return _not_excluded_projections(experts_modules(model), exclude)


def _not_excluded_projections(experts: List[Tuple[str, nn.Module]],
                              exclude: Exclude) -> List[Tuple[str, nn.Module, str]]:
    found = []
    for module_name, module in experts:
        for attr in expert_projections(module):
            name = _projection_name(module_name, attr)
            if isinstance(module._parameters.get(attr), nn.Parameter) and \
                    not _excluded(name, module, exclude) and \
                    not (module_name and not callable(exclude) and _excluded(module_name, module, exclude)):
                found.append((name, module, attr))
    return found


def _embeddings(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(name, module) of every nn.Embedding a QEmbedding computes as, under every name it has: not
    a subclass with its own forward (Gemma's scales its output) nor one with max_norm (which
    rewrites the rows it looks up)."""
    return [(name, module) for name, module in model.named_modules(remove_duplicate=False)
            if isinstance(module, nn.Embedding) and type(module).forward is nn.Embedding.forward and
            module.max_norm is None]


def _warn_unmatched_patterns(names: List[str], exclude: Exclude, who: str) -> None:
    """A pattern that names no layer is most likely a typo, and since `exclude` replaces the
    default, it also stops lm_head from being kept: say so rather than quantize it silently.
    `names`: the layers', experts projections' and experts modules', and the embeddings' when
    they are quantized."""
    if callable(exclude):
        return
    for pattern in _patterns(exclude):
        if pattern not in DEFAULT_EXCLUDE and not any(_matches(name, pattern) for name in names):
            warnings.warn(f"{who}: exclude pattern {pattern!r} matches no nn.Linear or Conv1D "
                          f"layer and no experts projection, so it keeps nothing in full precision (a pattern "
                          f"matches a layer's full name or its last component; exclude replaces the default "
                          f"{list(DEFAULT_EXCLUDE)})", stacklevel=4)


def parameter_holders(model: nn.Module) -> Dict[int, List[Tuple[str, str, nn.Module]]]:
    """By parameter (its id): (module name, attribute, module) of every module holding it, under
    every name the module has, in named_modules' order (tied weights have several)."""
    holders: Dict[int, List[Tuple[str, str, nn.Module]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, param in module._parameters.items():
            if param is not None:
                holders.setdefault(id(param), []).append((module_name, attr, module))
    return holders


def _warn_tied_weights(model: nn.Module, layers: List[Tuple[str, nn.Module, bool]],
                       tables: List[Tuple[str, nn.Module]], who: str) -> None:
    """A layer or embedding whose weight a module that stays in float also holds (lm_head tied to
    the token embedding, one of them quantized): quantizing it unties them, the other keeps the
    float weight, and the model grows by the quantized copy. A head tied to an embedding that is
    quantized too shares its table (QEmbedding.tied_head): no warning."""
    holders = parameter_holders(model)
    quantized = {id(module) for _, module, transposed in layers if not transposed} | {id(m) for _, m in tables}
    for kind, name, module in [("layer", n, m) for n, m, _ in layers] + [("embedding", n, m) for n, m in tables]:
        others = [other for other, _, holder in holders.get(id(module.weight), [])
                  if holder is not module and id(holder) not in quantized]
        if others:
            warnings.warn(f"{who}: {kind} {name!r} shares its weight with {others[0]!r} (tied "
                          f"weights), which stays in float; quantizing it breaks the tie and adds the quantized "
                          f"copy to the model's bytes (exclude {name!r} to keep the tie, or quantize both)",
                          stacklevel=4)


class Selection(NamedTuple):
    """What quantize_model (and quantize_pretrained) replace."""
    layers: List[Tuple[str, nn.Module, bool]]  # (name, nn.Linear or Conv1D, transposed)
    projections: List[Tuple[str, nn.Module, str]]  # (name, experts module, attribute)
    tables: List[Tuple[str, nn.Module]]  # (name, nn.Embedding), when embeddings are quantized


def layers_to_quantize(model: nn.Module, bits: int, group_size: Optional[int], method: str, exclude: Exclude,
                       who: str, embeddings: bool = False) -> Selection:
    """quantizable_layers, quantizable_projections and (with `embeddings`) the embeddings outside
    `exclude`, after checking the format and method, with the warnings `who` (quantize_model,
    quantize_pretrained) gives: an exclude pattern that matches nothing, nothing to quantize, a
    layer or embedding whose weight is tied to a module's that stays in float."""
    check_format(bits, group_size, who)
    check_method(method, who)
    exclude = _checked_exclude(exclude, who)
    linears = _linear_layers(model)
    experts = experts_modules(model)
    tables = _embeddings(model) if embeddings else []
    _warn_unmatched_patterns([name for name, _ in linears + experts + tables] +
                             [_projection_name(name, attr) for name, m in experts for attr in expert_projections(m)],
                             exclude, who)
    selection = Selection(_not_excluded(linears, exclude), _not_excluded_projections(experts, exclude),
                          [(name, module) for name, module in tables if not _excluded(name, module, exclude)])
    if not any(selection):
        warnings.warn(f"{who}: nothing to quantize (no nn.Linear, Conv1D{', nn.Embedding' if embeddings else ''} or "
                      "experts projection outside exclude)", stacklevel=3)
    _warn_tied_weights(model, selection.layers, selection.tables, who)
    return selection


def replace_layers(model: nn.Module, layers: List[Tuple[str, nn.Module, bool]],
                   make_layer: Callable[[str, nn.Module, bool], nn.Module], who: str, scheme: str,
                   progress: Optional[bool] = None) -> Tuple[nn.Module, Dict[int, nn.Module]]:
    """Puts make_layer(name, module, transposed) in place of each of `layers` (in place; the
    new layer itself comes back when the model is the layer) and returns the model and the
    new layers (QLinear, QEmbedding) by id of the module they replace. A module registered at two places becomes one
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


def quantize_projections(projections: List[Tuple[str, nn.Module, str]], bits: int, group_size: Optional[int],
                         symmetric: bool, method: str, who: str) -> None:
    """Replaces each experts projection with its QExpertsWeight (experts.py), in place."""
    for name, module, attr in projections:
        try:
            quantize_projection(module, attr, bits, group_size, symmetric, method)
        except ValueError as e:  # e.g. NaN weights: say which projection
            raise ValueError(f"{who}: experts projection {name!r}: {e}") from e


def quantize_tables(model: nn.Module, tables: List[Tuple[str, nn.Module]], bits: int, group_size: Optional[int],
                    symmetric: bool, method: str, who: str, scheme: str) -> Tuple[nn.Module, Dict[int, QEmbedding]]:
    """Replaces each embedding with its QEmbedding, in place; returns the model (the QEmbedding
    when the model is the embedding) and the QEmbeddings by id of the float weight they quantized,
    for the heads tied to them to share (QEmbedding.tied_head). Embeddings holding one weight
    (T5's shared table, its encoder's and its decoder's) become one QEmbedding at all their places."""
    by_weight: Dict[int, QEmbedding] = {}

    def make(name: str, module: nn.Module, _) -> QEmbedding:
        if id(module.weight) not in by_weight:
            by_weight[id(module.weight)] = QEmbedding.from_embedding(module, bits, group_size, symmetric, method)
        return by_weight[id(module.weight)]

    model, _ = replace_layers(model, [(name, module, False) for name, module in tables], make, who, scheme,
                              progress=False)
    return model, by_weight


def report_replaced(count: int, scheme: str, verbose: bool, projections: int = 0, tables: int = 0,
                    table_scheme: Optional[str] = None) -> None:
    """The summary line, to the "linquant" logger and, when verbose, to stdout."""
    summary = f"linquant: replaced {count} layers with {scheme} QLinear"
    if projections:
        summary += f", {projections} experts projections with QExpertsWeight"
    if tables:
        summary += f", {tables} embeddings with {'' if table_scheme in (None, scheme) else table_scheme + ' '}QEmbedding"
    log.info(summary)
    if verbose:
        print(summary)


def quantize_model(model: nn.Module, bits: int = 8, group_size: Optional[int] = None, symmetric: bool = True,
                   exclude: Exclude = DEFAULT_EXCLUDE, progress: Optional[bool] = None,
                   verbose: bool = False, method: str = "minmax", embeddings: Union[bool, int] = False) -> nn.Module:
    """Replaces, in place, every nn.Linear and transformers Conv1D (but those `exclude` names) with
    a QLinear of `bits` bits (per output channel when group_size is None; scales chosen by
    `method`, quantize_weight's "minmax" or "mse"), and each 3-D projection of a transformers experts
    module (a mixture of experts' gate_up_proj / up_proj and down_proj) with a QExpertsWeight of the
    same format, and returns the model (the QLinear itself when the model is a bare Linear). bits
    and group_size are checked before any layer changes. `progress` shows a bar (default: when there
    are more than 16 layers); the summary is logged to the "linquant" logger and printed when
    verbose. With `embeddings`, every nn.Embedding outside `exclude` becomes a QEmbedding of the
    same format too (`embeddings` = 8, 4 or 2: of that many bits per channel, symmetric, whatever
    the layers' format), and a layer tied to one (a language model's lm_head, when not excluded) a
    QLinear sharing its quantized table, in the table's format. Warns of an exclude pattern that matches nothing and of a
    layer or embedding whose weight is tied to a module's that stays in float."""
    who = "linquant.quantize_model"
    tables_in = table_format(embeddings, Format(bits, group_size, symmetric), who)
    layers, projections, tables = layers_to_quantize(model, bits, group_size, method, exclude, who,
                                                     tables_in is not None)
    scheme = scheme_name(bits, group_size, symmetric, method)
    table_scheme = None if tables_in is None else scheme_name(*tables_in, method)
    model, by_weight = quantize_tables(model, tables, *tables_in, method, who, table_scheme) if tables_in else (model, {})

    def make_layer(name: str, module: nn.Module, transposed: bool) -> QLinear:
        table = None if transposed else by_weight.get(id(module.weight))
        if table is not None:  # tied to a quantized embedding: its table, not a second copy
            return table.tied_head(getattr(module, "bias", None))
        return QLinear.from_linear(module, bits, group_size, symmetric, transposed=transposed, method=method)

    quantized = {}
    if layers:
        model, quantized = replace_layers(model, layers, make_layer, who, scheme, progress)
    quantize_projections(projections, bits, group_size, symmetric, method, who)
    if quantized or projections or tables:
        report_replaced(len(quantized), scheme, verbose, len(projections), len(by_weight), table_scheme)
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
