"""Config validation: every class of bad config is one line naming the key, raised before anything builds."""
import pathlib

import ml_collections
import pytest

from bagel_jax.config import ConfigError, base_config, check_devices, validate
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


def _vae_size(c):
    c.data.vae_image_size = (60, 64)


def _vit_heads(c):
    c.model.vit.num_heads = 7


def _two_fill(c):
    c.parallel.fsdp = -1


BAD = [
    (_unknown_key, "model.hiden_size"),
    (_wrong_type, "train.lr"),
    (_budget, "data.seq_len"),
    (_heads, "model.num_heads"),
    (_kv_heads, "model.num_kv_heads"),
    (_choice, "model.attention_impl"),
    (_freeze, "train.freeze"),
    (_probability, "data.vit_cond_dropout_prob"),
    (_vae_size, "data.vae_image_size"),
    (_vit_heads, "model.vit.num_heads"),
    (_two_fill, "parallel"),
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
    assert len(evaluators["geneval"].evaluator.samples) == 6 * 16 * 4 and not any(
        s.every for s in evaluators.values())
    with pytest.raises(ValueError, match="tiny_repro.py: unknown argument 'big'"):
        shipped_config("tiny_repro:big")
