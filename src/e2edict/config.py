"""Run configuration: the whole config (`Config`: its sections in `e2edict.config_sections`, and
the rules across them), read from YAML (``yaml.safe_load`` only; dotted overrides from
`e2edict.overrides`), validated (unknown keys rejected, one-line errors), and written back with every
default and preset (`e2edict.presets`) filled in.

The resolved config (every default and preset filled in) is what a run directory records as
``config.yaml``, so a run can be repeated from it alone.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from e2edict.config_sections import (  # noqa: F401  (the sections are part of this module's interface)
    AdapterConfig,
    Coeff,
    DataConfig,
    DataSource,
    DownstreamLoss,
    EvalConfig,
    LossConfig,
    ModelConfig,
    SAEsConfig,
    SparsityLoss,
    StrictModel,
    TrainConfig,
    WandbConfig,
)
from e2edict.errors import E2EDictError
from e2edict.overrides import apply_overrides
from e2edict.presets import PRESETS, TrainDefaults

RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


class Config(StrictModel):
    name: str = "run"
    seed: int = 0
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    saes: SAEsConfig
    adapter: AdapterConfig | None = Field(None, description="LoRA adapters on the model (docs/adapters.md); null: none")
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    wandb: WandbConfig = WandbConfig()

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not RUN_NAME_RE.match(v) or v in (".", ".."):
            raise ValueError("must be 1-128 characters of letters, digits, '.', '_', '+', '-' (it names a folder)")
        return v

    @model_validator(mode="after")
    def _preset_defaults(self) -> Config:
        """What the preset (`e2edict.presets`) decides where the config is silent: the decoder-norm
        rule (finetune: unit rows by projection, Karvonen 2025) and its training defaults."""
        preset = PRESETS[self.loss.preset]
        if self.saes.decoder_norm is None:
            self.saes.decoder_norm = preset.decoder_norm
        if preset.train is not None:
            self._preset_train(preset.train)
        return self

    def _preset_train(self, preset: TrainDefaults) -> None:
        """Every `train` key the config leaves out, from the preset's `TrainDefaults`: the optimizer (AdamW where
        a decay schedule is given, which schedule-free takes none of), the rate, the optimizer's
        schedule (constant for schedule-free, else linear decay to 0), no warmup."""
        t, given = self.train, set(self.train.model_fields_set)
        if "optimizer" not in given:
            t.optimizer = "adamw" if "schedule" in given and t.schedule != "constant" else preset.optimizer
        if "lr" not in given:
            t.lr = preset.lr
        if "schedule" not in given:
            t.schedule = "constant" if t.optimizer == "schedulefree" else "linear"
        if "min_lr_factor" not in given:
            t.min_lr_factor = 0.0
        if "warmup_tokens" not in given:
            t.warmup_tokens = 0

    @model_validator(mode="after")
    def _adapter_rules(self) -> Config:
        """An adapter is reached only through the output; held SAEs need SAEs to hold and something to train."""
        s, loss = self.saes, self.loss
        if s.trainable is None:
            s.trainable = PRESETS[loss.preset].trainable
        if PRESETS[loss.preset].needs_adapter and self.adapter is None:
            raise ValueError("loss.preset adapter trains an adapter: add an adapter: block")
        if self.adapter is not None and not (loss.kl.coeff > 0 or loss.downstream.coeff > 0):
            raise ValueError("adapter: it learns through the model's output; it needs loss.kl.coeff or loss.downstream.coeff > 0")
        if not s.trainable:
            if self.adapter is None:
                raise ValueError("saes.trainable is false and there is no adapter: nothing would train")
            if s.init_from is None:
                raise ValueError("saes.trainable is false: the SAEs held fixed come from saes.init_from, which is not set")
        return self

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        coeff = self.loss.sparsity.coeff
        if isinstance(coeff, dict):
            missing = [p for p in self.saes.positions if p not in coeff]
            extra = [k for k in coeff if k not in self.saes.positions]
            if missing or extra:
                raise ValueError(
                    f"loss.sparsity.coeff mapping must name exactly saes.positions (missing {missing}, extra {extra})"
                )
        if self.loss.transcoder_input == "clean" and self.saes.kind == "sae":
            raise ValueError("loss.transcoder_input: clean is for transcoders (saes.kind: transcoder or skip_transcoder)")
        d = self.data
        if d.train == "holdout":
            raise ValueError("data.train: 'holdout' names eval data only")
        if d.eval == "holdout" and d.holdout_tokens is None:
            d.holdout_tokens = max(self.eval.tokens, self.eval.alive_tokens)
        if d.eval != "holdout" and d.holdout_tokens is not None:
            raise ValueError("data.holdout_tokens applies only with data.eval: holdout")
        if d.same_source():
            raise ValueError("data.eval is the same source as data.train: use data.eval: holdout to keep them disjoint")
        if self.train.activation_checkpointing and not (self.loss.kl.coeff > 0 or self.loss.downstream.coeff > 0):
            raise ValueError(
                "train.activation_checkpointing: no loss term reads past the SAEs (loss.kl.coeff and loss.downstream.coeff "
                "are 0), so no block after them runs with a graph: there is nothing to recompute"
            )
        ds = self.loss.downstream.positions or []
        clash = [h for h in ds if h in self.saes.positions]
        if clash:
            raise ValueError(f"loss.downstream.positions {clash} are SAE positions")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _format_validation_error(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(msg if msg.startswith(f"{loc}.") else f"{loc}: {msg}")  # a message that names its key already
    text = "invalid config: " + "; ".join(parts)
    return text.replace("\r", "\\r").replace("\n", "\\n")  # user-given key names stay on one line


def config_from_dict(raw: Any) -> Config:
    if not isinstance(raw, dict):
        raise E2EDictError(f"invalid config: the top level must be a mapping, got {type(raw).__name__}")
    # A saved, resolved config carries the preset's coefficients; keep them as given.
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise E2EDictError(_format_validation_error(e)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (``yaml.safe_load`` only), apply overrides, validate."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise E2EDictError(f"cannot read config {str(path)!r}: {e.strerror if isinstance(e, OSError) else e}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        first = str(e).replace("\n", " ")
        raise E2EDictError(f"config {str(path)!r} is not valid YAML: {first}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise E2EDictError(f"invalid config {str(path)!r}: the top level must be a mapping")
    return config_from_dict(apply_overrides(raw, overrides or []))


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (the architecture's keys flat in ``saes``, as a config gives them)."""
    raw = cfg.to_dict()
    if raw.get("adapter") is None:  # runs without an adapter keep the file they always had
        raw.pop("adapter", None)
        if raw["saes"].get("trainable") is True:
            raw["saes"].pop("trainable")
    return yaml.safe_dump(raw, sort_keys=False)
