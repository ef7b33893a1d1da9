"""Read local BERT checkpoints (Hugging Face format, safetensors only) into our `BertEncoder` naming.

`load_local_bert(path)` accepts a folder (or a `.safetensors` file inside one) holding:

* `config.json` of a Hugging Face BERT encoder: `model_type` "bert", `position_embedding_type` "absolute" (or
  absent), not a decoder, `hidden_act` "gelu" (exact) or "gelu_new" / "gelu_pytorch_tanh" (tanh approximation).
  Sizes come from `hidden_size`, `num_hidden_layers`, `num_attention_heads`, `intermediate_size`, `vocab_size`,
  `max_position_embeddings`, `type_vocab_size` (default 2) and `layer_norm_eps` (default 1e-12).
  BERT-architecture models such as MiniLM or sentence-transformers' all-MiniLM-L6-v2 qualify; other model types
  (RoBERTa, DistilBERT, ...) do not.
* the weights: `model.safetensors`, or a sharded `model.safetensors.index.json` with its shards. `BertModel`
  names (`embeddings.word_embeddings.weight`, `encoder.layer.{i}.attention.self.query.weight`, ...), optionally
  under a `bert.` prefix as written by `BertForSequenceClassification`, `BertForMaskedLM`, etc. Legacy LayerNorm
  names `gamma` / `beta` are read as `weight` / `bias`. The pooler, the `embeddings.position_ids` /
  `token_type_ids` buffers and task heads (`classifier.*`, `cls.*`, `qa_outputs.*`) are ignored; any other
  weight (e.g. a layer beyond `num_hidden_layers`, relative-position tables) is an error.
* `tokenizer.json`: the fast tokenizer the model was trained with (its path is returned, it is not read here).

Query, key and value projections are stacked (in that order) into our fused `blocks.{i}.attn.qkv`. Every problem
raises `TaftError` naming the file.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from taft.backbones.bert import BertConfig, BertEncoder
from taft.backbones.keymaps import Tensors, read_folder_weights, read_json_object, read_safetensors_tensors
from taft.errors import TaftError

_HF_ACT = {"gelu": "exact", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}
_PREFIXES = ("", "bert.")
_HEADS = ("classifier.", "cls.", "qa_outputs.")  # task heads of Bert*For* models, outside the `bert.` prefix
_IGNORED = re.compile(r"^(?:pooler\.|embeddings\.position_ids$|embeddings\.token_type_ids$)")
_GLOBAL = {  # HF name (after the prefix) -> ours
    "embeddings.word_embeddings.weight": "embeddings.word.weight",
    "embeddings.position_embeddings.weight": "embeddings.position.weight",
    "embeddings.token_type_embeddings.weight": "embeddings.token_type.weight",
    "embeddings.LayerNorm.weight": "embeddings.norm.weight",
    "embeddings.LayerNorm.bias": "embeddings.norm.bias",
}
_LAYER = {  # per-layer HF module -> ours
    "attention.output.dense": "attn.proj",
    "attention.output.LayerNorm": "norm1",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "output.LayerNorm": "norm2",
}
_QKV = ("attention.self.query", "attention.self.key", "attention.self.value")


def load_local_bert(path: Path) -> tuple[BertConfig, Tensors, Path]:
    """(config, state dict in our names, path of `tokenizer.json`) for a local Hugging Face BERT checkpoint.

    The returned state dict matches `BertEncoder(config).state_dict()` in names and shapes (checked here)."""
    path = Path(path)
    src = str(path)
    if path.is_dir():
        folder, weights = path, None
    elif path.suffix == ".safetensors" and path.is_file():
        folder, weights = path.parent, path
    elif not path.exists():
        raise TaftError(f"{src}: no such folder")
    else:
        raise TaftError(f"{src}: unsupported checkpoint; expected a Hugging Face BERT folder (config.json, "
                        "model.safetensors, tokenizer.json)")
    config = read_json_object(folder / "config.json", src, required=True)
    cfg = _config(config, src)
    tokenizer = folder / "tokenizer.json"
    if not tokenizer.is_file():
        raise TaftError(f"{src}: no tokenizer.json beside the weights; a fast-tokenizer file (tokenizer.json, as "
                        "written by a `tokenizers` / transformers fast tokenizer's save_pretrained) is needed to "
                        "turn text into the model's token ids")
    tensors = (read_safetensors_tensors(weights, src) if weights is not None else read_folder_weights(folder, src))[0]
    return cfg, _convert(tensors, cfg, src), tokenizer


def _config(config: dict, src: str) -> BertConfig:
    model_type = config.get("model_type")
    if model_type != "bert":
        raise TaftError(f"{src}: config.json model_type {model_type!r} is unsupported; only BERT-architecture "
                        "encoders (model_type 'bert', e.g. MiniLM) are supported")
    pos_type = config.get("position_embedding_type", "absolute")
    if pos_type != "absolute":
        raise TaftError(f"{src}: position_embedding_type {pos_type!r} is unsupported (only 'absolute')")
    if config.get("is_decoder") or config.get("add_cross_attention"):
        raise TaftError(f"{src}: BERT decoders (is_decoder / add_cross_attention) are unsupported; only encoders")
    act = config.get("hidden_act", "gelu")
    if not isinstance(act, str) or act not in _HF_ACT:
        raise TaftError(f"{src}: hidden_act {act!r} is unsupported (supported: {', '.join(_HF_ACT)})")
    try:
        dim, depth, heads, mlp_hidden, vocab, positions = (int(config[k]) for k in (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
            "max_position_embeddings"))
        type_vocab = int(config.get("type_vocab_size", 2))
        eps = float(config.get("layer_norm_eps", 1e-12))
    except KeyError as e:
        raise TaftError(f"{src}: config.json lacks {e.args[0]!r}") from e
    except (TypeError, ValueError) as e:
        raise TaftError(f"{src}: unreadable config.json field: {e}") from e
    sizes = {"hidden_size": dim, "num_hidden_layers": depth, "num_attention_heads": heads,
             "intermediate_size": mlp_hidden, "vocab_size": vocab, "max_position_embeddings": positions,
             "type_vocab_size": type_vocab}
    if bad := [f"{k}={v}" for k, v in sizes.items() if v < 1]:
        raise TaftError(f"{src}: config.json sizes must be positive: {', '.join(bad)}")
    if not eps > 0:
        raise TaftError(f"{src}: config.json layer_norm_eps must be positive, got {eps}")
    try:
        return BertConfig(dim=dim, depth=depth, heads=heads, mlp_hidden=mlp_hidden, vocab_size=vocab,
                          max_positions=positions, type_vocab_size=type_vocab, ln_eps=eps, gelu=_HF_ACT[act])
    except TaftError as e:
        raise TaftError(f"{src}: {e}") from e


# ------------------------------------------------------------------------------------------------- converting


def _hf_names(depth: int) -> dict[str, str | tuple[str, int]]:
    """HF name (without prefix) -> our name, or (our fused qkv name, part index 0/1/2) for query/key/value."""
    names: dict[str, str | tuple[str, int]] = dict(_GLOBAL)
    for i in range(depth):
        for param in ("weight", "bias"):
            for module, ours in _LAYER.items():
                names[f"encoder.layer.{i}.{module}.{param}"] = f"blocks.{i}.{ours}.{param}"
            for part, module in enumerate(_QKV):
                names[f"encoder.layer.{i}.{module}.{param}"] = (f"blocks.{i}.attn.qkv.{param}", part)
    return names


def _prefix(tensors: Tensors, src: str) -> str:
    found = [k[: -len("embeddings.word_embeddings.weight")] for k in tensors
             if k.endswith("embeddings.word_embeddings.weight")]
    if len(found) != 1 or found[0] not in _PREFIXES:
        raise TaftError(f"{src}: expected one 'embeddings.word_embeddings.weight' (optionally under 'bert.'), "
                        f"found {[p + 'embeddings.word_embeddings.weight' for p in found][:3]}; is this a "
                        "Hugging Face BERT checkpoint?")
    return found[0]


def _convert(tensors: Tensors, cfg: BertConfig, src: str) -> Tensors:
    prefix = _prefix(tensors, src)
    names = _hf_names(cfg.depth)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in BertEncoder(cfg).state_dict().items()}

    def hf_shape(target: str | tuple[str, int]) -> tuple[int, ...]:
        if isinstance(target, str):
            return expected[target]
        shape = expected[target[0]]
        return (shape[0] // 3, *shape[1:])

    found: dict[str, torch.Tensor] = {}  # HF name (without prefix) -> tensor
    unknown = []
    for key, t in tensors.items():
        if key.startswith(_HEADS) or not key.startswith(prefix):
            if not key.startswith(_HEADS):
                unknown.append(key)
            continue
        name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", key[len(prefix):])
        name = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)
        if name in names:
            found[name] = t
        elif not _IGNORED.match(name):
            unknown.append(key)
    if unknown:
        raise TaftError(f"{src}: unsupported weights {sorted(unknown)[:5]} ({len(unknown)} in all; config.json "
                        f"has {cfg.depth} layers)")
    missing = [prefix + n for n in names if n not in found]
    wrong = [f"{prefix}{n}: {tuple(t.shape)}, expected {hf_shape(names[n])}" for n, t in found.items()
             if tuple(t.shape) != hf_shape(names[n])]
    if missing or wrong:
        raise TaftError(f"{src}: weights do not fit config.json ({cfg}): missing {missing[:5]} ({len(missing)} in "
                        f"all), wrong shapes {wrong[:5]} ({len(wrong)} in all)")
    sd: Tensors = {}
    qkv: dict[str, list[torch.Tensor | None]] = {}
    for name, target in names.items():
        if isinstance(target, str):
            sd[target] = found[name]
        else:
            qkv.setdefault(target[0], [None, None, None])[target[1]] = found[name]
    for ours, parts in qkv.items():
        sd[ours] = torch.cat(parts, dim=0)
    if set(sd) != set(expected) or any(tuple(sd[k].shape) != s for k, s in expected.items()):  # a bug, not input
        raise TaftError(f"{src}: internal error: converted names/shapes do not match BertEncoder({cfg})")
    return sd
