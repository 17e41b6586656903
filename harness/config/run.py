"""The run configuration: one typed section per concern.

Every field has its default, its unit and a typical range in the comment beside it. An experiment
file holds these sections at its top level; a study adds a `sweep:` section (harness.config.sweep),
which a single run ignores.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from harness.config.base import Strict
from harness.config.sweep import SweepSpec


class _Section(Strict):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# The sweep's `masking` axis: which tokens count in a sequence log-prob (the prompt or not) and
# how they are reduced. The one place these labels are defined.
MASKINGS: dict[str, dict[str, Any]] = {
    "masked-mean": {"dpo.mask_prompt": True, "dpo.reduction": "mean"},  # the seed notebook
    "masked-sum": {"dpo.mask_prompt": True, "dpo.reduction": "sum"},  # the DPO paper
    "full-mean": {"dpo.mask_prompt": False, "dpo.reduction": "mean"},
    "full-sum": {"dpo.mask_prompt": False, "dpo.reduction": "sum"},
}


def masking_label(mask_prompt: bool, reduction: str) -> str:
    """The MASKINGS name of a (mask_prompt, reduction) setting."""
    for name, fields in MASKINGS.items():
        if fields == {"dpo.mask_prompt": mask_prompt, "dpo.reduction": reduction}:
            return name
    raise ValueError(f"no masking label for mask_prompt={mask_prompt}, reduction={reduction!r}")


# The harness's record fields that `data.columns` may map to a file's own column names.
DATA_FIELDS = ("prompt", "chosen", "rejected", "system", "score_chosen", "score_rejected",
               "instruction", "input")


class DataConfig(_Section):
    # Where pairs come from: a file (.json/.jsonl/.parquet), a `datasets` saved directory,
    # an http(s) URL (downloaded once into cache_dir and checked against sha256), or a hub name.
    source: str = "../shared/data/instruction-data-with-preference.json"
    # Record layout: alpaca (instruction/input/chosen/rejected), prompt (prompt/chosen/rejected
    # strings), transcript (chosen/rejected whole dialogues as strings, the prompt implicit:
    # HH-RLHF), messages (chat lists, or a string prompt beside them, rendered with the
    # tokenizer's chat template), or auto. Layouts and examples: README, "Data layouts".
    format: Literal["auto", "alpaca", "prompt", "transcript", "messages"] = "auto"
    # The file's column for each harness field it names differently, e.g. {prompt: question,
    # chosen: response_j, rejected: response_k}; keys: prompt, chosen, rejected, system,
    # score_chosen, score_rejected, instruction, input. {} = the fields' own names.
    columns: dict[str, str] = Field(default_factory=dict)
    # transcript format: the text that opens an assistant turn. The prompt runs to the end of
    # the last one that chosen and rejected share; the responses follow it.
    assistant_tag: str = "\n\nAssistant:"
    sha256: str | None = None  # required for URL sources: hex digest of the downloaded file
    cache_dir: str | None = None  # where URL downloads are kept; null = <cache root>/data
    # Split of a hub dataset or a saved DatasetDict, sliced as `datasets` reads it:
    # train, train_prefs, train[:10%], train[100:200], train[:50%]+test[:50%].
    hub_split: str = "train"
    hub_config: str | None = None  # hub dataset config (subset) name; null = its default
    hub_data_dir: str | None = None  # hub dataset folder, e.g. helpful-base (HH-RLHF); null = all
    revision: str | None = None  # hub dataset revision (branch, tag or commit); null = main
    # Fractions of the records, in file order, for train/validation/test (the seed uses 85/5/10).
    split: tuple[float, float, float] = (0.85, 0.05, 0.10)
    # Given split sources instead of fractions (any of the sources above); override `split`.
    validation_source: str | None = None
    test_source: str | None = None
    # Their split (as hub_split), or, with no validation_source/test_source, another split of
    # `source` itself (e.g. test_prefs); null = hub_split. Either overrides `split`.
    validation_split: str | None = None
    test_split: str | None = None
    limit: int | None = None  # keep only the first N records of `source` before splitting
    # Keep train pairs whose score_chosen - score_rejected is at least this (score units, e.g.
    # 1..10 for UltraFeedback); null = keep all. Validation and test keep every pair, so each
    # cell of a sweep over it is evaluated on the same pairs. Drops: data/train/dropped_score_gap.
    min_score_gap: float | None = None
    max_length: int = 512  # tokens per sequence (prompt + response + eos); 64..4096
    # Pairs longer than max_length: `truncate` cuts the response tail, `drop` removes the pair.
    # Either way the count lands in summary.json.
    too_long: Literal["truncate", "drop"] = "truncate"
    add_eos: bool = True  # append the tokenizer's eos token to every response

    @field_validator("split")
    @classmethod
    def _split_sums_to_one(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(x < 0 for x in v) or abs(sum(v) - 1.0) > 1e-6 or v[0] <= 0:
            raise ValueError(f"fractions must be >= 0, train > 0, and sum to 1; got {list(v)}")
        return v

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, v: dict[str, str]) -> dict[str, str]:
        for key, column in v.items():
            if key not in DATA_FIELDS:
                raise ValueError(f"unknown field {key!r}; valid: {', '.join(DATA_FIELDS)}")
            if not column.strip():
                raise ValueError(f"{key}: the file's column name is empty")
        return v

    @field_validator("min_score_gap")
    @classmethod
    def _gap_not_negative(cls, v: float | None) -> float | None:
        if v is not None and not v >= 0:
            raise ValueError(f"must be >= 0 (a score difference; null keeps every pair), got {v}")
        return v

    @field_validator("assistant_tag")
    @classmethod
    def _tag_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must hold the text that opens an assistant turn, e.g. '\\n\\nAssistant:'")
        return v


class LoRAConfig(_Section):
    """LoRA adapters through `peft` (Hu et al. 2021): the base's weights stay frozen in
    model.dtype, and the DPO reference is the same base with the adapter disabled (no copy)."""

    r: int = 0  # adapter rank; 0 = no adapter, every weight trains; typical 8..64 (a sweep axis)
    alpha: float = 16.0  # scale: the update is (alpha / r) x B A; typical 1..2 x r
    dropout: float = 0.0  # dropout on the adapter's input; 0 keeps policy and reference exact
    # Modules that get an adapter: peft's "all-linear" (every linear layer but the LM head), or a
    # list of module names (llama: q_proj, k_proj, v_proj, o_proj, ...; gpt2: c_attn, c_proj, c_fc)
    target_modules: str | list[str] = "all-linear"
    # Also write the base with the adapter merged in (<run>/model/merged), loadable without peft.
    merge_export: bool = True

    @field_validator("r")
    @classmethod
    def _rank(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"must be >= 0 (0 = no adapter), got {v}")
        return v

    @field_validator("dropout")
    @classmethod
    def _dropout(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError(f"must be in [0, 1), got {v}")
        return v

    @property
    def enabled(self) -> bool:
        return self.r > 0


class ModelConfig(_Section):
    # A tiny model built from config by name (tiny-xs, tiny-s, tiny-m, tiny-l), a hub id,
    # a local directory holding a transformers model, or a .gguf file.
    name: str = "tiny-s"
    gguf_file: str | None = None  # file name inside `name` (a hub id or directory) for GGUF
    tokenizer: str | None = None  # tokenizer id/dir; default: the model's, or one trained here
    tokenizer_vocab_size: int = 2048  # when the harness trains a byte-level BPE; 512..50k
    trust_remote_code: bool = False  # run code shipped with a hub model; off unless asked for
    revision: str | None = None  # hub revision (branch, tag or commit)
    # Weights that never train, held in this dtype: a live reference copy and a LoRA base. auto:
    # bfloat16 where the run computes in bf16 (train.precision), else float32. 2 bytes a
    # parameter instead of 4.
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # Weights that train, with their gradients and AdamW state: float32 master copies (a bf16
    # weight loses any update below 2^-8 of itself, so a step of lr 5e-6 vanishes), or bfloat16
    # for pure bf16 training, knowingly (half the memory of the trained state).
    trainable_dtype: Literal["float32", "bfloat16"] = "float32"
    lora: LoRAConfig = Field(default_factory=LoRAConfig)  # r > 0: train adapters, not weights


class DPOConfig(_Section):
    beta: float = 0.1  # strength of the KL constraint (paper's beta); 0.01..1 (SimPO: 2..10)
    # A name in harness.dpo.LOSSES: sigmoid, robust, ipo, hinge, simpo, apo_zero, dpop, sft
    # (formulas in the README's "Losses"). ipo and simpo need reduction: mean.
    loss: str = "sigmoid"
    # Assumed share of flipped labels, for sigmoid (conservative DPO) and robust; 0..0.5
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5  # simpo: target margin γ, subtracted from β x the avg-logp margin; 0..2
    dpop_lambda: float = 50.0  # dpop: weight λ of the penalty on log π_ref(y_w) − log π(y_w); 5..500
    # RPO: each pair's loss gains this weight x the chosen response's NLL per counted token;
    # any loss; 0 = off, the RPO paper uses 1
    sft_weight: float = 0.0
    mask_prompt: bool = True  # prompt tokens do not count in a sequence log-prob
    reduction: Literal["sum", "mean"] = "mean"  # sum: the paper; mean: per response token
    # Reference log-probs: a frozen copy of the model (`model`) or computed once before
    # training and cached on disk (`cache`). Both give the same losses.
    reference: Literal["model", "cache"] = "model"
    reference_cache_dir: str | None = None  # null = <cache root>/reference

    @property
    def masking(self) -> str:
        return masking_label(self.mask_prompt, self.reduction)

    @field_validator("beta")
    @classmethod
    def _beta_positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError(f"beta must be > 0, got {v}")
        return v

    @field_validator("label_smoothing")
    @classmethod
    def _smoothing_range(cls, v: float) -> float:
        if not 0.0 <= v < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5) (a share of flipped labels; "
                             f"robust divides by 1 - 2 x label_smoothing), got {v}")
        return v

    @field_validator("simpo_gamma", "dpop_lambda", "sft_weight")
    @classmethod
    def _not_negative(cls, v: float) -> float:
        if v < 0:
            raise ValueError(f"must be >= 0, got {v}")
        return v

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, v: str) -> str:
        from harness.dpo import LOSSES  # late import: dpo imports torch

        if v not in LOSSES:
            raise ValueError(f"unknown loss {v!r}; valid: {', '.join(sorted(LOSSES))}")
        return v

    @model_validator(mode="after")
    def _loss_settings(self) -> DPOConfig:
        """A loss refuses the reduction, label smoothing and NLL term it is not defined for."""
        from harness.dpo import check_loss_settings

        check_loss_settings(self.loss, self.reduction, self.label_smoothing, self.sft_weight)
        return self


class TrainConfig(_Section):
    lr: float = 5e-6  # peak learning rate (AdamW); 1e-7..1e-3
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0  # optimizer steps of linear warmup from 0 to lr
    schedule: Literal["constant", "linear", "cosine"] = "constant"  # after warmup
    batch_size: int = 8  # pairs per micro-batch (each pair = 2 sequences)
    grad_accum: int = 1  # micro-batches per optimizer step
    epochs: float = 1.0  # passes over the train split (fractions allowed)
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    max_grad_norm: float | None = 1.0  # clip the global gradient norm; null = no clipping
    eval_every: int = 40  # examples (pairs) seen between eval passes; 0 = only at the end
    eval_batches: int | None = 5  # batches per eval pass; null = the whole split
    log_every: int = 1  # optimizer steps between train metric logs
    seed: int = 123  # one seed for data order, init and dropout
    device: str = "auto"  # auto (cuda > mps > cpu), or cpu, cuda, cuda:1, mps
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 where native (cuda; AMX/AVX512-BF16 cpu), else fp32
    num_threads: int | None = None  # torch CPU threads; null = torch's default
    save_model: bool = True  # final policy weights into the run directory (safetensors)
    drop_last: bool = True  # drop the last partial train batch of an epoch (as the seed notebook)
    test_at_end: bool = True  # evaluate the whole test split after training
    shuffle: bool = True  # reshuffle the train split every epoch (seeded)
    # Batches of pairs of similar length (sorted within chunks of 16 batches, batches shuffled):
    # less padding, different batch composition from the seed notebook's.
    group_by_length: bool = False
    # Each pair as one row, its prompt run once for both responses (harness.packing): the same
    # log-probs up to float rounding, fewer FLOPs. Applies to gpt2/llama-family models with sdpa
    # or eager attention; others always run the two rows.
    share_prompt: bool = True
    # Recompute activations in the backward pass: far less memory, about one more forward pass.
    gradient_checkpointing: bool = False
    # After training: greedy reference-vs-policy answers for the first N validation and test
    # prompts (the seed notebook shows 3 of each), into samples.json and a wandb Table.
    sample_validation: int = 0
    sample_test: int = 0
    sample_max_new_tokens: int = 128  # tokens per greedy answer
    # Examples (pairs) seen between run checkpoints in <run dir>/checkpoint (weights, optimizer,
    # RNG and data position; only the last is kept); 0 = none. Re-running a cut-off run on its
    # directory resumes from it. Each costs a write of weights + 2x their size in Adam state.
    checkpoint_every: int = 0
    keep_checkpoint: bool = False  # keep the last checkpoint after the run finishes
    # Under torchrun: ddp (each rank a whole copy) | fsdp (FSDP2: weights, gradients, AdamW
    # state sharded over the ranks; sharded checkpoints; no generation). One process: no effect.
    distributed: Literal["ddp", "fsdp"] = "ddp"

    @field_validator("batch_size", "grad_accum", "log_every")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"must be >= 1, got {v}")
        return v

    @field_validator("checkpoint_every")
    @classmethod
    def _not_negative(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"must be >= 0 (0 = no checkpoints), got {v}")
        return v


class SFTConfig(_Section):
    """Supervised fine-tuning before DPO; its checkpoint is the DPO start and the reference."""

    enabled: bool = False  # always on for task `controlled` (the paper's SFT on IMDb text)
    # Response trained on: `chosen`, or any record field (the seed's `output`); with a task,
    # the task's unlabelled texts.
    field: str = "chosen"
    steps: int = 400  # optimizer steps; 100..5000
    lr: float = 2e-3  # peak learning rate (cosine decay); tiny models 1e-3..3e-3, real 1e-5
    batch_size: int = 32  # texts per step
    warmup_steps: int = 20
    max_length: int = 256  # tokens per text
    # Init and batch order of the SFT stage; apart from train.seed, so that the seeds of a sweep
    # share one SFT checkpoint (and one pair set) and differ only in DPO.
    seed: int = 0


class TaskConfig(_Section):
    """A task with a known reward (harness/tasks): pairs come from the SFT model's own samples."""

    # none: pairs come from `data`; controlled: the synthetic review language; imdb: the DPO
    # paper's IMDb sentiment task (a hub model, IMDb reviews, a sentiment classifier as reward)
    name: Literal["none", "controlled", "imdb"] = "none"
    n_sft_texts: int = 4000  # unlabelled reviews for the SFT stage
    n_train_prompts: int = 256  # prompts whose samples become training pairs
    n_val_prompts: int = 32  # prompts whose samples become validation pairs
    n_eval_prompts: int = 64  # held-out prompts for generation metrics (gen/*)
    samples_per_prompt: int = 4  # 4 samples → 6 pairs per prompt, as the DPO paper
    # Bradley–Terry: P(y1 ≻ y2) = σ((r1 − r2)/τ). controlled: reward in [−2, 2]; imdb: reward in
    # log-odds of `positive` (about −10..10), where τ = 1 is the classifier's own probability scale
    bt_temperature: float = 0.25
    max_new_tokens: int = 48  # tokens per sampled continuation
    seed: int = 0  # generator and sampling seed
    # Task imdb only. Review texts: a hub dataset id, a `datasets` directory or a .jsonl / .json /
    # .parquet file, each record with a `text` field (a relative path reads against the cwd).
    texts: str = "stanfordnlp/imdb"
    texts_split: str = "train"  # task imdb only: split of a hub dataset or saved DatasetDict
    # Task imdb only. The reward: a two-label sentiment classifier (hub id or local directory);
    # r(x, y) = its POSITIVE logit minus its NEGATIVE logit on x + y (harness/tasks/imdb.py).
    reward_model: str = "lvwerra/distilbert-imdb"
    # Task imdb only: the classifier's positive label (a name in its id2label, or an index), when
    # id2label names none of POSITIVE / pos / LABEL_1; null = found from id2label.
    reward_label: str | None = None
    # Task imdb only: a prompt is a review's first k tokens, k uniform in [min, max] (the paper's
    # Appendix C.1: prefixes of 2 to 8 tokens).
    prompt_tokens: tuple[int, int] = (2, 8)

    @field_validator("n_sft_texts", "n_train_prompts", "samples_per_prompt", "max_new_tokens")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"must be >= 1, got {v}")
        return v

    @field_validator("n_val_prompts", "n_eval_prompts")
    @classmethod
    def _not_negative(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"must be >= 0, got {v}")
        return v

    @field_validator("bt_temperature")
    @classmethod
    def _temperature_positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError(f"must be > 0 (Bradley–Terry divides the reward gap by it), got {v}")
        return v

    @field_validator("texts", "reward_model")
    @classmethod
    def _named(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must name a hub id or a local path, got an empty string")
        return v

    @field_validator("prompt_tokens")
    @classmethod
    def _token_range(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 1 <= v[0] <= v[1]:
            raise ValueError(f"must be [min, max] tokens with 1 <= min <= max, got {list(v)}")
        return v


class GenEvalConfig(_Section):
    """Generation metrics at every eval step: gen/reward, gen/kl (± se), gen/win_rate."""

    enabled: bool | None = None  # null: on for tasks with a reward, off otherwise
    n_prompts: int = 32  # held-out prompts without a task (validation prompts)
    max_new_tokens: int = 48  # tokens per sample
    seed: int = 1234  # the same samples' randomness at every eval
    table_rows: int = 6  # prompts shown in the wandb Table of samples
    # A run whose final gen/kl exceeds this many nats is flagged `degenerate` in its summary: its
    # samples have drifted far from the reference (often while the DPO loss barely moves), and a
    # sweep reports such seed reruns apart instead of averaging them in. null: never flagged.
    kl_ceiling: float | None = 20.0
    # ... or whose final fraction of samples that parse in the task's language (gen/parsed, the
    # controlled task) falls below this: the policy has left the language. The SFT reference
    # parses ~0.94 on the controlled task, and DPO lowers it as it learns (~0.55 at 3 nats of KL
    # in one measured run): the floor flags samples that mostly stopped parsing. null: never.
    parsed_floor: float | None = 0.25


class TrackingConfig(_Section):
    project: str = "dpo-harness"  # wandb project
    entity: str | None = None  # wandb entity (team or user)
    # auto: online when logged in, offline otherwise. The WANDB_MODE env variable wins.
    wandb: Literal["auto", "online", "offline", "disabled"] = "auto"
    group: str | None = None  # wandb group (a sweep sets it to the study name)
    tags: list[str] = Field(default_factory=list)
    results_dir: str = "results"  # run directories go to results_dir/runs/<name>
    progress: bool = True  # tqdm progress bar on stderr


class RunConfig(_Section):
    name: str = "run"  # run name: the run directory and the wandb run are named after it
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    gen_eval: GenEvalConfig = Field(default_factory=GenEvalConfig)
    # A study's grid, search space and objective; read by `harness sweep`, ignored by `train`.
    sweep: SweepSpec | None = None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


