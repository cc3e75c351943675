"""TorchScript export of a quantized model for C++ programs (programs/linquant_run.cpp): a built-in
encoder quantized here, or a Hugging Face encoder or language model saved by save_quantized; the
traced module (linquant ops inside) with a linquant.json record, example inputs and the outputs
Python computes for them."""

import contextlib
import json
import logging
import os
import shutil
import warnings
from typing import Optional

import torch

from ._files import atomic_write, check_directory_target
from .model import quantize_model

FORMAT_VERSION = 1  # programs/linquant_run.cpp checks the same number

# Imported from a checkout, the package is <checkout>/python/linquant and the checkout's CMake build
# puts the program in <checkout>/build (where tests/python/test_cpp_program.py looks too).
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Warnings that tracing these encoders gives and that say nothing wrong about the export, as
# (category, message regex, module regex). TorchScript is deprecated in favour of torch.export, but
# it is what linquant-run loads without Python. The tracer warnings are Python branches on sizes
# (a mask's padding, causal attention for one query, QLinear's input check) that take the same
# side for every input of the traced signature; tests/python/test_cli.py runs the export at other
# batch sizes and lengths. Other warnings still show.
_KNOWN_WARNINGS = [
    (FutureWarning, r"`torch\.jit\.\w+` is deprecated", ""),
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated", ""),
    (torch.jit.TracerWarning, r"Converting a tensor to a Python boolean",
     r"transformers\.masking_utils|transformers\.integrations\.sdpa_attention|linquant\.nn"),
]


class _TensorOutput(torch.nn.Module):
    """(input_ids, attention_mask) -> one tensor, a signature TorchScript can hold: an encoder's
    last_hidden_state, a language model's logits (without a key-value cache)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits if "logits" in out else out.last_hidden_state


def follow_input_device(traced) -> int:
    """Makes a traced module run on the device of its inputs. Tracing records the device of factory
    calls (the models' mask code calls torch.arange(..., device=x.device)) as a constant, the CPU
    the trace ran on, and a CUDA run would then mix CPU and CUDA tensors. Each such constant
    becomes the device of its method's first tensor input. Returns how many were replaced."""
    replaced = 0
    for name, module in traced.named_modules():
        if not module._c._has_method("forward"):
            continue
        graph = module.graph
        constants = [n for n in graph.findAllNodes("prim::Constant") if n.output().type().kind() == "DeviceObjType"]
        if not constants:
            continue
        inputs = [v for v in graph.inputs() if v.type().kind() == "TensorType"]
        if not inputs:
            raise ValueError(f"linquant export: {name or 'the model'} fixes a device but takes no tensor to take it from")
        for const in constants:
            device = graph.create("prim::device", [inputs[0]], 1)
            device.output().setType(const.output().type())
            device.insertBefore(const)
            const.output().replaceAllUsesWith(device.output())
            const.destroy()
            replaced += 1
    return replaced


def find_linquant_run() -> Optional[str]:
    """Absolute path of the C++ program linquant-run: $LINQUANT_RUN, else on PATH (`cmake
    --install`), else the CMake build of the checkout this package is imported from; None when
    none of them holds it (a pip-installed package does not know its checkout)."""
    checkout_build = None
    if os.path.isfile(os.path.join(_CHECKOUT, "programs", "linquant_run.cpp")):  # not site-packages' parent
        checkout_build = os.path.join(_CHECKOUT, "build", "linquant-run")
    for candidate in (os.environ.get("LINQUANT_RUN"), shutil.which("linquant-run"), checkout_build):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return os.path.abspath(candidate)
    return None


# Log lines of the same kind, as (logger, message part): tracing reads every attribute of a
# language model, among them transformers' loss_function, which logs that the config names no loss
# type (the export computes no loss).
_KNOWN_LOG_LINES = [("transformers.modeling_utils", "was set in the config but it is unrecognized")]


class _DropLines(logging.Filter):
    def __init__(self, part: str):
        super().__init__()
        self.part = part

    def filter(self, record) -> bool:
        return self.part not in record.getMessage()


@contextlib.contextmanager
def _known_warnings_ignored():
    """_KNOWN_WARNINGS and _KNOWN_LOG_LINES not shown inside (the previous filters come back on exit)."""
    filters = [(logging.getLogger(name), _DropLines(part)) for name, part in _KNOWN_LOG_LINES]
    for logger, line_filter in filters:
        logger.addFilter(line_filter)
    try:
        with warnings.catch_warnings():
            for category, message, module in _KNOWN_WARNINGS:
                warnings.filterwarnings("ignore", message, category, module)
            yield
    finally:
        for logger, line_filter in filters:
            logger.removeFilter(line_filter)


def tiny_bert():
    """A small randomly initialised BERT encoder (fixed seed): a model for tests and demos that needs
    no download."""
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    return BertModel(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                vocab_size=512, max_position_embeddings=64)).eval()


def load_encoder(name: str):
    if name == "tiny-bert":
        return tiny_bert()
    if name == "minilm":
        from .builtin import load_minilm
        return load_minilm()[0]
    raise ValueError(f"linquant export: unknown model {name!r} (expected tiny-bert or minilm)")


def export_encoder(name: str, out_dir: str, bits: int = 8, group_size=None, symmetric: bool = True,
                   batch: int = 2, seq_len: int = 16) -> dict:
    """Quantizes a built-in encoder ("tiny-bert", "minilm") and writes out_dir/model.pt
    (TorchScript), inputs.pt ([input_ids, attention_mask]) and expected.pt (Python's output for
    them); returns the paths."""
    check_directory_target(out_dir, "linquant.export_encoder: out_dir")  # before the model is built
    model = quantize_model(load_encoder(name), bits=bits, group_size=group_size, symmetric=symmetric,
                           progress=False)
    meta = {"model": name, "bits": bits, "group_size": group_size, "symmetric": symmetric}
    return _export(model, out_dir, meta, batch, seq_len)


def export_saved(path: str, out_dir: str, batch: int = 2, seq_len: int = 16) -> dict:
    """export_encoder for a Hugging Face model saved by `save_quantized` (or `linquant quantize`),
    an encoder or a decoder-only language model, as it was quantized: out_dir/model.pt computes
    (input_ids, attention_mask) -> last_hidden_state or logits."""
    from .experts import experts_modules
    from .serialization import load_quantized
    check_directory_target(out_dir, "linquant.export_saved: out_dir")
    model = load_quantized(path)
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(f"linquant export: {path} holds an encoder-decoder model ({type(model).__name__}); "
                         "export takes encoders and decoder-only language models")
    experts = experts_modules(model)
    if experts:  # the trace would keep the experts its example tokens chose, for every input
        raise ValueError(f"linquant export: {path} holds a mixture of experts ({len(experts)} experts modules, "
                         f"the first {experts[0][0]!r}), whose routing a trace records for its example inputs only; "
                         "export takes models without experts")
    return _export(model, out_dir, {"model": os.path.abspath(path)}, batch, seq_len)


def _export(model, out_dir: str, meta: dict, batch: int, seq_len: int) -> dict:
    gen = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    mask[-1, seq_len // 2:] = 0
    wrapped = _TensorOutput(model).eval()
    with torch.no_grad(), _known_warnings_ignored():
        traced = torch.jit.trace(wrapped, (ids, mask), check_trace=False)
        follow_input_device(traced)
        expected = wrapped(ids, mask)
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f"{k}.pt") for k in ("model", "inputs", "expected")}
    record = json.dumps({"format_version": FORMAT_VERSION, **meta})
    with _known_warnings_ignored():
        atomic_write(paths["model"], lambda tmp: torch.jit.save(traced, tmp, _extra_files={"linquant.json": record}))
    atomic_write(paths["inputs"], lambda tmp: torch.save([ids, mask], tmp))
    atomic_write(paths["expected"], lambda tmp: torch.save(expected, tmp))
    return paths
