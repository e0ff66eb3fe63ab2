"""The Python files a ``--pangu`` tiny checkpoint ships next to its weights (its ``auto_map`` code).

Stand-ins for the files of the released openPangu-Embedded export, written by
:mod:`testbed.workloads.pangu_layout`; none of the released code is copied. They keep what matters
to a loader:

- ``configuration_openpangu_dense.py``: ``PanguEmbeddedConfig`` with the released keyword set
  (``bias``, ``rope_theta``; no ``head_dim``), imports nothing that transformers 5 lacks.
- ``modeling_openpangu_dense.py``: the released file's imports in the released order, so it fails
  where that file fails - ``torch_npu`` missing (transformers' ``check_imports``), then, on an NPU,
  ``torch_npu.contrib.transfer_to_npu`` patches the process, then ``LossKwargs`` (gone from
  ``transformers.utils`` since 4.54), then at construction ``ROPE_INIT_FUNCTIONS["default"]`` (gone
  in 5.x). Where it does import (transformers <= 4.53 with torch_npu) it is the released
  architecture: Llama with ``bias = config.bias`` on q/k/v/o and a bias-free MLP.
- ``tokenization_openpangu.py``: ``PanguTokenizer``, a slow SentencePiece tokenizer that loads
  ``tokenizer.model`` the way the released class does (``sp_model_kwargs``, BOS from the model,
  ``add_bos_token`` / ``add_eos_token``, ``vocab_files_names = {"vocab_file": "./tokenizer.model"}``).
"""
from __future__ import annotations

CONFIGURATION = '''"""Stand-in for openPangu-Embedded's configuration_openpangu_dense.py (written by
``python -m testbed.tiny_checkpoint DIR --pangu``): the released keyword set and defaults (1B)."""
from transformers.configuration_utils import PretrainedConfig


class PanguEmbeddedConfig(PretrainedConfig):
    model_type = "PanguEmbedded"
    _auto_class = "AutoConfig"

    def __init__(self, vocab_size=153376, hidden_size=1536, intermediate_size=6144, num_hidden_layers=26,
                 num_attention_heads=12, num_key_value_heads=6, hidden_act="silu", max_position_embeddings=32768,
                 initializer_range=0.02, rms_norm_eps=1e-5, use_cache=True, pad_token_id=0, bos_token_id=1,
                 eos_token_id=45892, tie_word_embeddings=True, rope_theta=4000000.0, bias=True, **kwargs):
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        self.bias = bias
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
'''

MODELING = '''"""Stand-in for openPangu-Embedded's modeling_openpangu_dense.py (written by
``python -m testbed.tiny_checkpoint DIR --pangu``).

The imports are the released file's, in its order, so this fails where the released file fails:
no torch_npu; on an NPU, transfer_to_npu patches the process first; transformers >= 4.54 has no
LossKwargs; transformers 5 has no ROPE_INIT_FUNCTIONS["default"] (looked up at construction, as the
released rotary embedding does). Where it imports, it is the released architecture: Llama with
bias=config.bias on q/k/v/o, a bias-free SwiGLU MLP, RMSNorm, rotate-half RoPE.
"""
import torch
import torch_npu  # noqa: F401
from torch_npu.contrib import transfer_to_npu  # noqa: F401

NPU_ATTN_INFR = "910" in torch.npu.get_device_name()  # the released file's fused-attention switch (eval only)

from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaForCausalLM, LlamaModel  # noqa: E402
from transformers.utils import LossKwargs  # noqa: E402,F401

from .configuration_openpangu_dense import PanguEmbeddedConfig  # noqa: E402


def _as_llama(config):
    scaling = getattr(config, "rope_scaling", None)
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    ROPE_INIT_FUNCTIONS[rope_type]  # KeyError on transformers 5, as in the released rotary embedding
    config.attention_bias, config.mlp_bias = bool(config.bias), False
    return config


class PanguEmbeddedModel(LlamaModel):
    config_class = PanguEmbeddedConfig

    def __init__(self, config):
        super().__init__(_as_llama(config))


class PanguEmbeddedForCausalLM(LlamaForCausalLM):
    config_class = PanguEmbeddedConfig

    def __init__(self, config):
        super().__init__(_as_llama(config))
'''

TOKENIZATION = '''"""Stand-in for openPangu-Embedded's tokenization_openpangu.py (written by
``python -m testbed.tiny_checkpoint DIR --pangu``): a slow SentencePiece tokenizer loaded through
``auto_map``, with the released class's name, vocabulary file name and special-token behaviour."""
import os
from shutil import copyfile

import sentencepiece as spm
from transformers.tokenization_utils import PreTrainedTokenizer

VOCAB_FILES_NAMES = {"vocab_file": "./tokenizer.model"}


def _as_bool(value):
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


class PanguTokenizer(PreTrainedTokenizer):
    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]
    _auto_class = "AutoTokenizer"

    def __init__(self, vocab_file, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>",
                 sp_model_kwargs=None, add_bos_token=True, add_eos_token=False, decode_with_prefix_space=False,
                 clean_up_tokenization_spaces=False, **kwargs):
        self.sp_model_kwargs = sp_model_kwargs or {}
        self.sp_model = spm.SentencePieceProcessor(**self.sp_model_kwargs)
        self.sp_model.Load(vocab_file)  # before super().__init__: it asks for the vocabulary
        super().__init__(bos_token=bos_token, eos_token=eos_token, unk_token=unk_token, pad_token=pad_token,
                         clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)
        self.vocab_file = vocab_file
        self.add_bos_token = _as_bool(add_bos_token)
        self.add_eos_token = _as_bool(add_eos_token)
        self.decode_with_prefix_space = decode_with_prefix_space

    @property
    def vocab_size(self):
        return self.sp_model.get_piece_size()

    @property
    def bos_token_id(self):
        return self.sp_model.bos_id()

    @property
    def eos_token_id(self):
        return super().eos_token_id

    def get_vocab(self):
        vocab = {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text):
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token):
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index):
        return self.sp_model.id_to_piece(index)

    def convert_tokens_to_string(self, tokens):
        out, pending = "", []
        for token in tokens:
            if token in self.all_special_tokens:
                out += self.sp_model.decode(pending) + token
                pending = []
            else:
                pending.append(token)
        return out + self.sp_model.decode(pending)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        ids = ([self.bos_token_id] if self.add_bos_token else []) + list(token_ids_0)
        if token_ids_1 is not None:
            ids += list(token_ids_1)
        return ids + ([self.eos_token_id] if self.add_eos_token else [])

    def save_vocabulary(self, save_directory, filename_prefix=None):
        out = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model")
        if os.path.abspath(self.vocab_file) != os.path.abspath(out) and os.path.isfile(self.vocab_file):
            copyfile(self.vocab_file, out)
        elif not os.path.isfile(self.vocab_file):
            with open(out, "wb") as f:
                f.write(self.sp_model.serialized_model_proto())
        return (out,)
'''
