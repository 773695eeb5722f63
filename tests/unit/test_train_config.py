"""The trainer's config layering: defaults < --preset < --config < named flags < --set (docs/design.md section 8)."""
import json

import pytest

from training.config import (
    DEFAULT_PRESET,
    TrainConfig,
    TrainConfigError,
    list_presets,
    load_toml,
    preset_path,
    resolve_config,
)
from training.losses import LossConfig


def write(tmp_path, text, name="run.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_are_the_dynamic_kl_preset():
    cfg, _ = resolve_config([])
    assert cfg.loss == LossConfig()  # the pinned dynamic-kl recipe lives in the loss module's defaults too
    assert (cfg.loss.weighting, cfg.loss.teacher_schedule, cfg.loss.teacher_gate) == ("min_snr", "cosine", "soft")
    assert (cfg.loss.teacher_lambda0, cfg.loss.teacher_cutoff) == (0.5, 0.3)
    assert DEFAULT_PRESET in list_presets()


def test_each_layer_overrides_the_one_below(tmp_path):
    # preset sets weighting=uniform, teacher none; config overrides weighting and batch size;
    # named flag overrides batch size again; --set overrides the named flag.
    cfg_file = write(tmp_path, 'batch_size = 3\nmax_steps = 7\n[loss]\nweighting = "p2"\n')
    cfg, _ = resolve_config(["--preset", "uniform", "--config", cfg_file, "--batch-size", "5",
                             "--set", "batch_size=6", "--set", "loss.min_snr_gamma=2.5"])
    assert cfg.loss.teacher_schedule == "none"  # from the preset, untouched above it
    assert cfg.loss.weighting == "p2"  # config beats preset
    assert cfg.max_steps == 7  # config beats default
    assert cfg.batch_size == 6  # --set beats named flag beats config
    assert cfg.loss.min_snr_gamma == 2.5


def test_named_flags_map_to_their_keys(tmp_path):
    cfg, _ = resolve_config(["--base-model", "b", "--llm", "l", "--data", "d", "--output-dir", "o",
                             "--max-steps", "9", "--resolution", "256", "--seed", "4", "--resume", "latest",
                             "--init-adapter", "a.safetensors", "--checkpoint-every", "3", "--concat-clip"])
    assert (cfg.model.base_model, cfg.model.llm, cfg.data.path, cfg.output_dir) == ("b", "l", "d", "o")
    assert (cfg.max_steps, cfg.data.resolution, cfg.seed, cfg.resume) == (9, 256, 4, "latest")
    assert (cfg.model.init_adapter, cfg.checkpoint_every, cfg.model.concat_clip) == ("a.safetensors", 3, True)


def test_every_preset_resolves_and_differs_from_default_only_where_it_says():
    def flat(tree, prefix=""):
        return {k: v for key, value in tree.items()
                for k, v in (flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}).items()}

    default = TrainConfig().to_dict()
    for name in list_presets():
        cfg, _ = resolve_config(["--preset", name])
        assert cfg.to_dict()["model"] == default["model"]
        changed = {k for k, v in flat(cfg.to_dict()).items() if v != flat(default)[k]}
        assert changed <= set(flat(load_toml(preset_path(name), name))), (name, changed)
    last, _ = resolve_config(["--preset", "last-layer"])
    assert last.arch.fusion == "last"
    cyc, _ = resolve_config(["--preset", "cyclical-teacher"])
    assert (cyc.loss.teacher_schedule, cyc.loss.teacher_cycles, cyc.loss.teacher_ramp_ratio) == ("cyclical", 4, 0.5)


def test_set_parses_toml_values_and_bare_strings():
    cfg, _ = resolve_config(["--set", "debug.inject_nan_at_step=[2, 3]", "--set", "validation.prompts=[\"a cat\"]",
                             "--set", "loss.weighting=kl", "--set", "ema_decay=0", "--set", "debug.stop_after_step=4"])
    assert cfg.debug.inject_nan_at_step == [2, 3]
    assert cfg.validation.prompts == ["a cat"]
    assert cfg.loss.weighting == "kl"
    assert cfg.ema_decay == 0.0 and isinstance(cfg.ema_decay, float)
    single, _ = resolve_config(["--set", "debug.inject_nan_at_step=5"])
    assert single.debug.inject_nan_at_step == [5]


@pytest.mark.parametrize("argv, needle", [
    (["--set", "loss.weigting=uniform"], "loss.weigting"),
    (["--set", "batch_size=many"], "batch_size must be an integer"),
    (["--set", "loss.weighting=quadratic"], "quadratic"),
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--set", "loss=3"], "is a section"),
    (["--set", "novalue"], "expected key=value"),
    (["--max-steps", "0"], "max_steps must be >= 1"),
])
def test_bad_values_name_the_key(argv, needle):
    with pytest.raises(TrainConfigError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        resolve_config(argv)


def test_bad_toml_and_missing_file_are_named(tmp_path):
    with pytest.raises(TrainConfigError, match="not valid TOML"):
        resolve_config(["--config", write(tmp_path, "batch_size = = 3")])
    with pytest.raises(TrainConfigError, match="no such file"):
        resolve_config(["--config", str(tmp_path / "missing.toml")])
    with pytest.raises(TrainConfigError, match="unknown config key 'data.resolutoin'"):
        resolve_config(["--config", write(tmp_path, "[data]\nresolutoin = 3\n")])


def test_the_stored_config_given_back_as_set_flags_is_the_same_config():
    """The resolved config the trainer prints and stores in every checkpoint names every key; each key with its
    stored value (as JSON, which --set reads as TOML) rebuilds that config through the command line."""
    cfg, _ = resolve_config(["--preset", "hard-gate", "--set", "lora.enabled=true", "--max-steps", "11"])

    def leaves(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    argv = [arg for key, value in leaves(cfg.to_dict()) for arg in ("--set", f"{key}={json.dumps(value)}")]
    rebuilt, _ = resolve_config(argv)
    assert rebuilt == cfg and rebuilt != TrainConfig()


def test_arch_flag_picks_the_architecture_and_leaves_the_arch_section_alone(tmp_path):
    """--arch sets model.arch; [arch] (our adapter's sizes, written into its files) keeps every key and meaning,
    and the ELLA / RouWei sizes have sections of their own."""
    cfg, _ = resolve_config(["--arch", "ella", "--set", "arch.width=96", "--set", "ella.layers=3",
                             "--set", "rouwei.target_seq_len=154"])
    assert (cfg.model.arch, cfg.arch.width, cfg.ella.layers, cfg.rouwei.target_seq_len) == ("ella", 96, 3, 154)
    assert "kind" not in cfg.to_dict()["arch"]
    cfg, _ = resolve_config(["--config", write(tmp_path, '[model]\narch = "rouwei-gemma"\nexport_format = "ours"\n')])
    assert (cfg.model.arch, cfg.model.export_format) == ("rouwei-gemma", "ours")
    cfg, _ = resolve_config([])
    assert (cfg.model.arch, cfg.model.export_format) == ("ours", "source")


@pytest.mark.parametrize("argv, needle", [
    (["--arch", "perceiver"], "model.arch (--arch) must be one of ours, ella, rouwei-gemma; got 'perceiver'"),
    (["--export-format", "diffusers"], "model.export_format (--export-format) must be source or ours"),
    (["--arch", "ella", "--init-adapter", "x.safetensors"], "cannot be combined with --init-adapter"),
    (["--arch", "rouwei-gemma", "--concat-clip"], "cannot be combined with --concat-clip"),
    (["--arch", "ella", "--set", "data.cache_llm_states=true"], "cannot be combined with data.cache_llm_states"),
    (["--set", "ella.wings=2"], "unknown config key 'ella.wings'"),
])
def test_bad_arch_settings_are_refused(argv, needle):
    with pytest.raises(TrainConfigError) as err:
        resolve_config(argv)
    assert needle in str(err.value)
