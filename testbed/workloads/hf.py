"""``[model] kind = "hf"``: a Hugging Face causal LM loaded from a local directory.

The loaded model is wrapped so that ``forward(**batch)`` returns the batch's loss like every
testbed model: transformers' own causal-LM loss (labels shifted by one, ``-100`` ignored, mean
over the remaining tokens). Precision: ``fp32``; ``bf16`` (weights, gradients and optimizer state
in bf16); ``bf16-mixed`` (fp32 weights, forward under bf16 autocast - what ``Trainer(bf16=True)``
does and what the reference study's "bf16 mixed precision" means).

openPangu-Embedded checkpoints ship remote code (``auto_map`` → ``modeling_openpangu_dense``)
that imports ``torch_npu`` (and ``transfer_to_npu``) unconditionally, then ``LossKwargs`` from
``transformers.utils``, which transformers removed in 4.54; on 5.x it breaks a second time
(``ROPE_INIT_FUNCTIONS`` has no ``"default"``). The architecture is Llama with one ``bias`` flag on q/k/v/o, and the
parameter names are Llama's, so when the remote code cannot be used the checkpoint is loaded into
the stock ``LlamaForCausalLM`` with ``attention_bias = bias`` (see :func:`pangu_as_llama_config`);
every weight must then load, or loading fails. The released files also carry a per-layer
``self_attn.rotary_emb.inv_freq`` buffer (Llama computes it from ``rope_theta`` instead): those keys
are the only leftovers accepted, and they are compared with the config's ``rope_theta``.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import logging
import re
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from testbed.workloads.data import Dataset
from testbed.scenario.tables import MODELS

log = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16", "bf16-mixed"]
PANGU_MODEL_TYPES = ("PanguEmbedded",)
# Exceptions that mean "the remote code / auto class cannot be used here", not "the files are bad".
_REMOTE_CODE_FAILURES = (ImportError, AttributeError, KeyError, ValueError, TypeError)
# Buffers the released openPangu files carry per layer; Llama recomputes them from rope_theta.
_ROPE_BUFFER = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


class CausalLMLoss(nn.Module):
    """``forward(input_ids, attention_mask, labels)`` → mean loss over the unmasked label tokens."""

    def __init__(self, lm: nn.Module, autocast_dtype: torch.dtype | None = None):
        super().__init__()
        self.lm = lm
        self.autocast_dtype = autocast_dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        autocast: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if self.autocast_dtype is not None:
            autocast = torch.autocast(device_type=input_ids.device.type, dtype=self.autocast_dtype)
        with autocast:
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False)
        return out.loss


def read_config(path: str | Path) -> dict[str, Any]:
    """``config.json`` of a checkpoint directory, with a clear error if it is not there."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"no config.json in {path}: [model] path must be a local checkpoint directory "
                                "(see scenarios/openpangu/README.md for how to put the weights there)")
    return json.loads(file.read_text(encoding="utf-8"))


def is_pangu(config: dict[str, Any]) -> bool:
    archs = config.get("architectures") or []
    return config.get("model_type") in PANGU_MODEL_TYPES or any(a.startswith("PanguEmbedded") for a in archs)


def pangu_as_llama_config(config: dict[str, Any]) -> Any:
    """A ``LlamaConfig`` equivalent to a PanguEmbedded ``config.json`` (``bias`` → ``attention_bias``)."""
    from transformers import LlamaConfig

    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
            "rms_norm_eps", "tie_word_embeddings", "attention_dropout", "pad_token_id", "bos_token_id",
            "eos_token_id")
    kwargs = {k: config[k] for k in keys if k in config}
    theta, scaling = config.get("rope_theta", 10000.0), config.get("rope_scaling")
    if "rope_parameters" in inspect.signature(LlamaConfig.__init__).parameters:  # transformers >= 5
        rope = dict(scaling or {})
        rope.setdefault("rope_type", rope.pop("type", "default"))
        kwargs["rope_parameters"] = {**rope, "rope_theta": theta}
    else:
        kwargs.update(rope_theta=theta, rope_scaling=scaling)
    return LlamaConfig(**kwargs, attention_bias=bool(config.get("bias", False)), mlp_bias=False,
                       architectures=["LlamaForCausalLM"])


def _dtype_kwargs(precision: Precision) -> dict[str, torch.dtype]:
    """``dtype=`` (transformers >= 4.56) or its older name ``torch_dtype=``."""
    import transformers
    from packaging.version import Version

    name = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {name: torch.bfloat16 if precision == "bf16" else torch.float32}


def load_causal_lm(path: str | Path, *, trust_remote_code: bool = False, precision: Precision = "fp32",
                   attn_implementation: str = "sdpa") -> nn.Module:
    """Load a causal LM from a local directory; PanguEmbedded falls back to stock Llama (see module doc)."""
    from transformers import AutoModelForCausalLM

    config = read_config(path)
    kwargs: dict[str, Any] = {**_dtype_kwargs(precision), "local_files_only": True,
                              "attn_implementation": attn_implementation}
    try:
        return AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=trust_remote_code, **kwargs)
    except _REMOTE_CODE_FAILURES as exc:
        if not is_pangu(config):
            raise
        log.warning("openPangu remote code not usable (%s: %s); loading %s as stock LlamaForCausalLM "
                    "with attention_bias=%s", type(exc).__name__, exc, path, bool(config.get("bias", False)))
        return load_pangu_as_llama(path, config, **kwargs)


def load_pangu_as_llama(path: str | Path, config: dict[str, Any], **kwargs: Any) -> nn.Module:
    """The fallback: the same weights in ``LlamaForCausalLM``; every checkpoint tensor must be used."""
    from transformers import LlamaForCausalLM

    model, info = LlamaForCausalLM.from_pretrained(str(path), config=pangu_as_llama_config(config),
                                                   output_loading_info=True, **kwargs)
    missing = sorted(k for k in info.get("missing_keys", [])
                     if not (k == "lm_head.weight" and model.config.tie_word_embeddings))
    unexpected = sorted(k for k in info.get("unexpected_keys", []) if not _ROPE_BUFFER.fullmatch(k))
    if missing or unexpected:
        raise ValueError(f"{path}: the PanguEmbedded → Llama mapping does not fit this checkpoint "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    check_rope_buffers(path, config)
    return model


def rope_inv_freq(config: dict[str, Any]) -> torch.Tensor:
    """``1 / rope_theta ** (2i / head_dim)`` (fp32): the default RoPE frequencies of a config.json."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (float(config.get("rope_theta", 10000.0)) ** exponent)


def check_rope_buffers(path: str | Path, config: dict[str, Any]) -> None:
    """Warn when a stored ``rotary_emb.inv_freq`` disagrees with ``1 / rope_theta ** (2i / head_dim)``:
    the config's ``rope_theta`` would then not be the one the checkpoint was trained with."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            key = next((k for k in f.keys() if _ROPE_BUFFER.fullmatch(k)), None)
            if key is None:
                continue
            stored = f.get_tensor(key).float()
        expected = rope_inv_freq(config)
        if stored.shape != expected.shape or not torch.allclose(stored, expected, rtol=1e-2, atol=0.0):
            log.warning("%s: %s does not match rope_theta = %s in config.json (stored %s, expected %s); the Llama "
                        "fallback uses the config's value", path, key, config.get("rope_theta"),
                        stored[:4].tolist(), expected[:4].tolist())
        return


def count_parameters(path: str | Path) -> int:
    """Exact parameter count of a checkpoint from its config alone (built on the meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = read_config(path)
    cfg = pangu_as_llama_config(config) if is_pangu(config) else AutoConfig.from_pretrained(
        str(path), local_files_only=True, trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


@MODELS.register("hf")
def hf(dataset: Dataset, *, path: str, trust_remote_code: bool = False, dtype: Precision = "fp32",
       gradient_checkpointing: bool = False, attn_implementation: Literal["sdpa", "eager"] = "sdpa",
       params_b_hint: float = 0.0) -> nn.Module:
    """Causal LM from the local checkpoint directory ``path``; ``forward(**batch)`` → masked mean loss.
    Needs a dataset whose batches carry ``input_ids``, ``attention_mask`` and ``labels`` (``alpaca``).

    ``params_b_hint`` (billions of parameters) is read only by ``testbed run --dry-run`` to estimate
    memory when the checkpoint is not on the planning machine; training ignores it.
    """
    from transformers.utils import logging as hf_logging

    keys = set(dataset.batch(torch.tensor([0])))
    if not {"input_ids", "attention_mask", "labels"} <= keys:
        raise ValueError(f"[model] kind = 'hf' needs batches with input_ids, attention_mask and labels "
                         f"(e.g. [data] kind = 'alpaca'); this dataset gives {sorted(keys)}")
    hf_logging.disable_progress_bar()  # one "Loading weights" bar per rank is noise in the run's log
    lm = load_causal_lm(path, trust_remote_code=trust_remote_code, precision=dtype,
                        attn_implementation=attn_implementation)
    vocab = dataset.info.get("vocab_size")
    embeddings = lm.get_input_embeddings().num_embeddings
    if vocab is not None and vocab > embeddings:
        raise ValueError(f"the tokenizer has {vocab} tokens but the model at {path} embeds only {embeddings}: "
                         "point [data] tokenizer at this model's own tokenizer")
    lm.config.use_cache = False
    if gradient_checkpointing:
        # Non-reentrant checkpointing works under DDP without static_graph / find_unused_parameters.
        if hasattr(lm, "activation_checkpointing_enable"):  # the name since transformers 5.x
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.train()
    return CausalLMLoss(lm, torch.bfloat16 if dtype == "bf16-mixed" else None)


def _preflight(source: str, params: dict[str, Any]) -> None:
    """Refuse, before any rank starts, a checkpoint ``path`` that is missing, a file, or holds no
    config.json (each rank failed on it at start-up with a transformers traceback)."""
    from testbed.scenario.errors import ScenarioError

    path = Path(params["path"])
    if not path.is_dir() or not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "is not a directory" if not path.is_dir() else \
            "has no config.json"
        raise ScenarioError(source, "model.path", f"a checkpoint directory with config.json on this machine ({path} "
                            f"{what})", str(path))


hf.preflight = _preflight  # type: ignore[attr-defined]  # run by the launcher before ranks start
hf.batch_keys = ("input_ids", "attention_mask", "labels")  # type: ignore[attr-defined]  # scenario/compat.py
