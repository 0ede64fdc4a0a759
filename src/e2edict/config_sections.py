"""The sections of a run config (``model``, ``data``, ``saes``, ``loss``, ``adapter``, ``train``,
``eval``, ``wandb``) as pydantic models: unknown keys rejected, each field's default and meaning in
its description, the rules within a section checked where it is read. `e2edict.config.Config`
joins them and checks the rules across sections.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from e2edict.errors import E2EDictError
from e2edict.presets import PRESETS


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)  # nan, inf: one-line error


class ModelConfig(StrictModel):
    name: str = "tiny"
    backend: Literal["transformer_lens", "huggingface"] = Field(
        "transformer_lens", description="transformer_lens: TransformerLens hook names; huggingface: module paths"
    )
    process_weights: bool = Field(False, description="TransformerLens weight processing (fold_ln, centering) for hub names")
    trust_remote_code: bool = Field(False, description="huggingface: run the model repository's own code (only if you trust it)")
    dtype: Literal["float32", "float64"] = "float32"
    device: str = "cpu"
    fused_attention: bool = Field(
        True, description="transformer_lens: attention through SDPA where nothing hooks its scores or pattern"
    )


class DataSource(StrictModel):
    """A data source with options; a plain string ``path`` is the same with the defaults."""

    path: str = Field(min_length=1, description="tiny, tiny-val, a file, a glob, a folder, or a Hugging Face dataset name")
    split: str = Field("train", description="Hugging Face datasets: the split")
    name: str | None = Field(None, description="Hugging Face datasets: the configuration name")
    column: str | None = Field(None, description="the text or token column (null: input_ids if present, else text)")
    streaming: bool = Field(False, description="read in order without loading it all (Hugging Face datasets, text files)")
    max_tokens: int | None = Field(None, gt=0, description="read no more than this many tokens")


class DataConfig(StrictModel):
    train: str | DataSource = "tiny"
    eval: str | DataSource = Field("tiny-val", description="a source, or 'holdout': the head of data.train, kept out of training")
    holdout_tokens: int | None = Field(None, gt=0, description="eval: holdout; null: max(eval.tokens, eval.alive_tokens)")
    n_ctx: int = Field(128, ge=2)
    packing: Literal["auto", "bos", "rows"] = Field(
        "auto", description="bos: BOS + n_ctx-1 tokens of the stream; rows: one row each"
    )
    shuffle_buffer: int = Field(10_000, ge=1, description="streaming sources: sequences in the seeded shuffle buffer")

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        if isinstance(v, str) and not v.strip():
            raise ValueError("must name a data source")
        return v

    def same_source(self) -> bool:
        """Whether train and eval name one source (same path, split and configuration)."""

        def key(spec: str | DataSource) -> tuple:
            s = DataSource(path=spec) if isinstance(spec, str) else spec
            p = Path(s.path).expanduser()
            return (str(p.resolve()) if p.exists() else s.path, s.split, s.name)

        if self.eval == "holdout":
            return False
        return key(self.train) == key(self.eval)


class SAEsConfig(StrictModel):
    positions: list[str] = Field(
        min_length=1, description="hook names; transcoders: 'INPUT_HOOK -> OUTPUT_HOOK' or an MLP's short name"
    )
    kind: Literal["sae", "transcoder", "skip_transcoder"] = Field(
        "sae", description="sae: reconstructs its activation; transcoder: reads one hook, writes another (an MLP's output)"
    )
    architecture: str = "relu"
    dict_ratio: float = Field(16.0, gt=0)
    init: Literal["orthogonal", "uniform", "tied"] = Field(
        "orthogonal",
        description="new SAEs' weights: orthogonal decoder (the paper's); uniform (Kaiming, nn.Linear's); "
        "tied: uniform decoder, encoder = its transpose, encoder bias 0 (sparsify's)",
    )
    b_dec_init: Literal["uniform", "zero", "mean", "geometric_median"] = Field(
        "uniform", description="new SAEs' b_dec: drawn (the paper's), zero, or the mean / geometric median of the first batch"
    )
    apply_b_dec_to_input: bool = Field(False, description="subtract b_dec from the input before encoding (SAELens's key)")
    decoder_norm: Literal["reparam", "project"] | None = Field(
        None,
        description="unit dictionary rows: normalised in the forward (the paper's), or also kept unit by projecting "
        "the gradient and renormalising after each step (sparsify's, SAELens's); null: project for loss.preset "
        "finetune, else reparam",
    )
    init_from: str | None = Field(None, description="a run directory or SAE folder to start from (warm start)")
    trainable: bool | None = Field(
        None,
        description="false: the SAEs are held fixed and only the adapter trains; null: false for loss.preset adapter, else true",
    )
    options: Any = Field(
        None,
        description="the architecture's own keys (saes.k, saes.bandwidth, ...: `SAE.options_schema`), validated "
        "into that model; written flat beside these keys or under saes.options",
    )

    @model_validator(mode="before")
    @classmethod
    def _legacy_keys(cls, raw: Any) -> Any:
        """``orthogonal_init: true|false`` (the config.yaml of earlier runs) is ``init: orthogonal|uniform``."""
        if isinstance(raw, dict) and "orthogonal_init" in raw:
            raw = dict(raw)
            legacy = raw.pop("orthogonal_init")
            if not isinstance(legacy, bool):
                raise ValueError("orthogonal_init must be true or false (it is the older spelling of init)")
            if "init" in raw and raw["init"] != ("orthogonal" if legacy else "uniform"):
                raise ValueError(f"orthogonal_init={legacy} contradicts init={raw['init']!r}; give init only")
            raw.setdefault("init", "orthogonal" if legacy else "uniform")
        return raw

    @model_validator(mode="before")
    @classmethod
    def _architecture_options(cls, raw: Any) -> Any:
        """Gather the configured architecture's own keys (flat or under ``options``) and validate
        them by its schema into ``options``. A key of another architecture is refused, not ignored,
        unless it holds that architecture's default (a config.yaml of older runs wrote them all)."""
        from e2edict.saes import registry
        from e2edict.saes.base import option_owners

        name = raw.get("architecture", "relu") if isinstance(raw, dict) else None
        arch = registry.get(name) if isinstance(name, str) else None
        if arch is None:  # not a mapping, or an architecture `_known` names
            return raw
        raw, given = dict(raw), _options_given(raw.get("options"))
        schema = arch.options_schema.model_fields
        for key in [k for k in raw if k not in cls.model_fields and (k in schema or option_owners(k))]:
            if key in given:
                raise ValueError(f"saes.{key} is given twice (flat and under saes.options)")
            given[key] = raw.pop(key)
        for key in [k for k in given if k not in schema and option_owners(k)]:
            value, owners = given.pop(key), option_owners(key)
            if any(value != registry[o].options_schema.model_fields[key].default for o in owners):
                raise ValueError(
                    f"saes.{key}={value!r} is not read by architecture {arch.architecture!r} (it is a key of {', '.join(owners)})"
                )
        clash = sorted(set(schema) & set(cls.model_fields))
        if clash:
            raise ValueError(f"architecture {arch.architecture!r} has an option {clash[0]!r} that is also a saes key")
        try:
            raw["options"] = arch.options_schema.model_validate(given)
        except ValidationError as e:  # on one line, named as the user writes the keys
            text = "; ".join(f"saes.{'.'.join(map(str, x['loc'])) or 'options'}: {x['msg']}" for x in e.errors())
            raise ValueError(f"{text} (architecture {arch.architecture!r})") from None
        return raw

    @model_serializer(mode="wrap")
    def _flat_options(self, handler: Any) -> dict[str, Any]:
        """The architecture's keys written flat beside the shared ones, as a config gives them."""
        out = handler(self)
        options = out.pop("options", None) or {}
        return {**out, **options}

    def given(self, key: str) -> bool:
        """Whether the config gave ``key`` (a shared key or one of the architecture's)."""
        return key in self.model_fields_set or key in getattr(self.options, "model_fields_set", ())

    @property
    def orthogonal_init(self) -> bool:
        return self.init == "orthogonal"

    @field_validator("positions")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("positions must not repeat a hook name")
        return v

    @field_validator("architecture")
    @classmethod
    def _known(cls, v: str) -> str:
        from e2edict.saes import registry

        if v not in registry:
            raise ValueError(f"unknown {v!r}; known: {', '.join(sorted(registry))}")
        return v

    @model_validator(mode="after")
    def _architecture_rules(self) -> SAEsConfig:
        """Each architecture checks its own keys (`e2edict.saes.base.SAE.validate_config`)."""
        from e2edict.saes import registry

        registry[self.architecture].validate_config(self)
        if self.init_from is not None:
            given = [f"{k}={getattr(self, k)!r}" for k, v in _NEW_SAE_DEFAULTS.items() if getattr(self, k) != v]
            if given:
                raise ValueError(f"{', '.join(given)} describe new SAEs; saes.init_from loads SAEs with their own weights")
        if self.kind != "sae" and (self.init == "tied" or self.apply_b_dec_to_input):
            what = "init='tied'" if self.init == "tied" else "apply_b_dec_to_input"
            raise ValueError(f"saes.{what} is for SAEs: a {self.kind}'s decoder writes another activation than it reads")
        return self


def _options_given(nested: Any) -> dict[str, Any]:
    """``saes.options`` as given: a mapping, or the validated model of a config built in code."""
    if nested is None:
        return {}
    if isinstance(nested, BaseModel):
        return nested.model_dump(exclude_unset=True)
    if not isinstance(nested, dict):
        raise ValueError(f"saes.options must be a mapping of the architecture's keys, got {type(nested).__name__}")
    return dict(nested)


# `saes` keys that only say how a new SAE starts
_NEW_SAE_DEFAULTS = {"init": "orthogonal", "b_dec_init": "uniform", "apply_b_dec_to_input": False}


class SparsityLoss(StrictModel):
    coeff: float | dict[str, float] = Field(1.0, description="lambda; one number, or a mapping hook -> lambda")
    p: float = Field(1.0, gt=0)

    @field_validator("coeff")
    @classmethod
    def _non_negative(cls, v: float | dict[str, float]) -> float | dict[str, float]:
        values = v.values() if isinstance(v, dict) else [v]
        if any(x < 0 for x in values):
            raise ValueError("must be >= 0")
        return v


class Coeff(StrictModel):
    coeff: float | None = Field(None, ge=0, description="null: taken from loss.preset")


class LocalLoss(Coeff):
    normalize: bool = Field(
        False,
        description="each SAE's MSE over its target's variance in the batch (the fraction of variance unexplained): "
        "every SAE or transcoder weighs the same however large its activation",
    )


class DownstreamLoss(Coeff):
    positions: list[str] | None = Field(None, description="null: every later residual hook")


class LossConfig(StrictModel):
    preset: Literal[tuple(PRESETS)] = "e2e"  # type: ignore[valid-type]  # the names of `e2edict.presets.PRESETS`
    sparsity: SparsityLoss = SparsityLoss()
    kl: Coeff = Coeff()
    local: LocalLoss = LocalLoss()
    downstream: DownstreamLoss = DownstreamLoss()
    transcoder_input: Literal["spliced", "clean"] = Field(
        "spliced",
        description="what each transcoder reads in the spliced run of KL or downstream training: spliced (the replacement "
        "model's own activation) or clean (the original model's, as circuit-tracer's replacement model feeds it; its local "
        "target is then the clean MLP output)",
    )
    kl_balance: bool | None = Field(
        None,
        description="scale the KL by alpha = MSE / KL each step (detached); null: on for preset finetune "
        "unless kl.coeff or local.coeff is given",
    )

    @model_validator(mode="after")
    def _fill_preset(self) -> LossConfig:
        preset = PRESETS[self.preset]
        if preset.sparsity is not None and "sparsity" not in self.model_fields_set:
            self.sparsity = SparsityLoss(coeff=preset.sparsity)  # adapter: the SAEs are held, the KL alone trains
        if self.kl_balance is None:
            self.kl_balance = preset.kl_balance and self.kl.coeff is None and self.local.coeff is None
        for term, value in preset.coefficients().items():
            block = getattr(self, term)
            if block.coeff is None:
                block.coeff = value
        if self.kl.coeff == 0 and self.local.coeff == 0 and self.downstream.coeff == 0:
            raise ValueError("every reconstruction term (kl, local, downstream) has coeff 0: nothing to train")
        if self.kl_balance and not (self.kl.coeff > 0 and self.local.coeff > 0):
            raise ValueError("kl_balance scales the KL to the MSE: it needs kl.coeff > 0 and local.coeff > 0")
        return self

    def sparsity_coeff(self, hook: str, *aliases: str) -> float:
        """Lambda of the SAE at ``hook`` (a mapping may also name it by an alias: a transcoder's position as written)."""
        c = self.sparsity.coeff
        if isinstance(c, dict):
            for name in (hook, *aliases):
                if name in c:
                    return c[name]
            raise E2EDictError(f"loss.sparsity.coeff has no lambda for SAE position {hook!r}")
        return c


class AdapterConfig(StrictModel):
    """Low-rank adapters on the model's own weights, trained with (or around) the SAEs (`docs/adapters.md`)."""

    kind: Literal["lora"] = "lora"
    rank: int = Field(8, ge=1, description="r: the rank of each update B A")
    alpha: float | None = Field(None, gt=0, description="the update is (alpha / rank) B A; null: alpha = rank")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on a LoRA's input (huggingface backend only)")
    lr: float | None = Field(None, gt=0, description="the adapter's learning rate (its own parameter group); null: train.lr")
    layers: Literal["after", "all"] | list[int] = Field(
        "after", description="after: every block after the first SAE; all; or a list of block indices"
    )
    modules: list[Literal["attn", "mlp"]] = Field(
        default_factory=lambda: ["attn", "mlp"], min_length=1, description="which weights of each block: attn, mlp, or both"
    )

    @field_validator("modules", mode="before")
    @classmethod
    def _one_name(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("modules", "layers")
    @classmethod
    def _no_repeats(cls, v: Any) -> Any:
        if isinstance(v, list) and len(set(v)) != len(v):
            raise ValueError("must not repeat an entry")
        if isinstance(v, list) and not v:
            raise ValueError("must name at least one")
        return v

    @model_validator(mode="after")
    def _alpha(self) -> AdapterConfig:
        if self.alpha is None:
            self.alpha = float(self.rank)
        return self

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class TrainConfig(StrictModel):
    tokens: int = Field(1_000_000, gt=0)
    batch_size: int = Field(8, gt=0, description="sequences per step per process")
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(1e-3, gt=0)
    optimizer: Literal["adam", "adamw", "schedulefree"] = Field(
        "adam",
        description="adam (the reference's), adamw, or schedulefree: schedule-free AdamW (schedule: constant, its default)",
    )
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam's beta1, beta2")
    weight_decay: float = Field(0.0, ge=0, description="adamw and schedulefree: decoupled weight decay")
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_tokens: int = Field(0, ge=0)
    min_lr_factor: float = Field(0.1, ge=0, le=1)
    max_grad_norm: float | None = Field(10.0, gt=0)
    log_every: int = Field(10, gt=0, description="steps")
    eval_every_tokens: int | None = Field(None, gt=0)
    checkpoint_every_tokens: int | None = Field(None, gt=0)
    keep_checkpoints: int = Field(2, ge=1, description="how many of the newest checkpoints to keep")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: the model held in bf16, SAEs computed in bf16 from fp32 master weights; KL and losses fp32"
    )
    tf32: bool = Field(True, description="allow TF32 matmuls on CUDA")
    compile: bool = Field(
        False, description="torch.compile the step's forward after the shared prefix (one graph with residual-stream positions)"
    )
    activation_checkpointing: bool = Field(
        False,
        description="keep only each frozen block's input for backward and run the block again there: the blocks "
        "after the first SAE store no activations (less memory, one more forward of them per step, the same gradients)",
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = Field(
        "default", description="torch.compile's mode under train.compile; reduce-overhead: CUDA graphs on a GPU"
    )
    reuse_cpu_memory: bool = Field(
        True, description="CPU on Linux: keep freed memory in the process (no page faults on SAE-sized tensors each step)"
    )
    dist_backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="torchrun: nccl on GPU, gloo on CPU")
    dist_timeout_s: int = Field(600, gt=0, description="torchrun: how long a collective may wait for a rank")
    memory_check: bool = Field(
        True,
        description="on a GPU: print the memory plan (e2edict plan) and refuse a run it says cannot fit, before the model loads",
    )
    shard_model: bool = Field(
        False,
        description="torchrun: split the frozen model's weights over the ranks (FSDP2): each holds 1/N of them and "
        "gathers a block's only while it runs; the SAEs stay data-parallel (docs/distributed.md)",
    )

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError("each beta must lie in [0, 1)")
        return v

    @model_validator(mode="after")
    def _optimizer_rules(self) -> TrainConfig:
        if self.optimizer == "schedulefree" and "schedule" not in self.model_fields_set:
            self.schedule = "constant"  # the one schedule it takes
        if self.optimizer == "schedulefree" and self.schedule != "constant":
            raise ValueError(
                f"optimizer=schedulefree takes no decay schedule (it averages its iterates instead); "
                f"set train.schedule: constant, not {self.schedule!r} (warmup_tokens still applies)"
            )
        if self.optimizer == "adam" and self.weight_decay > 0:
            raise ValueError("weight_decay is decoupled weight decay: use optimizer=adamw or schedulefree, not adam")
        if self.compile_mode != "default" and not self.compile:
            raise ValueError(f"compile_mode={self.compile_mode!r} applies only under train.compile: true")
        if self.shard_model and self.compile:
            raise ValueError("train.compile with train.shard_model is not supported: the gathers of a sharded model run "
                             "outside a compiled graph; use one of them")  # fmt: skip
        return self


class EvalConfig(StrictModel):
    tokens: int = Field(65_536, gt=0)
    alive_tokens: int = Field(500_000, gt=0, description="window for alive and feature density (or all the data there is)")
    batch_size: int = Field(16, gt=0)
    during_training_tokens: int = Field(16_384, gt=0, description="eval tokens for the evaluations during training")
    graph_prompts: int = Field(
        4,
        ge=0,
        description="a transcoder run: prompts whose attribution graphs give its replacement and completeness scores (0: none)",
    )
    graph_tokens: int = Field(32, ge=2, description="tokens of each graph's prompt (the first of an eval sequence, BOS first)")
    graph_max_features: int = Field(
        20_000, gt=0, description="a prompt with more active features is not graphed (the dense graph grows with their square)"
    )


class WandbConfig(StrictModel):
    project: str | None = None
    entity: str | None = None
