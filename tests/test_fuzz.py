"""Malformed configs and files always end in the clear error (E2EDictError), never a deep traceback."""

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from e2edict.config import config_from_dict, load_config
from e2edict.errors import E2EDictError
from e2edict.saes import ReLUSAE, load_sae, save_sae

SETTINGS = settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.floats(allow_nan=True), st.text(max_size=12))
values = st.recursive(
    scalars,
    lambda kids: st.one_of(st.lists(kids, max_size=3), st.dictionaries(st.text(max_size=10), kids, max_size=3)),
    max_leaves=8,
)
KEYS = {
    "name": values,
    "seed": values,
    "model": st.fixed_dictionaries({}, optional={"name": values, "dtype": values, "device": values, "x": values}),
    "saes": st.fixed_dictionaries({}, optional={"positions": values, "dict_ratio": values, "architecture": values, "k": values}),
    "loss": st.fixed_dictionaries({}, optional={"preset": values, "sparsity": values, "kl": values, "downstream": values}),
    "train": st.fixed_dictionaries({}, optional={"tokens": values, "batch_size": values, "lr": values, "schedule": values}),
    "data": values,
    "eval": values,
    "wandb": values,
    "bogus": values,
}
configs = st.one_of(values, st.fixed_dictionaries({}, optional=KEYS))


@SETTINGS
@given(configs)
def test_random_configs(raw):
    try:
        config_from_dict(raw)
    except E2EDictError as e:
        assert "\n" not in str(e)


@SETTINGS
@given(st.text(max_size=200))
def test_random_yaml_text(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text, encoding="utf-8")
    try:
        load_config(p)
    except E2EDictError:
        pass


@SETTINGS
@given(st.lists(st.text(max_size=20), max_size=4))
def test_random_overrides(tmp_path, overrides):
    p = tmp_path / "c.yaml"
    p.write_text("saes:\n  positions: [blocks.1.hook_resid_pre]\n")
    try:
        load_config(p, overrides)
    except E2EDictError:
        pass


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sae") / "s"
    save_sae(ReLUSAE(8, 16, "blocks.1.hook_resid_pre"), folder)
    return (folder / "sae_weights.safetensors").read_bytes(), (folder / "cfg.json").read_text()


@SETTINGS
@given(cut=st.integers(0, 10_000), flip=st.integers(0, 10_000))
def test_truncated_or_flipped_weights(tmp_path, saved, cut, flip):
    weights, cfg = saved
    data = bytearray(weights[: cut % len(weights)])
    if data and flip % 3 == 0:
        data[flip % len(data)] ^= 0xFF
    folder = tmp_path / f"s{cut}_{flip}"
    folder.mkdir()
    (folder / "sae_weights.safetensors").write_bytes(bytes(data))
    (folder / "cfg.json").write_text(cfg)
    with pytest.raises(E2EDictError):
        load_sae(folder)


@SETTINGS
@given(
    st.dictionaries(
        st.sampled_from(["architecture", "d_in", "d_sae", "metadata", "normalize_activations", "apply_b_dec_to_input"]),
        values,
        max_size=6,
    )
)
def test_random_cfg_json(tmp_path, saved, changes):
    weights, cfg = saved
    doc = {**json.loads(cfg), **changes}
    folder = tmp_path / "s"
    folder.mkdir(exist_ok=True)
    (folder / "sae_weights.safetensors").write_bytes(weights)
    (folder / "cfg.json").write_text(json.dumps(doc))
    try:
        sae = load_sae(folder)
    except E2EDictError:
        return
    assert sae(torch.zeros(1, sae.d_in))[0].shape == (1, sae.d_in)


def test_sae_width_must_match_the_model(tmp_path, small_backbone):
    saes = {"blocks.1.hook_resid_pre": ReLUSAE(16, 32, "blocks.1.hook_resid_pre")}
    with pytest.raises(E2EDictError, match="d_in=16 but model"):
        small_backbone.check_saes(saes)
    with pytest.raises(E2EDictError, match="unknown hook name"):
        small_backbone.check_saes({"blocks.7.hook_nothing": ReLUSAE(32, 32)})


def test_boolean_sizes_are_rejected(tmp_path, saved):
    weights, cfg = saved
    doc = {**json.loads(cfg), "d_in": True}
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "sae_weights.safetensors").write_bytes(weights)
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(doc))
    with pytest.raises(E2EDictError, match="d_in must be a positive integer"):
        load_sae(tmp_path / "s")


def test_huge_sizes_in_cfg_fail_before_allocating(tmp_path, saved):
    weights, cfg = saved
    doc = {**json.loads(cfg), "d_in": 10**6, "d_sae": 10**6}
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "sae_weights.safetensors").write_bytes(weights)
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(doc))
    with pytest.raises(E2EDictError, match="W_dec"):
        load_sae(tmp_path / "s")
