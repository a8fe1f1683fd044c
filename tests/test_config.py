"""Typed configs: recipes map onto dataclasses, unknown keys and bad values fail in one sentence."""
from __future__ import annotations

import dataclasses

import pytest

from megatron_senseflow.config import (
    Config,
    ConfigError,
    RECIPE_DIR,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
)
from megatron_senseflow.preflight import check, missing_assets, notes


def test_every_config_field_has_a_docstring():
    import ast
    import inspect

    import megatron_senseflow.config as mod
    import megatron_senseflow.models.configs as arch_mod

    for module in (mod, arch_mod):
        tree = ast.parse(inspect.getsource(module))
        for node in tree.body:
            if not (isinstance(node, ast.ClassDef) and any(
                isinstance(d, ast.Call) and getattr(d.func, "id", "") == "dataclass" for d in node.decorator_list
            )):
                continue
            body = node.body
            for i, stmt in enumerate(body):
                if isinstance(stmt, ast.AnnAssign) and "ClassVar" not in ast.unparse(stmt.annotation):
                    nxt = body[i + 1] if i + 1 < len(body) else None
                    documented = isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant)
                    assert documented, f"{node.name}.{ast.unparse(stmt.target)} has no docstring"


def test_bundled_recipes_load_and_validate():
    names = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
    assert "tiny" in names
    for name in names:
        cfg = load_config(name)
        assert isinstance(cfg, Config)


def test_dotted_overrides_are_typed():
    cfg = load_config("tiny", ["parallel.tp=2", "roles.generator.optimizer.lr=3e-5", "method=dmd2", "train.output_dir=/tmp/x"])
    assert cfg.parallel.tp == 2 and isinstance(cfg.parallel.tp, int)
    assert cfg.roles.generator.optimizer.lr == pytest.approx(3e-5)
    assert cfg.method == "dmd2" and cfg.train.output_dir == "/tmp/x"


def test_unknown_key_names_key_and_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("parallel:\n  tpp: 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    msg = str(e.value)
    assert "parallel.tpp" in msg and str(p) in msg and "did you mean 'tp'" in msg


def test_unknown_override_key():
    with pytest.raises(ConfigError, match="unknown key train.max_step "):
        load_config("tiny", ["train.max_step=3"])


def test_wrong_type_is_one_sentence():
    with pytest.raises(ConfigError, match="parallel.tp must be an integer"):
        load_config("tiny", ["parallel.tp=two"])


def test_tp_must_divide_heads():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"model": {"preset": "flux-dev"}, "parallel": {"tp": 5}}).validate()
    assert str(e.value).startswith("tensor parallel size 5 does not divide FLUX's 24 attention heads")
    with pytest.raises(ConfigError, match="does not divide SD3's 38 attention heads"):
        config_from_dict({"model": {"preset": "sd35-large"}, "parallel": {"tp": 4}, "distill": {"guidance_mode": "cfg"}}).validate()
    config_from_dict({"model": {"preset": "sd35-large"}, "parallel": {"tp": 2}, "distill": {"guidance_mode": "cfg"}}).validate()


def test_world_size_must_fit_layout():
    cfg = config_from_dict({"model": {"preset": "tiny-flux"}, "parallel": {"tp": 2, "pp": 2},
                            "roles": {"discriminator": {"text_condition": "pooled"}}})
    cfg.validate(world_size=8)
    with pytest.raises(ConfigError, match="world size 6 is not a multiple of tp x pp x cp = 4"):
        cfg.validate(world_size=6)


def test_arch_overrides_checked_against_family():
    with pytest.raises(ConfigError, match="unknown flux architecture field"):
        config_from_dict({"model": {"preset": "flux-dev", "arch": {"dual_attention_layers": [0]}}}).validate()
    cfg = config_from_dict({"model": {"preset": "flux-dev", "arch": {"num_layers": 2}}})
    assert cfg.model.teacher_arch().num_layers == 2
    assert cfg.model.teacher_arch().guidance_embeds and not cfg.model.student_arch().guidance_embeds


def test_lora_students_keep_the_guidance_embedder_full_ones_drop_it():
    """A LoRA student's base is the teacher (embedder included) and its file loads into a stock pipeline that has
    the embedder; fully fine-tuned SenseFlow students drop it. The resolved choice is what a run's config says."""
    lora = {"roles": {"generator": {"lora": {"rank": 4}}, "fake_score": {"lora": {"rank": 4}}}}
    full = config_from_dict({"model": {"preset": "flux-dev"}})
    adapted = config_from_dict({"model": {"preset": "flux-dev"}, **lora})
    assert full.model.student_guidance_embeds is False and not full.model.student_arch().guidance_embeds
    assert adapted.model.student_guidance_embeds is True and adapted.model.student_arch().guidance_embeds
    explicit = config_from_dict({"model": {"preset": "flux-dev", "student_guidance_embeds": False}, **lora})
    assert not explicit.model.student_arch().guidance_embeds
    assert "student_guidance_embeds: true" in dump_config(adapted)


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config("tiny", ["parallel.pp=2"])
    p = tmp_path / "resolved.yaml"
    p.write_text(dump_config(cfg))
    again = load_config(str(p))
    assert config_to_dict(again) == config_to_dict(cfg)
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)


@pytest.mark.parametrize("name, ttur, ida, isg, gan, guidance, mode", [
    ("flux_dev", 5, 0.97, 1.0, 2.0, (1.0, 8.0), "embedding"),
    ("sd35_large", 5, 0.97, 1.0, 0.1, (3.0, 10.0), "cfg"),
    ("sd35_medium", 10, 0.98, 0.5, 0.1, (2.0, 8.0), "cfg"),
])
def test_big_recipes_carry_the_authors_hyper_parameters(name, ttur, ida, isg, gan, guidance, mode):
    cfg = load_config(name)
    d = cfg.distill
    assert (d.ttur, d.ida_lambda, d.isg_weight, d.gan_weight) == (ttur, ida, isg, gan)
    assert (*d.dmd_guidance, d.guidance_mode) == (*guidance, mode)
    assert cfg.data.resolution == 1024 and cfg.data.micro_batch_size == 1
    lr = 1e-5 if name == "flux_dev" else 1e-6
    assert cfg.roles.generator.optimizer.lr == lr and cfg.roles.fake_score.optimizer.lr == lr
    # real runs need local paths; the trainer and the launcher refuse without them
    assert any(m.startswith("roles.teacher.checkpoint is not set") for m in missing_assets(cfg))


def test_flux_recipe_anchors_are_the_papers_at_1024px():
    from megatron_senseflow import flow
    from megatron_senseflow.models.flops import image_tokens

    cfg = load_config("flux_dev")
    arch = cfg.model.teacher_arch()
    side = cfg.data.resolution // 8  # FLUX VAE downsamples by 8
    m = cfg.distill.shift or flow.default_shift(arch, image_tokens(arch, side, side), cfg.distill.num_steps)
    assert flow.anchors(cfg.distill.num_steps, m) == pytest.approx([1.0, 0.904, 0.759, 0.512], abs=1e-3)  # the paper truncates to 3 digits


@pytest.mark.parametrize("overrides, message", [
    (["roles.fake_score.precision=fp8"], "roles.fake_score.precision=fp8 needs model.spec=te (TransformerEngine)."),
    (["roles.generator.precision=bf16"], "roles.generator.precision=bf16 computes on bfloat16 weights but model.params_dtype is float32"),
    (["model.spec=te", "model.params_dtype=bfloat16", "roles.generator.precision=bf16", "roles.fake_score.precision=bf16",
      "roles.teacher.precision=bf16", "roles.teacher.fp8_weights=true"], "roles.teacher.fp8_weights=true needs roles.teacher.precision=fp8."),
    (["model.fp8_recipe=nvfp4"], "model.fp8_recipe='nvfp4' is not one of 'delayed', 'tensorwise', 'blockwise', 'mxfp8'"),
])
def test_precision_settings_fail_in_one_sentence(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides)
    assert str(e.value).startswith(message)


def test_fp8_roles_reach_megatron_transformer_config():
    """Per-role precision turns into megatron-core's FP8 fields (the TE path reads them through fp8_utils)."""
    from megatron_senseflow.models import transformer_config

    cfg = load_config("flux_dev", ["model.spec=te", "roles.teacher.precision=fp8", "roles.teacher.fp8_weights=true",
                                   "roles.fake_score.precision=fp8", "model.fp8_recipe=tensorwise"])
    arch = cfg.model.teacher_arch()
    t = transformer_config(arch, params_dtype=__import__("torch").bfloat16, fp8="e4m3", fp8_recipe=cfg.model.fp8_recipe,
                           fp8_param=cfg.roles.teacher.fp8_weights)
    assert (t.fp8, t.fp8_recipe, t.fp8_param) == ("e4m3", "tensorwise", True)
    assert transformer_config(arch).fp8 is None


def test_discriminator_paths_are_checked_from_their_config_files_before_anything_is_built(tmp_path):
    """Issue 30's refusals: one true sentence each, from config files alone (preflight.missing_assets, which the trainer
    and --dry-run check first), whatever the recipe's purpose; and a path the run will not read is reported."""
    from transformers import Dinov2Config

    shallow = tmp_path / "dinov2-small"
    Dinov2Config(hidden_size=32, num_hidden_layers=6, num_attention_heads=2).save_pretrained(shallow)
    cfg = load_config("tiny", [f"roles.discriminator.dinov2={shallow}", "roles.discriminator.feature_layers=[2,5,8]"])
    assert missing_assets(cfg) == [
        f"roles.discriminator.dinov2={shallow} has 6 blocks, but roles.discriminator.feature_layers=[2, 5, 8] taps "
        "block 8 (0-based); use DINOv2 ViT-L/14 (24 blocks, the authors' taps) or list only blocks below 6."]
    cfg = load_config("tiny", [f"roles.discriminator.dinov2={tmp_path / 'nowhere'}"])
    assert missing_assets(cfg)[0].startswith(f"roles.discriminator.dinov2={tmp_path / 'nowhere'} is not a transformers "
                                              "DINOv2 directory")
    # FLUX.1 reads the CLIP folder (its text projection): a path that is not there is refused ...
    cfg = load_config("tiny", ["roles.discriminator.text_condition=clip_l", "model.arch.pooled_projection_dim=768",
                               f"roles.discriminator.clip={tmp_path / 'nowhere'}"])
    assert any("roles.discriminator.clip=" in m and "is not a directory" in m for m in missing_assets(cfg))
    # ... a run that does not read it says so in its banner and card, instead of passing silently
    cfg = load_config("tiny", ["model.preset=tiny-sd3", "distill.guidance_mode=cfg",
                               f"roles.discriminator.clip={tmp_path / 'nowhere'}"])
    assert notes(cfg) == [f"roles.discriminator.clip={tmp_path / 'nowhere'} is not read: the heads are conditioned on "
                           "the pooled vector (text_condition=pooled)."]
    assert not missing_assets(cfg)


def test_a_pooled_vector_that_is_not_clip_l_names_a_fix_that_exists():
    """The pooled width refusal no longer sends a training run to a stand-in that it then refuses."""
    with pytest.raises(ConfigError) as test_recipe:
        check(load_config("tiny", ["roles.discriminator.text_condition=clip_l"]))
    assert "its text encoder is not CLIP ViT-L/14" in str(test_recipe.value)
    assert "roles.discriminator.text_condition=pooled" in str(test_recipe.value)
    with pytest.raises(ConfigError) as training:
        check(load_config("flux_dev", ["model.preset=tiny-flux"]))
    msg = str(training.value)
    assert "roles.discriminator.enabled=false" in msg and "text_condition=pooled" not in msg, msg
