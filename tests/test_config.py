"""Config validation, presets and dotted overrides."""

import pytest
import yaml

from e2edict.config import config_from_dict, dump_config, load_config
from e2edict.errors import E2EDictError
from e2edict.overrides import apply_overrides

BASE = {"saes": {"positions": ["blocks.1.hook_resid_pre"]}}


def test_presets_fill_coefficients():
    c = config_from_dict({**BASE, "loss": {"preset": "e2e+ds"}})
    assert (c.loss.kl.coeff, c.loss.local.coeff, c.loss.downstream.coeff) == (0.5, 0.0, 2.5)
    c = config_from_dict({**BASE, "loss": {"preset": "local", "kl": {"coeff": 0.25}}})
    assert (c.loss.kl.coeff, c.loss.local.coeff) == (0.25, 1.0)


def test_per_position_lambda():
    c = config_from_dict({"saes": {"positions": ["a", "b"]}, "loss": {"sparsity": {"coeff": {"a": 1.0, "b": 2.0}}}})
    assert c.loss.sparsity_coeff("b") == 2.0
    with pytest.raises(E2EDictError, match="exactly saes.positions"):
        config_from_dict({"saes": {"positions": ["a", "b"]}, "loss": {"sparsity": {"coeff": {"a": 1.0}}}})


def test_round_trip_of_resolved_config(tmp_path):
    c = config_from_dict({**BASE, "loss": {"preset": "e2e+ds"}, "train": {"lr": 1e-4}})
    p = tmp_path / "c.yaml"
    p.write_text(dump_config(c))
    assert load_config(p) == c


def test_overrides_are_typed(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("saes:\n  positions: [blocks.1.hook_resid_pre]\n")
    c = load_config(
        p,
        [
            "train.lr=3e-4",
            "train.batch_size=4",
            "saes.positions=[blocks.0.hook_mlp_out]",
            "loss.preset=local",
            "wandb.project=null",
            "train.max_grad_norm=null",
        ],
    )
    assert c.train.lr == 3e-4 and c.train.batch_size == 4 and c.saes.positions == ["blocks.0.hook_mlp_out"]
    assert c.loss.local.coeff == 1.0 and c.train.max_grad_norm is None
    assert apply_overrides({}, ["a.b.c=1"]) == {"a": {"b": {"c": 1}}}


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ({**BASE, "bogus": 1}, "bogus: unknown key"),
        ({**BASE, "train": {"batch_sise": 4}}, "train.batch_sise: unknown key"),
        ({**BASE, "train": {"batch_size": 0}}, "train.batch_size"),
        ({"saes": {"positions": ["h"], "dict_ratio": 0}}, "saes.dict_ratio"),
        ({"saes": {"positions": ["h"], "dict_ratio": -2}}, "saes.dict_ratio"),
        ({**BASE, "loss": {"sparsity": {"coeff": -1.0}}}, "loss.sparsity.coeff"),
        ({**BASE, "loss": {"kl": {"coeff": -0.5}}}, "loss.kl.coeff"),
        ({**BASE, "loss": {"preset": "global"}}, "loss.preset"),
        ({**BASE, "train": {"lr": "fast"}}, "train.lr"),
        ({**BASE, "name": "../../etc"}, "name"),
        ({}, "saes"),
        ({"saes": {"positions": ["h", "h"]}}, "repeat"),
        ({**BASE, "loss": {"preset": "local", "local": {"coeff": 0}}}, "nothing to train"),
    ],
)
def test_bad_configs_give_one_line_errors(raw, fragment):
    with pytest.raises(E2EDictError) as e:
        config_from_dict(raw)
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(E2EDictError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("saes: [unclosed\n")
    with pytest.raises(E2EDictError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(E2EDictError, match="mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "obj.yaml").write_text("saes: !!python/object/apply:os.system [echo hi]\n")
    with pytest.raises(E2EDictError):  # safe_load refuses python tags
        load_config(tmp_path / "obj.yaml")
    with pytest.raises(E2EDictError, match="dotted.key=value"):
        load_config(_write(tmp_path), ["train.lr"])


def _write(tmp_path):
    p = tmp_path / "ok.yaml"
    p.write_text("saes:\n  positions: [h]\n")
    return p


def test_public_api_is_not_shadowed_by_submodules():
    import importlib
    import pkgutil

    import e2edict

    for mod in pkgutil.walk_packages(e2edict.__path__, "e2edict."):
        if not mod.name.endswith("__main__"):
            importlib.import_module(mod.name)
    for name in ("load_model", "load_saes", "evaluate", "train", "load_config"):
        assert callable(getattr(e2edict, name)), name


@pytest.mark.parametrize(
    "arch, key, value",
    [("relu", "k", 8), ("relu", "bandwidth", 0.01), ("topk", "threshold_momentum", 0.5), ("gated", "auxk_coeff", 0.1),
     ("jumprelu", "matryoshka_e2e", "all"), ("batchtopk", "init_threshold", 0.1)],
)  # fmt: skip
def test_a_key_the_architecture_does_not_read_is_refused_not_ignored(arch, key, value):
    """A ``saes`` key of another architecture (``k`` under ReLU, say) would change nothing: one
    line naming it and whose key it is; the architecture's own keys and every default pass, so a
    run's config.yaml (which writes every key) reads back."""
    from e2edict.saes import registry

    base = {"positions": ["blocks.1.hook_resid_pre"], "architecture": arch, **({"k": 8} if "topk" in arch else {})}
    with pytest.raises(E2EDictError, match=rf"saes.{key}=.* is not read by architecture '{arch}'") as e:
        config_from_dict({"saes": {**base, key: value}})
    assert "\n" not in str(e.value)
    owner = next(a for a, c in sorted(registry.items()) if key in c.options_schema.model_fields)
    own = {"positions": ["blocks.1.hook_resid_pre"], "architecture": owner, key: value}
    if "topk" in owner and key != "k":
        own["k"] = 8
    if owner == "matryoshka_batchtopk":
        own["matryoshka_prefixes"] = [0.5, 1.0]
    cfg = config_from_dict({"saes": own})
    assert getattr(cfg.saes.options, key) == value
    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg


def test_an_architectures_keys_are_its_schema_flat_or_under_options():
    """The architecture's keys are validated by its own schema (bounds, unknown keys) with the
    key named as written; given flat or under ``saes.options`` they are the same config, which
    config.yaml writes flat; an older config.yaml (every architecture's key at its default) reads."""
    base = {"positions": ["blocks.1.hook_resid_pre"], "architecture": "topk"}
    flat = config_from_dict({"saes": {**base, "k": 8, "auxk_coeff": 0.25}})
    nested = config_from_dict({"saes": {**base, "options": {"k": 8, "auxk_coeff": 0.25}}})
    assert flat == nested and (flat.saes.options.k, flat.saes.options.auxk_coeff) == (8, 0.25)
    dumped = yaml.safe_load(dump_config(flat))["saes"]
    assert "options" not in dumped and dumped["k"] == 8 and dumped["dead_tokens"] == 1_000_000
    older = {**base, "k": 8, "bandwidth": 0.001, "init_threshold": 0.001, "threshold_momentum": 0.99,
             "matryoshka_prefixes": None, "matryoshka_e2e": "drawn"}  # fmt: skip
    assert config_from_dict({"saes": older}).saes.options.k == 8
    cases = [
        ({"k": 0}, "invalid config: saes.k: Input should be greater than or equal to 1 (architecture 'topk')"),
        ({"k": 8, "options": {"kk": 1}}, "saes.kk: Extra inputs are not permitted (architecture 'topk')"),
        ({"k": 8, "kk": 1}, "saes.kk: unknown key"),
        ({"k": 8, "options": {"k": 8}}, "saes.k is given twice"),
        ({"k": 8, "options": [1]}, "saes.options must be a mapping"),
        ({"k": 8, "kind": "transcoder", "auxk_coeff": 0.1}, "saes.auxk_coeff: AuxK is for SAEs"),
    ]
    for extra, fragment in cases:
        with pytest.raises(E2EDictError) as e:
            config_from_dict({"saes": {**base, **extra}})
        assert fragment in str(e.value) and "\n" not in str(e.value), (extra, str(e.value))
