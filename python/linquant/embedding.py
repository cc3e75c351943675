"""QEmbedding: a drop-in replacement for nn.Embedding holding its table [num_embeddings,
embedding_dim] in the quantized-weight format (rows = tokens, groups along the embedding), so
that a head tied to it (lm_head of most small language models) is a QLinear sharing its very
buffers: one quantized copy serves the lookup and the output projection."""

from typing import Optional

import torch
from torch import nn

from .nn import QLinear, QuantizedMatrix, format_repr, init_format
from .weights import QuantizedWeight, dequantize_weight, is_int, quantize_weight


class QEmbedding(QuantizedMatrix):
    """out = W_hat[ids] with W_hat = scales * (q - zeros), row by row. Buffers as QLinear's with
    out_features = num_embeddings and in_features = embedding_dim: `qweight`, `scales` [V, G],
    `zeros` [V, G] int32 or None. Only the rows looked up are dequantized."""

    padding_idx: Optional[int]

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int = 8, group_size: Optional[int] = None,
                 symmetric: bool = True, padding_idx: Optional[int] = None, device=None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        init_format(self, {"num_embeddings": num_embeddings, "embedding_dim": embedding_dim}, num_embeddings,
                    embedding_dim, bits, group_size, symmetric, device, dtype)
        if padding_idx is not None:  # nn.Embedding's rule: a row of the table, counted from the end when negative
            if not is_int(padding_idx):
                raise TypeError(f"linquant.QEmbedding: padding_idx must be an int or None, got "
                                f"{type(padding_idx).__name__}")
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"linquant.QEmbedding: padding_idx must be within num_embeddings = {num_embeddings}, "
                                 f"got {padding_idx}")
            if padding_idx < 0:
                padding_idx += num_embeddings
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, bits: int = 8, group_size: Optional[int] = None,
                       symmetric: bool = True, method: str = "minmax") -> "QEmbedding":
        """Quantizes an nn.Embedding's table, each row (token) per channel or per group of
        `group_size` values; `method` chooses the scales (quantize_weight's)."""
        if embedding.max_norm is not None:  # nn.Embedding renormalizes the rows it looks up, in place
            raise ValueError("linquant.QEmbedding: an embedding with max_norm rewrites its rows at each lookup; "
                             "a quantized table cannot (exclude it)")
        weight = embedding.weight.detach()
        layer = cls(weight.shape[0], weight.shape[1], bits, group_size, symmetric, embedding.padding_idx,
                    device="meta", dtype=weight.dtype)
        layer.set_weight(weight, method)
        return layer

    def set_weight(self, weight: torch.Tensor, method: str = "minmax") -> None:
        """Quantizes a float table [num_embeddings, embedding_dim] into this layer's buffers (new
        ones, on the table's device), scales in the layer's dtype."""
        if tuple(weight.shape) != (self.num_embeddings, self.embedding_dim):
            raise ValueError(f"linquant.QEmbedding.set_weight: weight must be [num_embeddings, embedding_dim] = "
                             f"[{self.num_embeddings}, {self.embedding_dim}], got {list(weight.shape)}")
        qw = quantize_weight(weight.detach(), self.bits, self.group_size, self.symmetric, dtype=self.scales.dtype,
                             method=method)
        self.qweight, self.scales = qw.qweight.contiguous(), qw.scales.contiguous()
        if qw.zeros is not None:
            self.zeros = qw.zeros.contiguous()

    def tied_head(self, bias: Optional[torch.Tensor] = None) -> QLinear:
        """A QLinear computing x @ W_hat.T over this very table (a language model's lm_head tied to
        its token embedding): its qweight, scales and zeros are this layer's tensors, not copies."""
        head = QLinear(self.embedding_dim, self.num_embeddings, bias is not None, self.bits, self.group_size,
                       self.symmetric, device="meta", dtype=self.scales.dtype)
        head.qweight, head.scales, head.zeros = self.qweight, self.scales, self.zeros
        if bias is not None:
            head.set_bias(bias)
        return head

    def _cols(self) -> int:
        return self.embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"linquant.QEmbedding: ids must be int64 or int32 indices, got {ids.dtype}")
        flat = ids.reshape(-1)
        # Checked on the CPU, outside traces and compiled graphs (which cannot hold a data-dependent
        # branch); CUDA's index_select asserts on the device.
        if not torch.jit.is_tracing() and not torch.compiler.is_compiling() and flat.device.type == "cpu" and \
                flat.numel() and not bool((flat.min() >= 0) & (flat.max() < self.num_embeddings)):
            raise IndexError(f"linquant.QEmbedding: ids must be in [0, {self.num_embeddings}), got values from "
                             f"{int(flat.min())} to {int(flat.max())}")
        rows = QuantizedWeight(self.qweight.index_select(0, flat), self.scales.index_select(0, flat),
                               None if self.zeros is None else self.zeros.index_select(0, flat), self.bits,
                               self.group_size, self.embedding_dim)
        return dequantize_weight(rows).reshape(list(ids.shape) + [self.embedding_dim])

    def extra_repr(self) -> str:
        pad = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        return f"{self.num_embeddings}, {self.embedding_dim}{pad}, " + format_repr(self)
