"""Models and tokenizers: local Hugging Face checkpoints or small built-in configs (random init).

Model specs: a local directory (``AutoModelForCausalLM.from_pretrained(path, local_files_only=True)``)
or ``builtin:gpt2:LAYERS:DIM`` / ``builtin:llama:LAYERS:DIM``: a GPT-2 or Llama-style config of that
depth and width, dropout 0, randomly initialised, whose vocabulary is the tokenizer's.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from torch import nn

from mta_kernels.distill.config import DistillError

EOS, PAD, UNK = "<|endoftext|>", "<|pad|>", "<|unk|>"
# Bounds of the built-in configs (random init, for tests and demos): beyond them the model would not fit.
MAX_BUILTIN_LAYERS, MAX_BUILTIN_DIM, MAX_BUILTIN_PARAMS = 128, 8192, 2e9


def quiet_loading() -> None:
    """No weight-loading progress bars from transformers: they would interleave with ours."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def is_builtin(spec: str) -> bool:
    return spec.startswith("builtin:")


def parse_builtin(spec: str, what: str = "model spec") -> tuple[str, int, int]:
    """``builtin:FAMILY:LAYERS:DIM`` -> ``(family, layers, dim)``; a :class:`DistillError` naming ``what``."""
    parts = spec.split(":")
    if len(parts) != 4 or parts[1] not in ("gpt2", "llama"):
        raise DistillError(f"{what} {spec!r} is not builtin:gpt2:LAYERS:DIM or builtin:llama:LAYERS:DIM")
    try:
        layers, dim = int(parts[2]), int(parts[3])
    except ValueError:
        raise DistillError(f"{what} {spec!r}: LAYERS and DIM must be integers") from None
    if not (1 <= layers <= MAX_BUILTIN_LAYERS and 8 <= dim <= MAX_BUILTIN_DIM and dim % 4 == 0):
        raise DistillError(
            f"{what} {spec!r}: LAYERS must lie in [1, {MAX_BUILTIN_LAYERS}] and DIM in "
            f"[8, {MAX_BUILTIN_DIM}], a multiple of 4"
        )
    if 12 * layers * dim * dim > MAX_BUILTIN_PARAMS:
        raise DistillError(
            f"{what} {spec!r}: {layers} blocks of width {dim} hold about {12 * layers * dim * dim:.2g} "
            f"parameters, more than a built-in model may have ({MAX_BUILTIN_PARAMS:.0e}: they are random "
            "models for tests and demos); load a real model from its directory instead"
        )
    return parts[1], layers, dim


def build_model(spec: str, tokenizer, max_length: int) -> nn.Module:
    """A causal LM from a spec (see module docstring); random init uses the current torch seed."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    if not is_builtin(spec):
        if not os.path.isdir(spec):
            raise DistillError(
                f"model {spec!r} is neither a local directory nor builtin:gpt2|llama:LAYERS:DIM"
            )
        try:
            return AutoModelForCausalLM.from_pretrained(spec, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - any loader failure is a user-input problem here
            raise DistillError(f"could not load the model in {spec!r}: {exc}") from None
    family, layers, dim = parse_builtin(spec)
    vocab = len(tokenizer)
    heads = max(1, dim // 32)
    positions = max(512, max_length)
    if family == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab,
            n_positions=positions,
            n_embd=dim,
            n_layer=layers,
            n_head=heads,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    else:
        cfg = LlamaConfig(
            vocab_size=vocab,
            hidden_size=dim,
            intermediate_size=dim * 8 // 3 // 4 * 4,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=positions,
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,
        )
    return AutoModelForCausalLM.from_config(cfg)


LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")  # config names of the depth, by family
WIDTH_KEYS = ("hidden_size", "n_embd", "d_model")  # and of the hidden size


def text_config(model: nn.Module) -> Any:
    """The model's (text) config: the language model's part of a multimodal config."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise TypeError(f"{type(model).__name__} has no .config: pass a Hugging Face PreTrainedModel")
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def config_value(model: nn.Module, names: tuple[str, ...]) -> int | None:
    """The first of ``names`` set in the model's text config (``None`` when none is)."""
    cfg = text_config(model)
    for name in names:
        if getattr(cfg, name, None) is not None:
            return int(getattr(cfg, name))
    return None


def num_layers(model: nn.Module) -> int:
    """Transformer blocks: Hugging Face ``hidden_states`` has ``num_layers + 1`` entries (0 = embeddings)."""
    layers = config_value(model, LAYER_KEYS)
    if layers is None:
        raise DistillError(f"cannot tell how many layers the model {type(model).__name__} has")
    return layers


def hidden_size(model: nn.Module) -> int:
    width = config_value(model, WIDTH_KEYS)
    if width is None:
        raise DistillError(f"cannot tell the hidden size of the model {type(model).__name__}")
    return width


def load_tokenizer(path: str | None, model_spec: str):
    """A fast tokenizer from ``path`` (directory or tokenizer.json), else from the model directory.

    Right padding (the loop takes the loss on shifted labels); a pad token is added as EOS when missing.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    src = path or (None if is_builtin(model_spec) else model_spec)
    if path is None and src is not None and not os.path.isdir(src):
        # Without --*-tokenizer the tokenizer is read from the model directory: name what is missing.
        raise DistillError(
            f"model {model_spec!r} is neither a local directory nor builtin:gpt2|llama:LAYERS:DIM"
        )
    if src is None:
        raise DistillError(
            f"the built-in model {model_spec!r} needs a tokenizer: pass --student/--teacher-tokenizer"
        )
    if not os.path.exists(src):
        raise DistillError(f"tokenizer {src!r} does not exist")
    try:
        if os.path.isfile(src):
            tok = PreTrainedTokenizerFast(tokenizer_file=src)
        else:
            tok = AutoTokenizer.from_pretrained(src, local_files_only=True, use_fast=True)
    except Exception as exc:  # noqa: BLE001
        raise DistillError(f"could not load a tokenizer from {src!r}: {exc}") from None
    if not getattr(tok, "is_fast", False):
        raise DistillError(f"tokenizer {src!r} is not a fast tokenizer: offsets are needed to align units")
    if path is not None and not is_builtin(model_spec):
        _check_saved_tokenizer(tok, path, model_spec)
    if tok.eos_token is None:
        tok.add_special_tokens({"eos_token": EOS} if EOS in tok.get_vocab() else {})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def _check_saved_tokenizer(tok: Any, path: str, model_dir: str) -> None:
    """A tokenizer given for a model directory that holds its own must tokenize as that one does (else
    the model would read the ids of another vocabulary)."""
    if not any(
        os.path.isfile(os.path.join(model_dir, f)) for f in ("tokenizer.json", "tokenizer_config.json")
    ):
        return
    try:
        own = load_tokenizer(None, model_dir)  # read as the given one was (pad and EOS set alike)
    except DistillError:  # an unreadable saved tokenizer: nothing to compare with
        return
    if not same_tokenizer(tok, own):
        raise DistillError(
            f"the tokenizer {path!r} ({len(tok)} tokens) is not the one saved with the model {model_dir!r} "
            f"({len(own)} tokens): the model would read the ids of another vocabulary. Leave the tokenizer "
            "option out to use the model's own"
        )


def same_tokenizer(a, b) -> bool:
    """True when two fast tokenizers tokenize identically (same backend JSON: model, normaliser, ...)."""
    if a is b:
        return True
    try:
        return a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    except Exception:  # noqa: BLE001
        return False


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int, out_dir: str):
    """Train a tokenizer on ``texts`` with the ``tokenizers`` library and save it as a HF directory.

    Args:
        kind: ``"bpe"`` (byte-level BPE, GPT-2 style; deterministic) or ``"wordpiece"`` (BERT-style,
            cased; the ``tokenizers`` trainer is not deterministic across processes).
        vocab_size: target vocabulary size (special tokens included).
    Returns:
        the ``PreTrainedTokenizerFast`` (also saved to ``out_dir``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS, PAD],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        specials = {"eos_token": EOS, "pad_token": PAD}
    elif kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, special_tokens=[EOS, PAD, UNK], show_progress=False
        )
        specials = {"eos_token": EOS, "pad_token": PAD, "unk_token": UNK}
    else:
        raise DistillError(f"unknown tokenizer kind {kind!r} (bpe or wordpiece)")
    tok.train_from_iterator(texts, trainer)
    if kind == "wordpiece":
        # The WordPiece trainer breaks ties in hash order: ids (and, at the cut-off, even the token set)
        # change from run to run. Renumbering sorted makes the ids depend on the token set only.
        vocab = tok.get_vocab()
        fixed = [EOS, PAD, UNK]
        ordered = fixed + sorted(t for t in vocab if t not in fixed)
        tok.model = models.WordPiece(vocab={t: i for i, t in enumerate(ordered)}, unk_token=UNK)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **specials)
    fast.padding_side = "right"
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def freeze(model: nn.Module) -> nn.Module:
    """Teacher: eval mode, no gradients."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


__all__ = [
    "build_model",
    "freeze",
    "hidden_size",
    "is_builtin",
    "load_tokenizer",
    "num_layers",
    "same_tokenizer",
    "train_tokenizer",
]
