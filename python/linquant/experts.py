"""Quantized mixture-of-experts weights. transformers' experts modules (the classes decorated with
`use_experts_implementation`: Mixtral, Qwen2/3-MoE, OLMoE, gpt-oss, DeepSeek-V3 and most others)
hold each projection of all their experts as one 3-D parameter, [num_experts, out, in] (or
[num_experts, in, out] when `is_transposed`), not as nn.Linear layers, so without this the bulk of an
MoE model would stay in float. QExpertsWeight holds one such projection, each expert's slice in
the quantized-weight format of a QLinear, and the module runs through `experts_forward`, which
transformers dispatches to as the experts implementation "linquant"."""

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .nn import check_conversion, format_repr, init_format
from .weights import QuantizedWeight, dequantize_weight, is_int, quantize_weight

IMPLEMENTATION = "linquant"


class QExpertsWeight(nn.Module):
    """One projection of num_experts experts, quantized: `qweight` [E, out, packed in], `scales`
    [E, out, G] (the compute dtype), `zeros` [E, out, G] int32 or None (symmetric). Expert e's
    slices are exactly a QLinear's buffers for its [out_features, in_features] weight."""

    zeros: Optional[torch.Tensor]
    group_size: Optional[int]

    def __init__(self, num_experts: int, in_features: int, out_features: int, bits: int = 8,
                 group_size: Optional[int] = None, symmetric: bool = True, device=None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        init_format(self, {"num_experts": num_experts, "in_features": in_features, "out_features": out_features},
                    out_features, in_features, bits, group_size, symmetric, device, dtype, stacked=(num_experts,))
        self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features

    @classmethod
    def from_weight(cls, weight: torch.Tensor, transposed: bool, bits: int, group_size: Optional[int],
                    symmetric: bool, method: str = "minmax") -> "QExpertsWeight":
        """Quantizes a float [E, out, in] weight ([E, in, out] when `transposed`), scales in its dtype."""
        if weight.dim() != 3:
            raise ValueError(f"linquant.QExpertsWeight.from_weight: weight must be 3-D, [num_experts, "
                             f"{'in_features, out_features' if transposed else 'out_features, in_features'}], got "
                             f"shape {list(weight.shape)}")
        num_experts, out_features, in_features = weight.shape[0], *weight.shape[1:][::-1 if transposed else 1]
        layer = cls(num_experts, in_features, out_features, bits, group_size, symmetric, device="meta",
                    dtype=weight.dtype)
        layer.set_weight(weight.transpose(1, 2) if transposed else weight, method)
        return layer

    def set_weight(self, weight: torch.Tensor, method: str = "minmax") -> None:
        """Quantizes a float [num_experts, out_features, in_features] weight into this projection's
        buffers (new ones, on the weight's device), one expert at a time: each expert's rows and
        groups are quantized as QLinear.set_weight quantizes a layer's, and peak memory stays one
        expert's temporaries above the result."""
        expected = (self.num_experts, self.out_features, self.in_features)
        if tuple(weight.shape) != expected:
            raise ValueError(f"linquant.QExpertsWeight.set_weight: weight must be [num_experts, out_features, "
                             f"in_features] = {list(expected)}, got {list(weight.shape)}")
        self.allocate(weight.device)
        for e in range(self.num_experts):
            self.set_rows(e, 0, weight[e], method)

    def allocate(self, device) -> None:
        """New (unfilled) buffers on `device`, for set_rows to fill."""
        self.qweight = torch.empty(self.qweight.shape, dtype=self.qweight.dtype, device=device)
        self.scales = torch.empty(self.scales.shape, dtype=self.scales.dtype, device=device)
        if self.zeros is not None:
            self.zeros = torch.empty(self.zeros.shape, dtype=torch.int32, device=device)

    def set_rows(self, expert: int, start: int, weight: torch.Tensor, method: str = "minmax") -> None:
        """Quantizes `weight` [rows, in_features] into output rows start..start+rows of `expert`:
        each row is quantized alone, so a projection filled a piece at a time (a checkpoint's
        per-expert tensors) holds what quantizing it whole gives."""
        self._check_expert(expert, "set_rows")
        if not is_int(start):
            raise TypeError(f"linquant.QExpertsWeight.set_rows: start must be an int, got {type(start).__name__}")
        if start < 0:
            raise ValueError(f"linquant.QExpertsWeight.set_rows: start must be >= 0, got {start}")
        if weight.dim() != 2 or weight.shape[1] != self.in_features or start + weight.shape[0] > self.out_features:
            raise ValueError(f"linquant.QExpertsWeight.set_rows: weight must be [rows, in_features = "
                             f"{self.in_features}] with rows within the {self.out_features} output rows from {start}, "
                             f"got {list(weight.shape)}")
        rows = weight.shape[0]
        try:
            qw = quantize_weight(weight.detach(), self.bits, self.group_size, self.symmetric, dtype=self.scales.dtype,
                                 method=method)
        except ValueError as err:  # NaN or infinite weights: say which expert
            raise ValueError(f"expert {expert}: {err}") from err
        self.qweight[expert, start:start + rows] = qw.qweight
        self.scales[expert, start:start + rows] = qw.scales
        if self.zeros is not None:
            self.zeros[expert, start:start + rows] = qw.zeros

    def _check_expert(self, expert: int, caller: str) -> None:
        # Indexing the buffers would take a negative expert from the end, silently.
        if not is_int(expert):
            raise TypeError(f"linquant.QExpertsWeight.{caller}: expert must be an int, got {type(expert).__name__}")
        if not 0 <= expert < self.num_experts:
            raise IndexError(f"linquant.QExpertsWeight.{caller}: expert must be in [0, {self.num_experts}), "
                             f"got {expert}")

    def quantized_weight(self, expert: int) -> QuantizedWeight:
        self._check_expert(expert, "quantized_weight")
        return QuantizedWeight(self.qweight[expert], self.scales[expert],
                               None if self.zeros is None else self.zeros[expert], self.bits, self.group_size,
                               self.in_features)

    def dequantize(self) -> torch.Tensor:
        """The float weight [num_experts, out_features, in_features] the experts compute with."""
        return torch.stack([dequantize_weight(self.quantized_weight(e)) for e in range(self.num_experts)]) \
            if self.num_experts else self.scales.new_empty(0, self.out_features, self.in_features)

    def linear(self, x: torch.Tensor, expert: int, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x @ W_hat[expert].T (+ bias) through torch.ops.linquant.linear."""
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"linquant.QExpertsWeight: x must have in_features={self.in_features} in its last dim, "
                             f"got shape {list(x.shape)}")
        self._check_expert(expert, "linear")
        return torch.ops.linquant.linear(x, self.qweight[expert], self.scales[expert],
                                         None if self.zeros is None else self.zeros[expert], bias, self.bits,
                                         self.group_size)

    def grouped_linear(self, x: torch.Tensor, counts: List[int], bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Every expert at once: x [T, in_features] holds counts[e] rows of expert e in turn, each
        multiplied by W_hat[e].T (+ bias[e], bias [num_experts, out_features]), through
        torch.ops.linquant.grouped_linear."""
        if x.dim() != 2 or x.shape[-1] != self.in_features:
            raise ValueError(f"linquant.QExpertsWeight: x must be [rows, in_features={self.in_features}], got shape "
                             f"{list(x.shape)}")
        return torch.ops.linquant.grouped_linear(x, counts, self.qweight, self.scales, self.zeros, bias, self.bits,
                                                 self.group_size)

    def _apply(self, fn, recurse=True):
        check_conversion(self, fn)
        return super()._apply(fn, recurse)

    def __getitem__(self, index):
        # transformers' own experts implementations index the float weight; said plainly rather than
        # as "object is not subscriptable" from inside them.
        raise TypeError("linquant.QExpertsWeight: these experts' weights are quantized and run only through the "
                        f"experts implementation {IMPLEMENTATION!r}, which quantize_model and load_quantized set; "
                        "set_experts_implementation chose another since")

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, in_features={self.in_features}, out_features={self.out_features}, "
                + format_repr(self))


def expert_projections(module: nn.Module) -> List[str]:
    """The attributes of a transformers experts module's projections (gate_up_proj or up_proj,
    then down_proj), float or quantized; [] for any other module. Experts modules are recognised by
    what `use_experts_implementation` gives them: has_gate, has_bias, is_transposed, a config, and
    a forward that dispatches on the config's experts implementation."""
    if not all(hasattr(module, a) for a in ("has_gate", "has_bias", "is_transposed", "config")) or \
            not hasattr(type(module).forward, "__wrapped__"):
        return []
    attrs = ["gate_up_proj" if module.has_gate else "up_proj", "down_proj"]
    return [a for a in attrs if isinstance(getattr(module, a, None), QExpertsWeight) or
            (isinstance(module._parameters.get(a), nn.Parameter) and module._parameters[a].dim() == 3)]


def experts_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(name, module) of every experts module, once each."""
    return [(name, module) for name, module in model.named_modules() if expert_projections(module)]


def quantize_projection(module: nn.Module, attr: str, bits: int, group_size: Optional[int], symmetric: bool,
                        method: str = "minmax", weight: Optional[torch.Tensor] = None) -> QExpertsWeight:
    """Replaces experts projection `attr` (a 3-D parameter) of `module` with its QExpertsWeight,
    quantized from `weight` (default: the parameter itself, which may then be on meta), and routes
    the module through experts_forward."""
    weight = module._parameters[attr] if weight is None else weight
    layer = QExpertsWeight.from_weight(weight.detach(), module.is_transposed, bits, group_size, symmetric, method)
    install_projection(module, attr, layer)
    return layer


def install_projection(module: nn.Module, attr: str, layer: QExpertsWeight) -> None:
    """Puts `layer` in place of experts projection `attr` and routes the module through experts_forward."""
    del module._parameters[attr]
    module.add_module(attr, layer)
    use_linquant_implementation(module)


def use_linquant_implementation(module: nn.Module) -> None:
    """Makes transformers dispatch `module` (and the experts modules sharing its config) to
    experts_forward. Those left in float run their eager forward there."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(IMPLEMENTATION, experts_forward)
    if module.config._experts_implementation != IMPLEMENTATION:
        module.config._experts_implementation = IMPLEMENTATION


def _project(module: nn.Module, attr: str, x: torch.Tensor, counts: List[int]) -> torch.Tensor:
    """Projection `attr` of every expert's rows (x holds counts[e] rows of expert e in turn)."""
    bias = getattr(module, f"{attr}_bias", None) if module.has_bias else None
    weight = getattr(module, attr)
    if isinstance(weight, QExpertsWeight):
        return weight.grouped_linear(x, counts, bias)
    parts, start = [], 0  # a projection left in float (excluded)
    for expert, count in enumerate(counts):
        if count:
            w = weight[expert]
            parts.append(F.linear(x[start:start + count], w.t() if module.is_transposed else w,
                                  None if bias is None else bias[expert]))
        start += count
    return torch.cat(parts) if parts else x.new_empty(0, weight.shape[-1 if module.is_transposed else -2])


def experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts implementation "linquant", with the signature transformers gives them: the
    (token, choice) pairs sorted by expert, each projection of every expert in one
    torch.ops.linquant.grouped_linear call, the module's own gate (or activation) and post-expert
    norm in between (row by row, so all rows at once), weighted by top_k_weights and summed in
    float32. An expert index of num_experts or more (expert parallelism's sentinel) contributes
    nothing. A module with no quantized projection runs its eager forward."""
    attrs = expert_projections(self)
    if not any(isinstance(getattr(self, a), QExpertsWeight) for a in attrs):
        return type(self).forward.__wrapped__(self, hidden_states, top_k_index, top_k_weights)
    first, down = attrs
    top_k = top_k_index.shape[-1]
    experts = top_k_index.reshape(-1)
    order = torch.argsort(experts, stable=True)  # sentinels (>= num_experts) sort last
    counts = torch.bincount(experts, minlength=self.num_experts).tolist()[:self.num_experts]  # one host sync
    pairs = order[:sum(counts)]
    tokens = pairs // top_k  # the token of each (token, choice) pair, grouped by expert
    h = _project(self, first, hidden_states[tokens], counts)
    h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
    h = _project(self, down, h, counts)
    if getattr(self, "has_post_expert_norm", False):
        h = self.post_expert_norm(h)
    out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
    out.index_add_(0, tokens, h.float() * top_k_weights.reshape(-1)[pairs].float()[:, None])
    return out.to(hidden_states.dtype)
