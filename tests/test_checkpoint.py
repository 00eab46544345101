"""Checkpoint reading: config parsing, weight-file discovery, name mapping, tokenizer, reference loading.

Expected names and values are written out here from SPEC §2 and the files themselves, not derived
from the mapping under test.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from internvl_chat.engine.checkpoint import CheckpointError, iter_tensors, load_state_dict
from internvl_chat.engine.config import DEFAULT_SYSTEM_MESSAGE, load_config, parse_config
from internvl_chat.engine.tokenizer import load_tokenizer, special_token_ids
from internvl_chat.engine.weight_files import find_weight_files
from internvl_chat.engine.weight_names import canonical_to_hf, hf_to_canonical, qkv_slot

# tiny model sizes as make_tiny_checkpoint's defaults (TinySizes)
V_HIDDEN, V_LAYERS, V_HEADS, V_MLP = 64, 2, 4, 128
T_HIDDEN, T_LAYERS, T_HEADS, T_KV, T_FFN = 64, 2, 4, 2, 128


def canonical_names_from_spec(vit: str = "300m") -> set[str]:
    """Every tensor name of a 2-layer tiny model, written from SPEC §2."""
    names = {
        "vision_model.embeddings.class_embedding",
        "vision_model.embeddings.patch_embedding.weight",
        "vision_model.embeddings.patch_embedding.bias",
        "vision_model.embeddings.position_embedding",
        "mlp1.0.weight", "mlp1.0.bias", "mlp1.1.weight", "mlp1.1.bias", "mlp1.3.weight", "mlp1.3.bias",
        "language_model.model.embed_tokens.weight",
        "language_model.model.norm.weight",
        "language_model.lm_head.weight",
    }  # fmt: skip
    for n in range(V_LAYERS):
        p = f"vision_model.encoder.layers.{n}."
        names |= {p + "attn.qkv.weight", p + "attn.proj.weight", p + "attn.proj.bias", p + "ls1", p + "ls2"}
        names |= {p + f"mlp.fc{i}.{leaf}" for i in (1, 2) for leaf in ("weight", "bias")}
        names |= {p + "norm1.weight", p + "norm2.weight"}
        if vit == "300m":
            names |= {p + "attn.qkv.bias", p + "norm1.bias", p + "norm2.bias"}
        else:
            names |= {p + "attn.q_norm.weight", p + "attn.k_norm.weight"}
    for n in range(T_LAYERS):
        p = f"language_model.model.layers.{n}."
        names |= {p + f"self_attn.{x}_proj.{leaf}" for x in "qkv" for leaf in ("weight", "bias")}
        names |= {p + "self_attn.o_proj.weight"}
        names |= {p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
    return names


# hand-written pairs covering every kind of name (SPEC §2 renaming table)
HF_NEW_TO_CANONICAL = {
    "model.vision_tower.embeddings.cls_token": "vision_model.embeddings.class_embedding",
    "model.vision_tower.embeddings.position_embeddings": "vision_model.embeddings.position_embedding",
    "model.vision_tower.embeddings.patch_embeddings.projection.weight": "vision_model.embeddings.patch_embedding.weight",
    "model.vision_tower.embeddings.patch_embeddings.projection.bias": "vision_model.embeddings.patch_embedding.bias",
    "model.vision_tower.encoder.layer.1.attention.projection_layer.weight": "vision_model.encoder.layers.1.attn.proj.weight",
    "model.vision_tower.encoder.layer.1.attention.q_norm.weight": "vision_model.encoder.layers.1.attn.q_norm.weight",
    "model.vision_tower.encoder.layer.1.attention.k_norm.weight": "vision_model.encoder.layers.1.attn.k_norm.weight",
    "model.vision_tower.encoder.layer.1.attention.k_proj.bias": "vision_model.encoder.layers.1.attn.qkv.bias",
    "model.vision_tower.encoder.layer.0.layernorm_before.bias": "vision_model.encoder.layers.0.norm1.bias",
    "model.vision_tower.encoder.layer.0.layernorm_after.weight": "vision_model.encoder.layers.0.norm2.weight",
    "model.vision_tower.encoder.layer.0.lambda_1": "vision_model.encoder.layers.0.ls1",
    "model.vision_tower.encoder.layer.0.lambda_2": "vision_model.encoder.layers.0.ls2",
    "model.vision_tower.encoder.layer.0.mlp.fc2.weight": "vision_model.encoder.layers.0.mlp.fc2.weight",
    "model.multi_modal_projector.layer_norm.weight": "mlp1.0.weight",
    "model.multi_modal_projector.linear_1.bias": "mlp1.1.bias",
    "model.multi_modal_projector.linear_2.weight": "mlp1.3.weight",
    "model.language_model.embed_tokens.weight": "language_model.model.embed_tokens.weight",
    "model.language_model.layers.1.self_attn.q_proj.bias": "language_model.model.layers.1.self_attn.q_proj.bias",
    "model.language_model.layers.0.mlp.gate_proj.weight": "language_model.model.layers.0.mlp.gate_proj.weight",
    "model.language_model.norm.weight": "language_model.model.norm.weight",
    "lm_head.weight": "language_model.lm_head.weight",
}
HF_LEGACY_TO_CANONICAL = {
    "vision_tower.embeddings.cls_token": "vision_model.embeddings.class_embedding",
    "vision_tower.encoder.layer.0.attention.v_proj.weight": "vision_model.encoder.layers.0.attn.qkv.weight",
    "vision_tower.encoder.layer.1.lambda_2": "vision_model.encoder.layers.1.ls2",
    "multi_modal_projector.linear_1.weight": "mlp1.1.weight",
    "language_model.model.layers.0.self_attn.o_proj.weight": "language_model.model.layers.0.self_attn.o_proj.weight",
    "language_model.lm_head.weight": "language_model.lm_head.weight",
}


def safetensors_names(model_dir: Path) -> set[str]:
    names: set[str] = set()
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            names |= set(f.keys())
    return names


def tokenizer_json_ids(model_dir: Path) -> dict[str, int]:
    data = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    ids = dict(data["model"]["vocab"])
    ids.update({t["content"]: t["id"] for t in data["added_tokens"]})
    return ids


def original_config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def variants(tmp_path_factory, tiny_tokenizer, tiny_original, tiny_hf, tiny_hf_legacy) -> dict[str, Path]:
    """The same seed-0 weights in every layout and file format."""
    from make_tiny_checkpoint import make_tiny_checkpoint

    def make(name: str, **kw) -> Path:
        return make_tiny_checkpoint(tmp_path_factory.mktemp(name), seed=0, tokenizer_dir=tiny_tokenizer, **kw)

    return {
        "original": tiny_original,
        "hf_new": tiny_hf,
        "hf_legacy": tiny_hf_legacy,
        "original_sharded": make("o_sharded", layout="original", file_format="sharded"),
        "hf_sharded": make("h_sharded", layout="hf", file_format="sharded", num_shards=3),
        "original_bin": make("o_bin", layout="original", file_format="bin"),
        "hf_legacy_bin": make("h_bin", layout="hf", file_format="bin", prefix_style="legacy"),
    }


# ------------------------------------------------------------------ config


def test_config_original_layout_values(tiny_original, tiny_tokenizer):
    cfg = load_config(tiny_original)
    assert cfg.layout == "original"
    v, t = cfg.vision, cfg.text
    assert (v.hidden_size, v.num_layers, v.num_heads, v.intermediate_size) == (V_HIDDEN, V_LAYERS, V_HEADS, V_MLP)
    assert (v.norm_type, v.norm_eps, v.qkv_bias, v.qk_norm) == ("layer_norm", 1e-6, True, False)
    assert (v.image_size, v.patch_size, v.grid) == (448, 14, 32)
    n_tokens = len(load_tokenizer(tiny_tokenizer))
    assert t.vocab_size == math.ceil(n_tokens / 64) * 64 and t.vocab_size >= n_tokens
    assert (t.hidden_size, t.num_layers, t.num_heads, t.num_kv_heads, t.head_dim, t.intermediate_size) == (
        T_HIDDEN, T_LAYERS, T_HEADS, T_KV, T_HIDDEN // T_HEADS, T_FFN,
    )  # fmt: skip
    assert (t.rms_norm_eps, t.rope_theta, t.tie_word_embeddings) == (1e-6, 1e6, False)
    assert cfg.downsample_ratio == 0.5 and cfg.tokens_per_tile == 256
    assert cfg.system_message == DEFAULT_SYSTEM_MESSAGE  # absent in config.json → the default
    assert (cfg.max_dynamic_patch, cfg.use_thumbnail, cfg.template, cfg.quant) == (12, True, "internvl2_5", None)
    assert cfg.torch_dtype == "bfloat16"


def test_config_original_layout_is_published_shape(tiny_original):
    raw = original_config(tiny_original)
    assert raw["architectures"] == ["InternVLChatModel"] and raw["model_type"] == "internvl_chat"
    assert raw["llm_config"]["architectures"] == ["Qwen2ForCausalLM"]
    assert (raw["ps_version"], raw["select_layer"], raw["template"], raw["force_image_size"]) == ("v2", -1, "internvl2_5", 448)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "norm_type",
                "layer_norm_eps", "qkv_bias", "qk_normalization", "image_size", "patch_size", "hidden_act"):  # fmt: skip
        assert key in raw["vision_config"], key


def test_config_6b_variant(tiny_original_6b):
    v = load_config(tiny_original_6b).vision
    assert (v.norm_type, v.qkv_bias, v.qk_norm) == ("rms_norm", False, True)


def test_config_hf_layout_values(tiny_hf, tiny_tokenizer):
    cfg = load_config(tiny_hf)
    assert cfg.layout == "hf"
    raw = original_config(tiny_hf)
    assert raw["architectures"] == ["InternVLForConditionalGeneration"] and raw["model_type"] == "internvl"
    assert raw["image_token_id"] == tokenizer_json_ids(tiny_tokenizer)["<IMG_CONTEXT>"]
    v, t = cfg.vision, cfg.text
    assert (v.hidden_size, v.num_layers, v.num_heads, v.intermediate_size) == (V_HIDDEN, V_LAYERS, V_HEADS, V_MLP)
    assert (v.norm_type, v.qkv_bias, v.qk_norm, v.image_size, v.patch_size) == ("layer_norm", True, False, 448, 14)
    assert (t.hidden_size, t.num_layers, t.num_heads, t.num_kv_heads, t.intermediate_size) == (
        T_HIDDEN, T_LAYERS, T_HEADS, T_KV, T_FFN,
    )  # fmt: skip
    assert (t.rope_theta, t.tie_word_embeddings) == (1e6, False)
    assert cfg.tokens_per_tile == 256 and cfg.system_message is None
    assert t.vocab_size == load_config(tiny_hf).text.vocab_size == original_config(tiny_hf)["text_config"]["vocab_size"]


def test_config_hf_6b_flags():
    from make_tiny_checkpoint import TinySizes, _internvl_config

    special = {"<|endoftext|>": 1, "<|im_end|>": 2, "<IMG_CONTEXT>": 3}
    raw = _internvl_config(TinySizes(), "6b", 128, special).to_dict()
    raw["architectures"] = ["InternVLForConditionalGeneration"]
    v = parse_config(raw).vision
    assert (v.norm_type, v.qkv_bias, v.qk_norm) == ("rms_norm", False, True)


def test_internlm2_llm_is_refused_by_name(tiny_original):
    raw = original_config(tiny_original)
    raw["llm_config"]["architectures"] = ["InternLM2ForCausalLM"]
    raw["llm_config"]["model_type"] = "internlm2"
    with pytest.raises(CheckpointError, match="InternLM2"):
        parse_config(raw)


def test_unknown_architecture_is_refused():
    with pytest.raises(CheckpointError, match="unknown architecture"):
        parse_config({"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava"})


@pytest.mark.parametrize(
    "llm, family",
    [
        ({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}, "Qwen3 (InternVL3.5)"),
        ({"model_type": "qwen3_moe"}, "Qwen3-MoE (InternVL3.5-30B-A3B or -241B-A28B)"),
        ({"architectures": ["InternLM2ForCausalLM"]}, "InternLM2 (InternVL3-9B, or an InternLM-based InternVL2/2.5)"),
        ({"architectures": ["Phi3ForCausalLM"], "model_type": "phi3"}, "Phi-3 (as in InternVL2-4B)"),
    ],
)
def test_another_internvl_s_llm_is_named_as_what_it_is(tiny_original, llm, family):
    """An InternVL3.5 was 'unsupported LLM ["Qwen3ForCausalLM"]'; an InternVL2.5-8B 'InternLM2 (InternVL3-9B layout)'."""
    raw = original_config(tiny_original)
    raw["llm_config"].pop("architectures")
    raw["llm_config"].pop("model_type")
    raw["llm_config"].update(llm)
    with pytest.raises(CheckpointError) as err:
        parse_config(raw)
    assert str(err.value) == (f"the LLM in llm_config is {family}, which internvl-chat does not support; "
                              "use a Qwen2-based InternVL3 checkpoint (1B, 2B, 8B, 14B, 38B, 78B)")  # fmt: skip


def test_a_text_only_language_model_is_named_as_one():
    """A plain Qwen2 (no vision) was 'unknown architecture ["Qwen2ForCausalLM"]'."""
    with pytest.raises(CheckpointError) as err:
        parse_config({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896})
    assert str(err.value) == ('config.json describes a text-only language model (["Qwen2ForCausalLM"]), not a vision-language '
                              "one; internvl-chat loads InternVL3 checkpoints (InternVLChatModel or InternVLForConditionalGeneration)")  # fmt: skip


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_config(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="does not exist"):
        find_weight_files(tmp_path / "nope")


def test_folder_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        load_config(tmp_path)


def test_a_hugging_face_cache_folder_names_the_checkpoint_inside_it(tmp_path, tiny_original):
    """~/.cache/huggingface/hub/models--ORG--NAME is the folder `ls` shows; the checkpoint is in its
    snapshots/REVISION/. It was told "has no config.json; point --model at a downloaded checkpoint"."""
    cache = tmp_path / "models--OpenGVLab--InternVL3-2B"
    for name in ("blobs", "refs"):
        (cache / name).mkdir(parents=True)
    old, new = cache / "snapshots" / "1f0e", cache / "snapshots" / "9c2a"
    for revision, mtime in ((old, 1_000_000), (new, 2_000_000)):
        revision.mkdir(parents=True)
        shutil.copy(tiny_original / "config.json", revision / "config.json")
        os.utime(revision / "config.json", (mtime, mtime))
    with pytest.raises(CheckpointError) as err:
        load_config(cache)
    assert str(err.value) == f"{cache} is a Hugging Face cache folder; pass --model {new}, the checkpoint inside it"
    # a newer revision whose download stopped before its config.json blob: the whole one is named
    (cache / "snapshots" / "77ab").mkdir()
    (cache / "snapshots" / "77ab" / "config.json").symlink_to("../../blobs/never-written")
    with pytest.raises(CheckpointError) as err:
        load_config(cache)
    assert str(err.value) == f"{cache} is a Hugging Face cache folder; pass --model {new}, the checkpoint inside it"


@pytest.mark.parametrize("given", ["OpenGVLab/InternVL3-1B", "https://huggingface.co/OpenGVLab/InternVL3-1B/tree/main"])
def test_a_hugging_face_model_id_says_to_download_it(tmp_path, tiny_original, monkeypatch, given):
    """--model OpenGVLab/InternVL3-1B (or its web address) was told only "does not exist; pass --model
    with a checkpoint folder", read as a typo: nothing said that internvl-chat does not download, or
    where the copy the Hugging Face cache already holds is."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError) as err:
        load_config(Path(given))
    assert str(err.value).endswith(
        "does not exist; internvl-chat does not download models: for the Hugging Face model OpenGVLab/InternVL3-1B, "
        "download it first (hf download OpenGVLab/InternVL3-1B) and give the folder it prints"
    )
    snapshot = tmp_path / "hf" / "hub" / "models--OpenGVLab--InternVL3-1B" / "snapshots" / "9c2a"
    snapshot.mkdir(parents=True)
    shutil.copy(tiny_original / "config.json", snapshot / "config.json")
    with pytest.raises(CheckpointError) as err:
        load_config(Path(given))
    assert str(err.value).endswith(f"the Hugging Face cache holds OpenGVLab/InternVL3-1B: give its folder {snapshot}")


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_a_file_of_a_checkpoint_given_for_its_folder_names_the_folder(tiny_original, name):
    """--model DIR/model.safetensors was told to pass "the checkpoint folder" without naming it."""
    with pytest.raises(CheckpointError) as err:
        load_config(tiny_original / name)
    assert str(err.value) == (f"{tiny_original / name} is not a folder; pass --model with the checkpoint folder, not a file "
                              f"({tiny_original} holds it)")  # fmt: skip


def test_a_local_path_with_a_typo_is_not_taken_for_a_model_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for given in ("models/InternVL3-1B", "a/b/c", str(tmp_path / "OpenGVLab" / "InternVL3-1B")):
        with pytest.raises(CheckpointError) as err:
            load_config(Path(given))
        assert str(err.value) == f"model folder {given} does not exist; pass --model with a checkpoint folder"


def test_folder_without_weights(tmp_path, tiny_original):
    shutil.copy(tiny_original / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="no weights"):
        find_weight_files(tmp_path)
    with pytest.raises(CheckpointError, match="no weights"):
        list(iter_tensors(tmp_path))


# ------------------------------------------------------------------ weight files


def test_find_weight_files_kinds(variants, tmp_path):
    single = find_weight_files(variants["original"])
    assert (single.kind, [p.name for p in single.files], single.index) == ("safetensors", ["model.safetensors"], None)

    sharded = find_weight_files(variants["hf_sharded"])
    assert sharded.kind == "safetensors" and sharded.index.name == "model.safetensors.index.json"
    assert [p.name for p in sharded.files] == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]

    bins = find_weight_files(variants["original_bin"])
    assert bins.kind == "bin" and bins.index.name == "pytorch_model.bin.index.json"
    assert [p.name for p in bins.files] == ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]

    state = {"language_model.model.norm.weight": torch.arange(4.0)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert find_weight_files(tmp_path).files == (tmp_path / "pytorch_model.bin",)

    tinychat = tmp_path / "tc"
    tinychat.mkdir()
    torch.save(state, tinychat / "internvl3-1b-w4-g128-awq-v2.pt")
    found = find_weight_files(tinychat)
    assert found.kind == "tinychat"
    got = dict(iter_tensors(tinychat, "original"))
    assert list(got) == list(state) and torch.equal(got["language_model.model.norm.weight"], torch.arange(4.0))


def test_index_naming_a_missing_shard(variants, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(variants["original_sharded"], folder)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        find_weight_files(folder)


def test_bin_with_pickled_object_is_refused(tmp_path):
    torch.save({"w": torch.zeros(2), "evil": Path("x")}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refused for safety"):
        list(iter_tensors(tmp_path, "original"))


def test_iter_tensors_is_lazy_shard_by_shard(variants, tmp_path):
    # the first tensor comes out before the second shard is ever opened
    folder = tmp_path / "lazy"
    shutil.copytree(variants["original_sharded"], folder)
    stream = iter_tensors(folder, "original")
    first_name, _ = next(stream)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert index["weight_map"][first_name] == "model-00001-of-00002.safetensors"
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="model-00002-of-00002"):
        list(stream)


# ------------------------------------------------------------------ name mapping


def test_hand_written_name_pairs():
    for hf, canonical in {**HF_NEW_TO_CANONICAL, **HF_LEGACY_TO_CANONICAL}.items():
        assert hf_to_canonical(hf) == canonical, hf
    assert canonical_to_hf("vision_model.encoder.layers.3.attn.qkv.weight", "legacy") == [
        "vision_tower.encoder.layer.3.attention.q_proj.weight",
        "vision_tower.encoder.layer.3.attention.k_proj.weight",
        "vision_tower.encoder.layer.3.attention.v_proj.weight",
    ]
    assert canonical_to_hf("language_model.lm_head.weight", "new") == ["lm_head.weight"]
    assert canonical_to_hf("language_model.lm_head.weight", "legacy") == ["language_model.lm_head.weight"]
    assert [qkv_slot(f"model.vision_tower.encoder.layer.0.attention.{x}_proj.bias") for x in "qkv"] == [0, 1, 2]
    assert qkv_slot("model.language_model.layers.0.self_attn.q_proj.weight") is None
    assert hf_to_canonical("model.language_model.rotary_emb.inv_freq") is None
    assert hf_to_canonical("something.else.weight") == "something.else.weight"
    assert canonical_to_hf("something.else.weight") == ["something.else.weight"]


@pytest.mark.parametrize("vit", ["300m", "6b"])
@pytest.mark.parametrize("style", ["new", "legacy"])
def test_name_mapping_round_trips_every_tensor(vit, style):
    from make_tiny_checkpoint import build_reference_model

    special = {"<|endoftext|>": 1, "<|im_end|>": 2, "<IMG_CONTEXT>": 3}
    hf_names = list(build_reference_model(128, special, vit=vit).state_dict())
    if style == "legacy":  # renamed by hand: transformers' own prefixes of that style
        hf_names = [
            "language_model.lm_head.weight" if n == "lm_head.weight"
            else "language_model.model." + n[len("model.language_model."):] if n.startswith("model.language_model.")
            else n[len("model."):]
            for n in hf_names
        ]  # fmt: skip
    canonical = {hf_to_canonical(n) for n in hf_names}
    assert canonical == canonical_names_from_spec(vit)
    back = [h for c in canonical for h in canonical_to_hf(c, style)]
    assert sorted(back) == sorted(hf_names)
    assert all(hf_to_canonical(h) == c for c in canonical for h in canonical_to_hf(c, style))


def test_prefix_styles_match_transformers(tiny_hf, tiny_hf_legacy, tmp_path):
    """The new style is transformers' in-memory naming; legacy is what save_pretrained writes (5.24)."""
    from make_tiny_checkpoint import build_reference_model

    special = {"<|endoftext|>": 1, "<|im_end|>": 2, "<IMG_CONTEXT>": 3}
    model = build_reference_model(512, special)
    assert safetensors_names(tiny_hf) == set(model.state_dict())
    model.save_pretrained(str(tmp_path))
    assert safetensors_names(tiny_hf_legacy) == safetensors_names(tmp_path)


def test_fused_qkv_is_q_then_k_then_v(tiny_hf):
    got = load_state_dict(tiny_hf)
    with safe_open(str(tiny_hf / "model.safetensors"), "pt") as f:
        for leaf in ("weight", "bias"):
            p = "model.vision_tower.encoder.layer.1.attention."
            expected = torch.cat([f.get_tensor(p + f"{x}_proj.{leaf}") for x in "qkv"], dim=0)
            assert torch.equal(got[f"vision_model.encoder.layers.1.attn.qkv.{leaf}"], expected)
        assert torch.equal(
            got["vision_model.embeddings.class_embedding"], f.get_tensor("model.vision_tower.embeddings.cls_token")
        )


def test_all_layouts_and_formats_yield_the_same_tensors(variants):
    reference = load_state_dict(variants["original"], "original")
    assert set(reference) == canonical_names_from_spec("300m")
    with safe_open(str(variants["original"] / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(reference)  # the original file holds canonical names as they are
    for name, folder in variants.items():
        got = load_state_dict(folder)  # layout read from config.json
        assert set(got) == set(reference), name
        for key, tensor in reference.items():
            assert got[key].dtype == torch.bfloat16 and torch.equal(got[key], tensor), (name, key)


def test_all_layouts_and_formats_load_with_their_embeddings_checked(variants):
    """The loader compares config.json's vocab_size with the embedding rows each file format
    declares (safetensors headers, pickles) before the tokenizer: every honest variant passes."""
    from internvl_chat.engine.loader import load_model

    for name, folder in variants.items():
        loaded = load_model(folder, device="cpu", dtype="float32", max_context=64)
        rows = loaded.model.language_model.model.embed_tokens.weight.shape[0]
        assert rows == loaded.config.text.vocab_size, name


def test_shards_really_split_the_tensors(variants):
    index = json.loads((variants["hf_sharded"] / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    assert set(index["weight_map"]) == safetensors_names(variants["hf_sharded"])


def test_incomplete_vision_qkv_is_an_error(tiny_hf, tmp_path):
    with safe_open(str(tiny_hf / "model.safetensors"), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys() if not k.endswith("layer.0.attention.k_proj.weight")}
    shutil.copy(tiny_hf / "config.json", tmp_path / "config.json")
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="k_proj"):
        list(iter_tensors(tmp_path))


def test_buffers_skipped_and_unknown_names_pass_through(tiny_hf, tmp_path):
    shutil.copy(tiny_hf / "config.json", tmp_path / "config.json")
    save_file(
        {
            "model.language_model.rotary_emb.inv_freq": torch.ones(8),
            "model.language_model.norm.weight": torch.full((4,), 2.0),
            "extra.thing": torch.zeros(3),
        },
        str(tmp_path / "model.safetensors"),
    )
    assert {k: v.tolist() for k, v in iter_tensors(tmp_path)} == {
        "language_model.model.norm.weight": [2.0] * 4,
        "extra.thing": [0.0] * 3,
    }


def test_float32_and_6b_checkpoints(tmp_path, tiny_tokenizer, tiny_original_6b):
    from make_tiny_checkpoint import make_tiny_checkpoint

    folder = make_tiny_checkpoint(tmp_path, layout="original", dtype="float32", tokenizer_dir=tiny_tokenizer)
    assert {t.dtype for _, t in iter_tensors(folder)} == {torch.float32}
    assert original_config(folder)["torch_dtype"] == "float32"
    six_b = load_state_dict(tiny_original_6b)
    assert set(six_b) == canonical_names_from_spec("6b")
    assert six_b["vision_model.encoder.layers.0.attn.qkv.weight"].shape == (3 * V_HIDDEN, V_HIDDEN)


@pytest.mark.parametrize("file_format", ["safetensors", "sharded", "bin"])
def test_tiny_checkpoint_weight_files_follow_the_umask(tmp_path, file_format):
    """safetensors writes its files 0600 whatever the umask: a tiny checkpoint's config and tokenizer
    were readable by others and its weights not."""
    import os
    import stat

    from make_tiny_checkpoint import write_state_dict

    state = {"a.weight": torch.ones(4, 4), "b.weight": torch.zeros(8)}
    old = os.umask(0o022)
    try:
        paths = write_state_dict(state, tmp_path, file_format)
    finally:
        os.umask(old)
    assert len(paths) == (1 if file_format == "safetensors" else 2)
    for path in paths:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name


def test_weights_are_not_trivial(tiny_original):
    state = load_state_dict(tiny_original)
    for name, t in state.items():
        t = t.float()
        assert t.std() > 0.01, name  # no constant tensors: a mix-up must change outputs
        if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "layernorm.weight", "mlp1.0.weight")):
            assert (t - 1).abs().mean() > 0.05, name  # norms are not all ones


# ------------------------------------------------------------------ reference model


def test_reference_model_loads_every_fixture(tiny_original, tiny_original_6b, tiny_hf, tiny_hf_legacy):
    from reference import reference_model

    torch.manual_seed(0)
    pixels = torch.randn(1, 3, 448, 448)
    img = special_token_ids(load_tokenizer(tiny_original)).img_context
    ids = torch.tensor([[5, 6, 7] + [img] * 256 + [8, 9]])
    logits = {}
    for name, folder in [("o", tiny_original), ("h", tiny_hf), ("l", tiny_hf_legacy), ("6b", tiny_original_6b)]:
        model = reference_model(folder)  # raises on any missing / unexpected key
        assert next(model.parameters()).dtype == torch.float32 and not model.training
        with torch.no_grad():
            logits[name] = model(input_ids=ids, pixel_values=pixels).logits[0, -1]
            other = model(input_ids=ids, pixel_values=torch.randn(1, 3, 448, 448)).logits[0, -1]
        assert (logits[name] - other).abs().max() > 1e-2, name  # the image reaches the answer
        assert logits[name].std() > 0.3, name  # logits are far from flat
    assert torch.equal(logits["o"], logits["h"]) and torch.equal(logits["o"], logits["l"])


# ------------------------------------------------------------------ tied embeddings (transformers' rule)


@pytest.fixture(scope="module")
def tied_hf(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tied -hf checkpoint written by the installed transformers' own save_pretrained."""
    from make_tiny_checkpoint import build_reference_model, token_ids

    out = tmp_path_factory.mktemp("tied_hf")
    num_tokens, special = token_ids(tiny_tokenizer)
    model = build_reference_model(-(-num_tokens // 64) * 64, special, seed=3, tie_word_embeddings=True)
    model.save_pretrained(str(out))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_tokenizer / name).is_file():
            shutil.copy(tiny_tokenizer / name, out / name)
    return out


def _tied_copy(src: Path, dst: Path, config_edit=None, tensor_edit=None) -> Path:
    shutil.copytree(src, dst)
    if config_edit:
        raw = original_config(dst)
        config_edit(raw)
        (dst / "config.json").write_text(json.dumps(raw), encoding="utf-8")
    if tensor_edit:
        from safetensors.torch import load_file

        tensors = load_file(dst / "model.safetensors")
        tensor_edit(tensors)
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _logits_ours_and_reference(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from internvl_chat.engine.loader import load_model
    from reference import reference_model

    loaded = load_model(folder, device="cpu", dtype="float32", max_context=512)
    s = loaded.special
    ids = [s.im_start, 5, 6, s.img_start] + [s.img_context] * 256 + [s.img_end, 7, 8, s.im_end, s.im_start, 9]
    pixels = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(5))
    ours = loaded.model.forward(ids, 0, loaded.model.encode_images(pixels), all_logits=True)
    with torch.no_grad():
        ref = reference_model(folder)(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0]
    return ours, ref


def _assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ref.std() > 0.3  # far from flat: a wrong head would show
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_tied_hf_checkpoint_from_save_pretrained_matches_transformers(tied_hf):
    raw = original_config(tied_hf)
    # what transformers ≥ 5 writes: the flag at the top level, text_config saying false, no head
    assert raw["tie_word_embeddings"] is True and raw["text_config"]["tie_word_embeddings"] is False
    assert not any("lm_head" in n for n in safetensors_names(tied_hf))
    assert load_config(tied_hf).text.tie_word_embeddings
    ours, ref = _logits_ours_and_reference(tied_hf)
    _assert_close(ours, ref)


def test_tied_flag_absent_means_tied_as_in_transformers(tied_hf, tmp_path):
    folder = _tied_copy(tied_hf, tmp_path / "absent", config_edit=lambda raw: raw.pop("tie_word_embeddings"))
    assert load_config(folder).text.tie_word_embeddings  # InternVLConfig's default is true
    ours, ref = _logits_ours_and_reference(folder)
    _assert_close(ours, ref)


def test_text_config_flag_alone_does_not_tie(tied_hf, tmp_path):
    """transformers reads only the top-level flag: text_config saying true ties nothing."""
    from transformers import InternVLForConditionalGeneration

    def edit(raw):
        raw["tie_word_embeddings"] = False
        raw["text_config"]["tie_word_embeddings"] = True

    folder = _tied_copy(tied_hf, tmp_path / "text_only", config_edit=edit)
    assert not load_config(folder).text.tie_word_embeddings
    _, info = InternVLForConditionalGeneration.from_pretrained(str(folder), output_loading_info=True)
    assert "lm_head.weight" in info["missing_keys"]  # transformers would leave the head random
    from internvl_chat.engine.loader import load_model

    with pytest.raises(CheckpointError, match=r"lacks 1 tensor: language_model\.lm_head\.weight"):
        load_model(folder, device="cpu", dtype="float32", max_context=256)


def test_tied_checkpoint_storing_only_the_head(tied_hf, tmp_path):
    """Tying is symmetric when loading: a stored head stands in for missing embeddings."""

    def edit(tensors):
        tensors["lm_head.weight"] = tensors.pop("language_model.model.embed_tokens.weight")

    folder = _tied_copy(tied_hf, tmp_path / "head_only", tensor_edit=edit)
    ours, ref = _logits_ours_and_reference(folder)
    _assert_close(ours, ref)


def test_tied_checkpoint_storing_a_different_head_uses_both(tied_hf, tmp_path):
    """transformers does not tie a head stored with other values than the embeddings."""

    def edit(tensors):
        embed = tensors["language_model.model.embed_tokens.weight"]
        tensors["lm_head.weight"] = torch.randn(embed.shape, generator=torch.Generator().manual_seed(9))

    folder = _tied_copy(tied_hf, tmp_path / "both", tensor_edit=edit)
    ours, ref = _logits_ours_and_reference(folder)
    _assert_close(ours, ref)


def test_original_layout_ties_by_llm_config(tiny_original, tmp_path):
    """The original code builds Qwen2ForCausalLM from llm_config, so llm_config's flag decides."""
    from internvl_chat.engine.loader import load_model

    def drop_head(tensors):
        tensors.pop("language_model.lm_head.weight")

    def tie_llm(raw):
        raw["llm_config"]["tie_word_embeddings"] = True

    def tie_top_only(raw):
        raw["tie_word_embeddings"] = True

    tied = _tied_copy(tiny_original, tmp_path / "tied", config_edit=tie_llm, tensor_edit=drop_head)
    loaded = load_model(tied, device="cpu", dtype="float32", max_context=256)
    lm = loaded.model.language_model
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    # the same logits as an untied copy whose head is the embedding matrix, stored
    untied = _tied_copy(
        tiny_original, tmp_path / "untied",
        tensor_edit=lambda t: t.update({"language_model.lm_head.weight": t["language_model.model.embed_tokens.weight"].clone()}),
    )  # fmt: skip
    ids = list(range(3, 40))
    expected = load_model(untied, device="cpu", dtype="float32", max_context=256).model.forward(ids, 0, all_logits=True)
    assert torch.equal(loaded.model.forward(ids, 0, all_logits=True), expected)

    top_only = _tied_copy(tiny_original, tmp_path / "top", config_edit=tie_top_only, tensor_edit=drop_head)
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor: language_model\.lm_head\.weight"):
        load_model(top_only, device="cpu", dtype="float32", max_context=256)


# ------------------------------------------------------------------ image preprocessing from the checkpoint


def test_tiling_keys_are_read_from_the_original_config(tiny_original):
    raw = original_config(tiny_original)
    cfg = parse_config(raw)
    assert (cfg.min_dynamic_patch, cfg.max_dynamic_patch, cfg.dynamic_image_size, cfg.use_thumbnail) == (1, 12, True, True)
    assert cfg.tile_limits() == (1, 12) and cfg.tile_limits(0) == (1, 12) and cfg.tile_limits(6) == (1, 6)
    raw.update(max_dynamic_patch=6, min_dynamic_patch=2, use_thumbnail=False)
    cfg = parse_config(raw)
    assert (cfg.min_dynamic_patch, cfg.max_dynamic_patch, cfg.use_thumbnail) == (2, 6, False)
    assert cfg.tile_limits() == (2, 6) and cfg.tile_limits(1) == (1, 1)  # the user's maximum wins
    raw["dynamic_image_size"] = False
    assert parse_config(raw).tile_limits() == (1, 1) == parse_config(raw).tile_limits(12)


@pytest.mark.parametrize(
    "key, value",
    [("max_dynamic_patch", 0), ("max_dynamic_patch", 1000), ("max_dynamic_patch", "12"), ("max_dynamic_patch", 12.0),
     ("min_dynamic_patch", 13), ("min_dynamic_patch", 0), ("dynamic_image_size", "yes"), ("use_thumbnail", 1)],
)  # fmt: skip
def test_bad_tiling_keys_are_refused(tiny_original, key, value):
    raw = original_config(tiny_original)
    raw[key] = value
    with pytest.raises(CheckpointError, match=key):
        parse_config(raw)


def test_hf_tiling_comes_from_preprocessor_config(tiny_hf, tmp_path):
    folder = tmp_path / "hf"
    shutil.copytree(tiny_hf, folder)
    assert load_config(folder).tile_limits() == (1, 12)  # no preprocessor_config.json: the processor's defaults
    (folder / "preprocessor_config.json").write_text(json.dumps({"max_patches": 3, "min_patches": 2, "crop_to_patches": False}))
    cfg = load_config(folder)
    assert (cfg.min_dynamic_patch, cfg.max_dynamic_patch, cfg.dynamic_image_size) == (2, 3, True)
    (folder / "preprocessor_config.json").write_text(json.dumps({"max_patches": "3"}))
    with pytest.raises(CheckpointError, match="max_patches") as err:
        load_config(folder)
    # the advice names the damaged file (it blamed config.json, which was sound)
    assert "preprocessor_config.json is damaged" in str(err.value) and "config.json is" not in str(err.value).replace(
        "preprocessor_config.json is", "")


@pytest.fixture(scope="module")
def tiling_session_factory(tmp_path_factory, tiny_original):
    from internvl_chat.chat.session import Session
    from internvl_chat.engine.loader import load_model

    def make(**config_keys) -> Session:
        folder = tmp_path_factory.mktemp("tiling")
        shutil.copytree(tiny_original, folder, dirs_exist_ok=True)
        raw = original_config(folder)
        raw.update(config_keys)
        (folder / "config.json").write_text(json.dumps(raw), encoding="utf-8")
        return Session(load_model(folder, device="cpu", dtype="float32", max_context=4096))

    return make


@pytest.fixture(scope="module")
def tiling_images(tmp_path_factory) -> dict[str, Path]:
    from PIL import Image

    out = tmp_path_factory.mktemp("tiling_images")
    paths = {"wide": out / "wide.png", "square": out / "square.png"}
    Image.new("RGB", (3000, 1000), (200, 30, 30)).save(paths["wide"])
    Image.new("RGB", (448, 448), (30, 200, 30)).save(paths["square"])
    return paths


@pytest.mark.parametrize(
    "config_keys, image, user_max, tiles",
    [
        ({"max_dynamic_patch": 2}, "wide", None, 3),  # (2, 1) + thumbnail: the checkpoint's limit, not 12
        ({"max_dynamic_patch": 2}, "wide", 6, 4),  # the user's limit wins: (3, 1) + thumbnail
        ({"min_dynamic_patch": 4}, "square", None, 5),  # at least 4 tiles: 2×2 + thumbnail
        ({"min_dynamic_patch": 4}, "square", 2, 3),  # the user's maximum caps the minimum: (1, 2) + thumbnail
        ({"dynamic_image_size": False}, "wide", None, 1),  # one 448 tile
        ({"dynamic_image_size": False}, "wide", 6, 1),
        ({"use_thumbnail": False}, "wide", None, 12),  # (6, 2), no thumbnail
    ],
)  # fmt: skip
def test_checkpoint_tiling_reaches_cost_decode_and_saved_session(
    tiling_session_factory, tiling_images, config_keys, image, user_max, tiles
):
    from internvl_chat.chat.sampling import SamplingParams

    session = tiling_session_factory(**config_keys)
    media = session.describe_image(tiling_images[image], user_max)  # the cost preview and /context
    assert media.tiles == tiles
    cost = session.media_tokens([media])
    events = list(session.ask("what is it?", [media], SamplingParams(max_new_tokens=1)))
    assert session.turns[-1].features.shape[0] == tiles  # what was decoded is what was priced
    usage = next(e["usage"] for e in events if "usage" in e)
    assert usage["prompt_tokens"] >= cost >= 256 * tiles
    saved = session.to_json()["messages"][0]["media"][0]
    assert saved["tiles"] == tiles
    assert session.describe_image(tiling_images[image], saved["max_tiles"]).tiles == tiles  # reloads the same


def test_a_tied_hf_checkpoint_quantizes_to_one_that_loads_tied(tied_hf, tmp_path):
    """The quantizer writes the original layout: the tie must survive the move from the -hf top-level
    flag to llm_config, or the output (which stores no lm_head) would not load."""
    from internvl_chat.engine.loader import load_model
    from internvl_chat.quantize import main as quantize_main

    out = tmp_path / "w4"
    assert quantize_main([str(tied_hf), str(out), "--method", "rtn", "--device", "cpu"]) == 0
    cfg = load_config(out)
    assert cfg.layout == "original" and cfg.text.tie_word_embeddings
    assert not any("lm_head" in n for n in safetensors_names(out))
    loaded = load_model(out, device="cpu", dtype="float32", max_context=256)
    head, embed = loaded.model.language_model.lm_head.weight, loaded.model.language_model.model.embed_tokens.weight
    assert head.data_ptr() == embed.data_ptr() or torch.equal(head, embed)


@pytest.mark.parametrize("sections, theta", [
    ({"rope_theta": 5.0, "rope_parameters": {"rope_type": "default", "rope_theta": 7.0}}, 7.0),
    ({"rope_theta": 5.0, "rope_parameters": {"rope_type": "default"}}, 5.0),
    ({"rope_theta": 5.0, "rope_parameters": {"rope_type": "default", "rope_theta": 7.0},
      "rope_scaling": {"type": "dynamic", "factor": 2.0, "rope_theta": 9.0}}, 9.0),
    ({"rope_theta": 5.0, "rope_parameters": {"rope_type": "default", "rope_theta": 7.0},
      "rope_scaling": {"type": "dynamic", "factor": 2.0}}, 5.0),
    ({"rope_theta": 5.0, "rope_parameters": {"rope_type": "default", "rope_theta": 7.0}, "rope_scaling": {}}, 7.0),
    ({}, 10000.0), ({"rope_parameters": {"rope_type": "default"}}, 10000.0),  # none given: the default was 1e6
])  # fmt: skip
def test_rope_theta_is_taken_where_transformers_5_takes_it(tiny_original, sections, theta):
    """A config holding rope_theta at the top and in rope_parameters (or rope_scaling) runs with
    the θ transformers 5 gives it (convert_rope_params_to_dict: a non-empty rope_scaling in
    rope_parameters' place, its own rope_theta before the top-level one); the top-level one won."""
    raw = original_config(tiny_original)
    for key in ("rope_theta", "rope_parameters", "rope_scaling"):
        raw["llm_config"].pop(key, None)
    raw["llm_config"].update(json.loads(json.dumps(sections)))
    assert parse_config(raw).text.rope_theta == theta
    from transformers import Qwen2Config  # the reference, on the same fields

    assert Qwen2Config(**json.loads(json.dumps(sections))).rope_parameters["rope_theta"] == theta


# ---------------------------------------------------------------- the published file sets


PUBLISHED_KINDS = ["original", "original-slow", "hf", "hf-config-video"]


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> dict[str, Path]:
    from published_files import published_replica

    root = tmp_path_factory.mktemp("published")
    return {kind: published_replica(root / kind, kind) for kind in PUBLISHED_KINDS}


def _cli_one_shot(folder: Path) -> str:
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "internvl_chat", "--model", str(folder), "--device", "cpu",
                          "-p", "hi", "--max-new-tokens", "4"], capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert run.returncode == 0 and "error" not in run.stderr and "Traceback" not in run.stderr, run.stderr
    return run.stdout


@pytest.mark.parametrize("kind", PUBLISHED_KINDS)
def test_a_replica_of_a_published_file_set_loads_with_its_tokens(published, kind):
    """Every file and key the published InternVL3 repos ship (tests/published_files.py), at a tiny
    size: it loads, the chat and image tokens are the ids its files give them, an -hf tokenizer's
    `<video>` (one past the rows) is no special id, and plain text encodes as transformers encodes it."""
    from transformers import AutoTokenizer

    from internvl_chat.engine.loader import load_model

    folder = published[kind]
    loaded = load_model(folder, device="cpu", dtype="float32", max_context=64)
    declared = {e["content"]: int(i) for i, e in json.loads((folder / "tokenizer_config.json").read_text())["added_tokens_decoder"].items()}
    rows = loaded.config.text.vocab_size
    assert rows == declared["</box>"] + 1
    special = loaded.special
    assert (special.im_start, special.im_end, special.img_context) == (declared["<|im_start|>"], declared["<|im_end|>"], declared["<IMG_CONTEXT>"])
    if kind.startswith("hf"):
        assert loaded.tokenizer.convert_tokens_to_ids("<video>") == rows and rows not in loaded.tokenizer.special_ids
        assert loaded.config.layout == "hf" and loaded.config.max_dynamic_patch == 12
    text = "Describe the picture <tool_call> x </tool_call>, 3.14 héllo 世界\n\n  done"
    reference = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False, local_files_only=True)
    assert loaded.tokenizer.encode(text) == reference(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("kind", ["original-slow", "hf"])
def test_a_replica_of_a_published_file_set_answers_in_one_shot(published, kind):
    assert _cli_one_shot(published[kind]).strip()


def test_a_replica_of_a_published_awq_file_set_loads_and_answers(published, tmp_path):
    """lmdeploy's InternVL3-*-AWQ layout: quantization_config under llm_config with the five keys
    auto_awq writes, weights in pytorch_model-0000k-of-0000n.bin shards with an index."""
    from published_files import as_lmdeploy_bin_shards

    from internvl_chat.quantize import quantize_checkpoint

    quantize_checkpoint(published["original"], tmp_path / "awq", "rtn", group_size=32, device="cpu")
    folder = as_lmdeploy_bin_shards(tmp_path / "awq")
    llm = original_config(folder)["llm_config"]
    assert llm["quantization_config"] == {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 32, "zero_point": True}
    assert sorted(p.name for p in folder.glob("*.bin")) == ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    assert _cli_one_shot(folder).strip()
