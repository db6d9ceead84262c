"""Fine-tuning the release (README "Fine-tune the release"): configs/finetune_bagel_7b.py[:lora] hold the reference's
recipe and every shipped config's docstring commands check; a release's tokenizer becomes the run's (copied into the
workdir, so a resume and the export read it after the release is gone), a different ``data.tokenizer`` is one line;
``train.init_from`` of a run trained without LoRA into a model with LoRA loads the base and keeps fresh adapters."""

from __future__ import annotations

import ast
import os
import pathlib
import shlex
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest

import bagel_testlib as lib
from bagel_jax.config import ConfigError, validate
from bagel_jax.convert import bagel_ckpt as bc
from bagel_jax.data.builders import synthetic_shapes
from bagel_jax.data.tokenizer import train_sentencepiece
from bagel_jax.model.lora import is_lora_path
from bagel_jax.train import optim
from bagel_jax.train.release_tokenizer import keep_tokenizer, resolve_tokenizer
from configs_util import CONFIG_DIR, shipped_config
from test_readme import check_command


def test_finetune_configs_hold_the_reference_recipe():
    full, lora = shipped_config("finetune_bagel_7b"), shipped_config("finetune_bagel_7b:lora")
    for c in (full, lora):
        validate(c)
        assert c.model.max_latent_size == 64 and c.data.seq_len == 11520  # TRAIN.md's fine-tune flags
        assert (c.train.warmup_steps, c.train.ema_decay, c.train.beta2, c.train.eps) == (2000, 0.9999, 0.95, 1e-15)
        assert tuple(c.train.freeze) == () and c.data.batch_size == 8
    assert full.train.lr == 2e-5 and full.model.lora.rank == 0
    assert lora.model.lora.rank == 16 and lora.train.lr == 1e-4
    assert {k: v for k, v in lora.model.items() if k != "lora"} == {k: v for k, v in full.model.items() if k != "lora"}
    with pytest.raises(ValueError, match="unknown variant 'qlora'"):
        shipped_config("finetune_bagel_7b:qlora")


def _docstring_commands(path: pathlib.Path) -> list[list[str]]:
    """The ``python ...`` commands of a config file's docstring (continuation lines joined, comments dropped)."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    out, lines = [], doc.replace("\\\n", " ").splitlines()
    for line in lines:
        text = line.split(":", 1)[1] if line[:1].isalpha() and ":" in line.split("python")[0] else line
        text = text.strip()
        if text.startswith("python "):
            out.append(shlex.split(text, comments=True))
    return out


CONFIG_FILES = sorted(pathlib.Path(CONFIG_DIR).glob("*.py"))


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.stem for p in CONFIG_FILES])
def test_config_docstring_commands_check(path):
    """Each command a config's docstring gives passes the README checks (module, flags, config + overrides)."""
    commands = _docstring_commands(path)
    if path.stem.startswith(("finetune", "bagel_7b", "tiny")):
        assert commands, f"{path.name}: no command in its docstring"
    for argv in commands:
        assert check_command(argv) == [], (path.name, argv)


# --- the release's tokenizer ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    corpus = list(synthetic_shapes.corpus())
    same = train_sentencepiece(corpus, str(d / "a" / "tokenizer.model"), vocab_size=200).path
    other = train_sentencepiece(corpus[::-1] + ["zebra quantum"] * 3, str(d / "b" / "x.model"), vocab_size=150).path
    return same, other


def _release(tmp_path, tokenizer=None):
    d = tmp_path / "release"
    bc.write_random_checkpoint(str(d), lib.tiny_config().model, seed=3)
    if tokenizer:
        shutil.copyfile(tokenizer, d / "tokenizer.model")
    return str(d)


def _config(release, tokenizer=""):
    c = lib.tiny_config()
    c.data.update(builder="", tokenizer=tokenizer)
    c.data.sources.update(t2i="t2i", vlm="vlm_sft", edit="edit")
    c.train.init_from = release
    return c


def test_release_tokenizer_becomes_the_runs_and_survives_the_release(tmp_path, tokenizers):
    release, workdir = _release(tmp_path, tokenizers[0]), str(tmp_path / "run")
    c = _config(release)
    shipped = resolve_tokenizer(c, workdir)
    assert shipped == c.data.tokenizer == os.path.join(release, "tokenizer.model")
    assert not os.path.exists(workdir)  # resolving writes nothing
    assert resolve_tokenizer(c, workdir) == shipped  # again (the CLI's preflight, then train): same answer
    keep_tokenizer(c, workdir, shipped)
    copy = os.path.join(workdir, "tokenizer.model")
    assert c.data.tokenizer == copy and open(copy, "rb").read() == open(shipped, "rb").read()
    shutil.rmtree(release)  # a resume reads the run's own copy
    resumed = _config(release)
    assert resolve_tokenizer(resumed, workdir) is None and resumed.data.tokenizer == copy


def test_a_different_tokenizer_is_one_line(tmp_path, tokenizers):
    release = _release(tmp_path, tokenizers[0])
    c = _config(release, tokenizer=tokenizers[1])
    with pytest.raises(ConfigError) as e:
        resolve_tokenizer(c, str(tmp_path / "run"))
    msg = str(e.value)
    assert msg.startswith("data.tokenizer: ") and "\n" not in msg, msg
    assert tokenizers[1] in msg and os.path.join(release, "tokenizer.model") in msg
    same = tmp_path / "same.model"  # the same tokenizer elsewhere is fine and stays the run's
    shutil.copyfile(tokenizers[0], same)
    c = _config(release, tokenizer=str(same))
    assert resolve_tokenizer(c, str(tmp_path / "run")) is None and c.data.tokenizer == str(same)


def test_a_release_without_tokenizer_names_it(tmp_path):
    release = _release(tmp_path)
    with pytest.raises(ConfigError, match=r"^data\.tokenizer: empty, and the release folder .*release holds no"):
        resolve_tokenizer(_config(release), str(tmp_path / "run"))
    assert resolve_tokenizer(_config(release, tokenizer="/x/t.model"), str(tmp_path / "run")) is None  # given


# --- a run without LoRA into a model with LoRA -------------------------------------------------------


def _mesh_config(lora_rank=0, llm_only=False, **lora):
    c = lib.tiny_config()
    c.model.update(visual_gen=not llm_only, visual_und=not llm_only)  # llm_only: a quick compile
    c.data.batch_size = 8
    c.parallel.update(data=1, fsdp=4, tensor=2)
    c.model.lora.update(rank=lora_rank, **lora)
    return c


def _fresh(config, workdir):
    from bagel_jax.model.bagel import make_init_fn
    from bagel_jax.parallel.mesh import logical_rules, make_mesh
    from bagel_jax.train.checkpoint import Checkpointer, restore_or_init

    _, init_fn = make_init_fn(config)
    optimizer, _ = optim.make_optimizer(config.train, jax.eval_shape(init_fn, jax.random.PRNGKey(0)))
    ckpt = Checkpointer(workdir)
    try:
        mesh, rules = make_mesh(config, jax.devices()), logical_rules(config)
        return restore_or_init(ckpt, init_fn, optimizer, mesh, rules, jax.random.PRNGKey(1), config)
    finally:
        ckpt.close()


def _flat(tree):
    return {optim.param_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_base_and_fresh_adapters(params, ema, shardings, saved, config):
    params, ema, specs = _flat(params), _flat(ema), _flat(shardings)
    adapters = {p for p in params if is_lora_path(p)}
    assert set(params) == set(saved) | adapters and len(adapters) == 2 * 2 * config.model.num_layers * 5
    for p, x in params.items():
        assert x.sharding == specs[p] and ema[p].sharding == specs[p], p
        np.testing.assert_array_equal(np.asarray(ema[p]), np.asarray(x), err_msg=p)
        if p in adapters:
            assert p.endswith("lora_a") == bool(np.any(np.asarray(x))), p  # A random, B zero
        else:
            assert np.asarray(x).tobytes() == saved[p].tobytes(), p


def test_init_from_params_without_lora_into_lora(tmp_path):
    """A params tree without adapters (what the converter / an export saves) into a LoRA model on fsdp 4 × tensor 2:
    the base = the saved params bitwise, the adapters = their init (A random, B = 0), with the rules' shardings."""
    import orbax.checkpoint as ocp

    from bagel_jax.model.bagel import make_init_fn
    from bagel_jax.parallel.mesh import logical_rules, make_mesh
    from bagel_jax.train.checkpoint import load_init_params
    from bagel_jax.train.state import state_shardings

    def init(config, seed):
        _, init_fn = make_init_fn(config)
        tx, _ = optim.make_optimizer(config.train, jax.eval_shape(init_fn, jax.random.PRNGKey(0)))
        mesh, rules = make_mesh(config, jax.devices()), logical_rules(config)
        shardings = state_shardings(init_fn, tx, mesh, rules).params
        with mesh, nn.logical_axis_rules(rules):
            params = jax.jit(lambda k: nn.unbox(init_fn(k)), out_shardings=shardings)(jax.random.PRNGKey(seed))
        return params, shardings

    plain, _ = init(_mesh_config(llm_only=True), 7)
    src = str(tmp_path / "params")
    with ocp.StandardCheckpointer() as saver:
        saver.save(src, plain)
    adapted = _mesh_config(lora_rank=4, llm_only=True, targets=("q", "v", "mlp"))
    adapted.train.init_from = src
    fresh, shardings = init(adapted, 0)
    params = load_init_params(adapted, shardings, fresh)
    _check_base_and_fresh_adapters(params, params, shardings, _flat(jax.device_get(plain)), adapted)
    fresh_a = {p: x for p, x in _flat(fresh).items() if p.endswith("lora_a")}
    assert all(np.array_equal(np.asarray(_flat(params)[p]), np.asarray(x)) for p, x in fresh_a.items())


@pytest.mark.slow
def test_init_from_a_run_workdir_without_lora_into_lora(tmp_path):
    """The trainer's fresh start (``restore_or_init``) from another run's workdir trained without LoRA: params and EMA
    = the run's base bitwise plus fresh adapters, every leaf with the rules' sharding."""
    from bagel_jax.train.checkpoint import Checkpointer

    plain = _mesh_config()
    state, _, _ = _fresh(plain, str(tmp_path / "plain"))
    ckpt = Checkpointer(str(tmp_path / "plain"))
    ckpt.save(1, state)
    ckpt.close()
    adapted = _mesh_config(lora_rank=4, targets=("q", "v", "mlp"))
    adapted.train.init_from = str(tmp_path / "plain")
    new, shardings, _ = _fresh(adapted, str(tmp_path / "lora"))
    saved = _flat(jax.device_get(state.params))
    _check_base_and_fresh_adapters(new.params, new.ema_full_params(), shardings.params, saved, adapted)
