"""Config validation: every class of bad config is one line naming the key, raised before anything builds."""

import importlib
import os
import pathlib

import ml_collections
import numpy as np
import pytest

from bagel_jax.config import (
    ConfigError,
    base_config,
    check_devices,
    check_paths,
    config_keys,
    unknown_key_message,
    validate,
)
from configs_util import CONFIG_DIR, shipped_config


@pytest.mark.parametrize("name", sorted(p.stem for p in pathlib.Path(CONFIG_DIR).glob("*.py")))
def test_shipped_configs_validate(name):
    validate(shipped_config(name))


def _unknown_key(c):
    c.model.hiden_size = 3  # typo


def _wrong_type(c):
    # ConfigDict refuses `c.train.lr = "fast"` itself; a section replaced whole (e.g. by a sweep) is not checked.
    section = c.train.to_dict()
    section["lr"] = "fast"
    c.train = ml_collections.ConfigDict(section)


def _budget(c):
    c.data.und_len = c.data.seq_len


def _heads(c):
    c.model.num_heads = 5


def _kv_heads(c):
    c.model.num_kv_heads = 3


def _choice(c):
    c.model.attention_impl = "flash"


def _freeze(c):
    c.train.freeze = ("vit", "decoder")


def _probability(c):
    c.data.vit_cond_dropout_prob = 1.5


def _future_context(c):
    c.data.future_context_frames = -1


def _vae_size(c):
    c.data.vae_image_size = (60, 64)


def _vit_heads(c):
    c.model.vit.num_heads = 7


def _two_fill(c):
    c.parallel.fsdp = -1


def _negative_steps(c):
    c.train.steps = -5


def _zero_interval(c):
    c.train.checkpoint_every = 0


def _zero_log_interval(c):
    c.train.log_every = 0


def _block_size(c):
    c.model.attention_block_q = 200


def _too_many_blocks(c):
    c.model.attention_block_kv = 128
    c.data.update(seq_len=128 * 2049, und_len=128 * 2049 - c.data.gen_len)


def _accumulation(c):
    c.train.grad_accum_steps = 3  # tiny's batch is 2 rows


def _beta(c):
    c.train.beta2 = 1.0


def _keep(c):
    c.train.keep_checkpoints = -1


def _question_weights(c):
    c.data.synthetic_question_weights = (1.0, -1.0, 1.0)


BAD = [
    (_unknown_key, "model.hiden_size"),
    (_wrong_type, "train.lr"),
    (_budget, "data.seq_len"),
    (_heads, "model.num_heads"),
    (_kv_heads, "model.num_kv_heads"),
    (_choice, "model.attention_impl"),
    (_freeze, "train.freeze"),
    (_probability, "data.vit_cond_dropout_prob"),
    (_future_context, "data.future_context_frames"),
    (_vae_size, "data.vae_image_size"),
    (_vit_heads, "model.vit.num_heads"),
    (_two_fill, "parallel"),
    (_negative_steps, "train.steps"),
    (_zero_interval, "train.checkpoint_every"),
    (_zero_log_interval, "train.log_every"),
    (_block_size, "model.attention_block_q"),
    (_too_many_blocks, "model.attention_block_kv"),
    (_accumulation, "train.grad_accum_steps"),
    (_beta, "train.beta2"),
    (_keep, "train.keep_checkpoints"),
    (_question_weights, "data.synthetic_question_weights"),
]


@pytest.mark.parametrize("mutate,key", BAD, ids=[k for _, k in BAD])
def test_bad_config_names_key(mutate, key):
    c = shipped_config("tiny")
    mutate(c)
    with pytest.raises(ConfigError) as e:
        validate(c)
    msg = str(e.value)
    assert msg.startswith(key + ":"), msg
    assert "\n" not in msg


def test_devices_mesh_and_batch():
    c = shipped_config("tiny")
    c.parallel.update(data=2, fsdp=2, tensor=2)
    c.data.batch_size = 4
    assert check_devices(c, 8) == (2, 2, 2, 1)
    with pytest.raises(ConfigError, match=r"^parallel: .* 8 devices, but 4 are present"):
        check_devices(c, 4)
    c.data.batch_size = 6
    with pytest.raises(ConfigError, match=r"^data.batch_size:"):
        check_devices(c, 8)
    c.parallel.update(data=-1, fsdp=1, tensor=1)
    c.data.batch_size = 8
    assert check_devices(c, 8) == (8, 1, 1, 1)


def test_missing_key_is_reported():
    c = shipped_config("tiny")
    del c.train["ema_decay"]
    with pytest.raises(ConfigError, match=r"^train.ema_decay: missing"):
        validate(c)


def test_base_config_is_release():
    c = base_config()
    assert (c.model.hidden_size, c.model.num_layers, c.model.num_heads, c.model.num_kv_heads) == (3584, 28, 28, 4)
    validate(c)


def test_release_config_row_lengths_and_v6e_plan():
    short, long = shipped_config("bagel_7b_mot"), shipped_config("bagel_7b_mot:45k")
    assert (short.data.seq_len, long.data.seq_len, long.data.und_len + long.data.gen_len) == (32768, 45056, 45056)
    assert long.data.max_vae_images == 16 and long.model.to_dict() == short.model.to_dict()
    with pytest.raises(ValueError, match="64k"):
        shipped_config("bagel_7b_mot:64k")
    v6e = shipped_config("bagel_7b_mot_v6e:45k")
    validate(v6e)
    assert (v6e.parallel.tensor, v6e.model.scan_layers, v6e.data.seq_len) == (2, True, 45056)


def test_tiny_repro_report_evals():
    """configs/tiny_repro.py:report: the README's held-out sets (GenEval 16 prompts per category × 4 images), the same
    model and data as the training config; builds its evaluators; an unknown argument names the file."""
    from bagel_jax.eval import runner

    train, report = shipped_config("tiny_repro"), shipped_config("tiny_repro:report")
    validate(report)
    assert report.model.to_dict() == train.model.to_dict() and report.data.to_dict() == train.data.to_dict()
    evaluators = runner.build_evaluators(report.evals)
    assert len(evaluators["geneval"].evaluator.samples) == 6 * 16 * 4 and not any(s.every for s in evaluators.values())
    with pytest.raises(ValueError, match="tiny_repro.py: unknown argument 'big'"):
        shipped_config("tiny_repro:big")


def test_tiny_vae_repro_trains_on_what_tiny_repro_feeds_its_vae():
    """configs/tiny_vae.py:repro: the VAE images of configs/tiny_repro.py (the same resize rule, canvas and square
    scenes), and the same VAE; a valid VAE-stage config; an unknown argument names the file."""
    from bagel_jax.train.vae_train import validate_vae_config

    vae, bagel = shipped_config("tiny_vae:repro"), shipped_config("tiny_repro")
    validate_vae_config(vae)
    for key in ("vae_transform", "vae_image_size", "synthetic_square"):
        assert tuple(np.ravel(vae.data[key])) == tuple(np.ravel(bagel.data[key])), key
    assert vae.model.vae.to_dict() == bagel.model.vae.to_dict()
    with pytest.raises(ValueError, match="tiny_vae.py: unknown argument 'big'"):
        shipped_config("tiny_vae:big")


def test_unknown_keys_name_the_nearest_valid_key():
    keys = config_keys(base_config())
    for typo, nearest in [
        ("train.lrr", "train.lr"),
        ("trainn.lr", "train.lr"),
        ("model.vit.hiden_size", "model.vit.hidden_size"),
        ("data.tokeniser", "data.tokenizer"),
        ("vae_stage.losss", "vae_stage.loss"),
        ("modle", "model"),
    ]:
        assert unknown_key_message(typo, keys) == f"{typo}: unknown config key (did you mean {nearest}?)"
    assert unknown_key_message("qqqqqq.zzzzzz", keys) == "qqqqqq.zzzzzz: unknown config key"
    c = shipped_config("tiny")
    c.train.lrr = 1.0
    with pytest.raises(ConfigError, match=r"^train\.lrr: unknown config key \(did you mean train\.lr\?\)$"):
        validate(c)


def test_attention_impl_against_the_platform():
    c = shipped_config("tiny")
    c.model.attention_impl = "tpu"
    validate(c)  # no platform given: nothing to check against
    validate(c, platform="tpu")
    with pytest.raises(ConfigError, match=r"^model\.attention_impl: 'tpu' .* cpu devices"):
        validate(c, platform="cpu")
    for impl in ("auto", "gpu", "reference"):
        c.model.attention_impl = impl
        validate(c, platform="cpu")


def test_accumulation_and_hosts_against_devices():
    c = shipped_config("tiny")
    c.data.batch_size, c.train.grad_accum_steps = 8, 4
    c.parallel.update(data=2)
    assert check_devices(c, 2) == (2, 1, 1, 1)
    c.parallel.update(data=4)
    with pytest.raises(ConfigError, match=r"^train\.grad_accum_steps: 4 microbatches × 4 batch shards"):
        check_devices(c, 4)
    c.train.grad_accum_steps = 1
    with pytest.raises(ConfigError, match=r"^data\.batch_size: 8 rows not divisible by 3 hosts"):
        check_devices(c, 4, num_processes=3)


def _shapes_dir(root):
    """The layout check_paths looks for: a built synthetic_shapes dataset and its tokenizer."""
    built = root / "synthetic_shapes" / "1.0.0"
    built.mkdir(parents=True)
    (built / "dataset_info.json").write_text("{}")
    (root / "synthetic_shapes" / "tokenizer.model").write_text("")
    return root


def test_check_paths(tmp_path):
    c = shipped_config("tiny")
    wd = tmp_path / "wd"
    with pytest.raises(ConfigError, match=r"^data\.data_dir: no built dataset 'synthetic_shapes' .*synthetic_examples"):
        check_paths(c, str(wd))
    c.data.synthetic_examples = 8  # the trainer builds data and tokenizer: nothing to find
    check_paths(c, str(wd))
    assert not wd.exists(), "checks create nothing"
    c.data.update(synthetic_examples=0, data_dir=str(_shapes_dir(tmp_path / "data")))
    check_paths(c, str(wd))
    os.remove(tmp_path / "data" / "synthetic_shapes" / "tokenizer.model")
    with pytest.raises(ConfigError, match=r"^data\.tokenizer: empty, and .*tokenizer\.model does not exist"):
        check_paths(c, str(wd))
    c.data.tokenizer = str(tmp_path / "tok.model")
    with pytest.raises(ConfigError, match=r"^data\.tokenizer: .*tok\.model: no such file"):
        check_paths(c, str(wd))
    check_paths(c, str(wd), stage="vae")  # the VAE stage reads no tokenizer
    (tmp_path / "tok.model").write_text("")
    c.data.sources.vlm = "vlm_sft"
    with pytest.raises(ConfigError, match=r"^data\.sources\.vlm: no built dataset 'vlm_sft'"):
        check_paths(c, str(wd))
    c.data.sources.vlm = ""
    c.train.init_from = str(tmp_path / "params")
    with pytest.raises(ConfigError, match=r"^train\.init_from: .*params does not exist"):
        check_paths(c, str(wd))
    (wd / "checkpoints" / "7").mkdir(parents=True)  # a resumed run never reads init_from
    check_paths(c, str(wd))
    c.model.vae.init_from = str(tmp_path / "vae_run")
    with pytest.raises(ConfigError, match=r"^model\.vae\.init_from: .*vae_run does not exist"):
        check_paths(c, str(wd))
    (tmp_path / "vae_run" / "export").mkdir(parents=True)
    (tmp_path / "vae_run" / "export" / "ae.safetensors").write_text("")
    with pytest.raises(ConfigError, match=r"^model\.vae\.init_from: no ae\.safetensors \+ vae\.json in"):
        check_paths(c, str(wd))
    (tmp_path / "vae_run" / "export" / "vae.json").write_text("{}")
    check_paths(c, str(wd))
    with pytest.raises(ConfigError, match=r"^workdir: .*tok\.model exists and is not a directory"):
        check_paths(c, str(tmp_path / "tok.model"))
    with pytest.raises(ConfigError, match=r"^workdir: cannot create .*tok\.model/wd: .*is not a directory"):
        check_paths(c, str(tmp_path / "tok.model" / "wd"))
    c.data.data_dir = "gs://bucket/data"  # remote paths are not checked from here
    check_paths(c, "gs://bucket/run")


def _attr(name, *modules):
    """``name`` from the first of ``modules`` that has it (constants that move between modules)."""
    for module in modules:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise AttributeError(f"{name} in none of {modules}")


def test_layout_constants_agree_with_the_code_that_reads_them():
    """config.py checks kernels and files without importing them; its copies of their constants must agree."""
    from bagel_jax import config
    from bagel_jax.attention import block_map, tpu_split_splash
    from bagel_jax.convert import bagel_ckpt
    from bagel_jax.data.builders import synthetic_shapes
    from bagel_jax.infer import cli as infer_cli
    from bagel_jax.train import app

    assert (config.ATTENTION_LANES, config.ATTENTION_MAX_BLOCKS) == (tpu_split_splash.LANES, block_map.MAX_BLOCKS)
    assert synthetic_shapes.tokenizer_path("d") == os.path.join("d", config.SHAPES_TOKENIZER)
    vae, vit = (
        ("bagel_jax.convert.vae_export", "bagel_jax.train.vae_train"),
        ("bagel_jax.convert.vit_export", "bagel_jax.train.vit_train"),
    )
    assert config.VAE_EXPORT_FILES == (_attr("AE_FILE", *vae), _attr("STATS_FILE", *vae))
    assert config.VIT_EXPORT_FILES == (_attr("WEIGHTS_FILE", *vit),)
    assert config.EXPORT_DIR == _attr("EXPORT_DIR", *vae) == _attr("EXPORT_DIR", *vit)
    assert app.DONE_FILES["vae"] == os.path.join(config.EXPORT_DIR, _attr("STATS_FILE", *vae))
    assert app.DONE_FILES["vit"] == os.path.join(config.EXPORT_DIR, _attr("INFO_FILE", *vit))
    assert infer_cli.LLM_CONFIG == bagel_ckpt.LLM_CONFIG
