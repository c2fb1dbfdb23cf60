"""Run configuration: three dataclasses (data, model, training) and the command line built from them.

Every flag of `launch.py` is a field here, with its help text next to its default, so the flags, the
defaults and `results.json["config"]` can never disagree.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional

TASKS = ("sentiment", "emotion")
MODALITIES = ("text", "audio", "vision")
EMOTIONS = ("happy", "sad", "anger", "surprise", "disgust", "fear")
ROUTE_PER = ("utterance", "step")   # what a routed row is (model/granularity.py)
EVAL_BATCH_MULTIPLE = 4   # --eval_batch_size 0: evaluation batches of this many micro batches


def _help(text: str, **kw) -> Any:
    return field(metadata={"help": text}, **kw)


def default_cache_dir() -> str:
    return os.environ.get("MMOLRE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mmolre"))


@dataclass
class DataConfig:
    dataset: str = _help("'synthetic' (the embedded, generated default), 'mosi', 'mosei' or 'mmsa' (any "
                         "MMSA-schema pickle); several joined by '+' train together", default="synthetic")
    data_path: Optional[str] = _help("an MMSA pickle, a directory holding one, or a dataset `mmolre data convert` "
                                     "wrote, per non-synthetic dataset, comma-separated in --dataset's order",
                                     default=None)
    alignment: str = _help("which pickle a --data_path directory provides: 'aligned' (aligned_50.pkl) or "
                           "'unaligned' (unaligned_50.pkl)", default="aligned")
    emotion_labels: Optional[str] = _help("MOSEI emotion labels joined by (video, clip): an SDK "
                                          "CMU_MOSEI_Labels.csd or a CSV table (video_id, clip_index, happy..fear)",
                                          default=None)
    emotion_join_tolerance: float = _help("largest fraction of joined clips whose sentiment may differ between "
                                          "the pickle and --emotion_labels before the join is refused",
                                          default=0.01)
    modalities: str = _help("comma-separated modalities to use, among text,audio,vision (default: every "
                            "modality the dataset has)", default="")
    cache_dir: str = _help("where generated data and Arrow caches live (env MMOLRE_CACHE)",
                           default_factory=default_cache_dir)
    synthetic_scale: float = _help("fraction of MOSEI's split sizes the synthetic dataset has", default=0.5)
    text_max_length: int = _help("--finetune_text: transcripts are tokenized to at most this many tokens "
                                 "(longer ones are cut; the log says how many)", default=50)

    @property
    def modality_list(self) -> list[str]:
        return [m.strip() for m in self.modalities.split(",") if m.strip()]


@dataclass
class ModelConfig:
    d_model: int = _help("hidden width d of every modality", default=64)
    blocks: int = _help("UniTSE blocks L per modality", default=2)
    temporal_steps: int = _help("a modality longer than this is first pooled to this many steps (means over "
                                "equal parts of each utterance's valid steps; padding never counts); 0: never",
                                default=50)
    num_experts: int = _help("shared low-rank experts N per MoE layer (global, across ranks)", default=8)
    top_k: int = _help("shared experts each row (an utterance's and task's, or a step's with --route_per step) "
                       "is routed to", default=2)
    route_per: str = _help("what the routers route: 'utterance' (one row per utterance and task, the paper's) or "
                           "'step' (every valid time step on its own with its two neighbours, DeepSpeed's token "
                           "granularity: T times the rows, so thousands of experts each get some)",
                           default="utterance")
    expert_rank: int = _help("rank r of each shared expert's bottleneck", default=16)
    task_expert_rank: Optional[int] = _help("rank of the task-specific experts (default: --expert_rank)",
                                            default=None)
    # 0 by measurement: dropout 0.1 raised the best validation MAE in every comparison on MMSA-shaped and real
    # MOSI data, and was neutral on real MOSEI text (README, Performance: "Against MMSA's models").
    dropout: float = _help("dropout after encoders, experts and in the heads", default=0.0)
    capacity_factor: float = _help("expert capacity factor in training; 0 means no row is ever dropped. Rows "
                                   "compete for slots in a random order, so neither task is favoured",
                                   default=0.0)
    eval_capacity_factor: float = _help("expert capacity factor in evaluation; 0 (no dropping) makes each "
                                        "prediction independent of batch composition and world size",
                                        default=0.0)
    router_noise: bool = _help("Gumbel noise on the 2nd expert choice while training (top-2 only)",
                               default=False)
    balance: str = _help("how each task's router is balanced: 'aux' (the per-task load-balancing loss, weight "
                         "--aux_loss_weight), 'aux_free' (a per-task, per-expert bias on the logits for the "
                         "choice only, nudged after each step against the task's load error; no loss, no "
                         "gradient) or 'none'", default="aux")
    balance_bias_rate: float = _help("aux_free: how far each step moves an expert's selection bias (chosen "
                                     "on MOSEI's dev split: README 'Routing study')", default=1e-2)
    balance_bias_update: str = _help("aux_free: 'relative' (rate x the load error in units of the mean load: a "
                                     "route costs rate x experts / routes per step, so the push keeps pace with "
                                     "the expert count; chosen on MOSEI: README 'Routing study') or 'sign' "
                                     "(DeepSeek-V3: +/- rate below/above the task's mean load)",
                                     default="relative")
    router_temperature: float = _help("the routers' logits are divided by this before the softmax and the "
                                      "top-k choice (< 1: sharper combine weights)", default=1.0)
    grouped_experts: bool = _help("compute all local experts in one batched call on occupied slots only "
                                  "(false: DeepSpeed's per-expert loop)", default=True)
    text_encoder: Optional[str] = _help("with --finetune_text: a Hugging Face text encoder (a local directory "
                                        "offline, or a hub name) run inside the model on the tokenized transcripts "
                                        "(`raw_text`) in place of precomputed text features", default=None)
    finetune_text: bool = _help("train --text_encoder end to end with the rest of the model (its own --text_lr "
                                "and warm-up); the frozen path is `mmolre featurize`", default=False)
    # Ablations and baselines (README "Reproducing the paper's experiments").
    model: str = _help("'mmolre'; or a baseline: 'hard_sharing' (one shared encoder, two heads) or 'mmoe' "
                       "(dense shared experts mixed by per-task softmax gates, no task experts)",
                       default="mmolre")
    shared_experts: bool = _help("use the routed shared experts (false: task-specific experts only)",
                                 default=True)
    task_experts: bool = _help("use the task-specific experts (false: shared experts only)", default=True)
    routers: bool = _help("route with the task routers (false: a uniform mixture of all shared experts)",
                          default=True)
    full_rank: bool = _help("full-rank experts (rank = --d_model) instead of low-rank ones", default=False)
    fusion: str = _help("'adaptive' (task-specific attention pooling and modality weights) or 'concat' "
                        "(mean-pooled modalities concatenated)", default="adaptive")

    @property
    def rank(self) -> int:
        return self.d_model if self.full_rank else self.expert_rank

    @property
    def task_rank(self) -> int:
        return self.d_model if self.full_rank else (self.task_expert_rank or self.expert_rank)

    @property
    def dense_mixture(self) -> bool:
        """Every row visits every shared expert (no router: uniform; MMoE: softmax gates)."""
        return not self.routers or self.model == "mmoe"

    @property
    def effective_top_k(self) -> int:
        return self.num_experts if self.dense_mixture else self.top_k


@dataclass
class TrainConfig:
    ds_config: str = _help("DeepSpeed JSON config (ZeRO stage, micro batch, clipping, precision); under "
                           "`accelerate launch`, the config file of its DeepSpeed plugin",
                           default_factory=lambda: os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE",
                                                                  "ds_configs/zero2.json"))
    output_dir: str = _help("parent directory of run directories", default="runs")
    run_name: Optional[str] = _help("run directory name (default: dataset, experts, top-k and a timestamp)",
                                    default=None)
    resume: bool = _help("continue from the latest checkpoint of --run_name (or the newest run in "
                         "--output_dir)", default=False)
    reshard_only: bool = _help("with --resume: lay the latest checkpoint out for this world size and --ep_size "
                               "(weights, optimizer state, schedule), save it under its tag and exit; what "
                               "`mmolre reshard` runs", default=False)
    epochs: int = _help("training epochs", default=5)
    max_steps: int = _help("stop after this many optimizer steps in total (0: no limit); a step is one "
                           "accumulation window; a resume under another world size trains the same samples",
                           default=0)
    patience: int = _help("early stopping: end training after this many epochs without a lower validation loss "
                          "(0: train every epoch); the test uses the best epoch's checkpoint either way",
                          default=0)
    batch_size: int = _help("micro batch per rank (0: train_micro_batch_size_per_gpu of --ds_config)",
                            default=0)
    grad_accum: int = _help("micro batches accumulated per optimizer step (0: gradient_accumulation_steps of "
                            "--ds_config)", default=0)
    eval_batch_size: int = _help(f"samples per rank in each evaluation forward (0: {EVAL_BATCH_MULTIPLE} x the micro "
                                 f"batch, at most one per block and modality); a forward without gradients holds "
                                 f"about one block of one modality at a time, and fewer, larger batches mean fewer "
                                 f"expert-parallel exchanges", default=0)
    lr: float = _help("peak learning rate of AdamW", default=2e-3)
    weight_decay: float = _help("AdamW weight decay (not applied to biases and norms)", default=0.01)
    warmup_ratio: float = _help("fraction of the training samples of linear warm-up before cosine decay",
                                default=0.05)
    seed: int = _help("random seed (data order, initial weights, synthetic data is fixed separately)",
                      default=1)
    aux_loss_weight: float = _help("weight α of the per-task load-balancing losses", default=0.01)
    emotion_loss_weight: float = _help("weight λ of the emotion BCE loss", default=1.0)
    emotion_pos_weight: str = _help("'none', or 'prevalence': each emotion's present cases weigh (1 - p) / p in "
                                    "the BCE, p its train prevalence (rare emotions count as much as common ones)",
                                    default="none")
    router_z_loss: float = _help("weight of the router z-loss (ST-MoE: mean logsumexp(logits)^2 per task and "
                                 "layer; 0: off)", default=0.0)
    router_lr_scale: float = _help("the routers' learning rate is --lr times this", default=1.0)
    expert_optimizer: str = _help("how the shared experts take AdamW steps (--grouped_experts): 'dense', every expert "
                                  "every step, exactly AdamW; or 'lazy', only experts that received rows in the step "
                                  "(their moments, step counts and weight decay wait otherwise; docs/performance.md)",
                                  default="dense")
    text_lr: float = _help("--finetune_text: peak learning rate of the text encoder", default=5e-5)
    text_warmup_ratio: float = _help("--finetune_text: the text encoder's warm-up, as a fraction of the training "
                                     "samples; then its own cosine, from the end of its warm-up to 5% of --text_lr "
                                     "at the last sample", default=0.1)
    ep_size: int = _help("expert-parallel group size (0: automatic, the largest that divides the world "
                         "size and --num_experts within one node)", default=0)
    tasks: str = _help("train 'both' tasks, or a single task: 'sentiment' or 'emotion' (the other head gets no "
                       "loss)", default="both")
    log_every: int = _help("optimizer steps between TensorBoard scalars", default=10)
    save_every: int = _help("also checkpoint every this many optimizer steps (0: at epoch ends only)",
                            default=0)
    keep_checkpoints: int = _help("complete checkpoints kept besides the best one", default=2)
    on_nonfinite: str = _help("what a NaN/inf loss does: 'stop' the run, or 'skip' the step and count it",
                              default="stop")
    dist_timeout: float = _help("seconds a collective may wait for a missing rank before the run fails",
                                default=600.0)
    memory_check: bool = _help("refuse at start-up a run whose per-rank memory estimate (parameters, gradients, "
                               "optimizer, activations) exceeds the device's or the host's share", default=True)


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        return cls(DataConfig(**d["data"]), saved_model_config(d["model"]), TrainConfig(**d["train"]))


# Flags added after runs were recorded, with the value those runs behaved as: a recorded config without the key
# is read with it (not with today's default, which may differ).
BEFORE_THE_FLAG = {"model": {"temporal_steps": 0, "balance_bias_update": "sign", "route_per": "utterance"},
                   "train": {"patience": 0}}


def evaluation_batch(cfg: "RunConfig", micro_batch: int, modalities: int) -> int:
    """Samples per rank in each evaluation forward: --eval_batch_size, or EVAL_BATCH_MULTIPLE micro batches, but
    at most one per block and modality: a forward without gradients holds about one block of one modality at a
    time, where a training step keeps all of them, so the default never needs more memory than training."""
    return cfg.train.eval_batch_size or micro_batch * min(EVAL_BATCH_MULTIPLE, cfg.model.blocks * modalities)


def recorded_section(section: str, saved: dict) -> dict:
    """A recorded config section with the flags added since filled in as its run behaved."""
    return {**BEFORE_THE_FLAG.get(section, {}), **saved}


def saved_model_config(saved: dict) -> ModelConfig:
    """A run's recorded model configuration (runs from before --temporal_steps existed pooled nothing)."""
    return ModelConfig(**recorded_section("model", saved))


class ConfigError(ValueError):
    """A configuration that cannot run; raised before any process group is created."""


_SECTIONS = (("data", DataConfig), ("model", ModelConfig), ("train", TrainConfig))


_CONVERTERS = {"int": int, "float": float, "str": str, "Optional[int]": int, "Optional[str]": str}


def _str2bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch.py",
        description="Train MMoLRE (multimodal mixture of low-rank experts) with DeepSpeed MoE.",
        allow_abbrev=False,   # `--see 3` is a typo, not --seed: a run and its record must say what was asked
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for section, cls in _SECTIONS:
        group = parser.add_argument_group(section)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if f.type == "bool":
                group.add_argument(f"--{f.name}", type=_str2bool, nargs="?", const=True, default=default,
                                   help=f.metadata["help"])
                continue
            conv = _CONVERTERS[f.type]
            group.add_argument(f"--{f.name}", type=conv, default=default, help=f.metadata["help"])
    # The deepspeed launcher appends --local_rank; the rank itself comes from the environment.
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    return parser


def parse_args(argv: Optional[list[str]] = None, world_size: Optional[int] = None) -> RunConfig:
    """launch.py's flags -> a validated RunConfig. `world_size`: the world the flags are meant for, when they
    are read for another run (a benchmark's) than this process's; default: this process's WORLD_SIZE."""
    ns = vars(build_parser().parse_args(argv))
    sections = {}
    for section, cls in _SECTIONS:
        sections[section] = cls(**{f.name: ns[f.name] for f in dataclasses.fields(cls)})
    cfg = RunConfig(**sections)
    validate(cfg, world_size)
    return cfg


def validate(cfg: RunConfig, world_size: Optional[int] = None) -> None:
    """Checks that need no process group, section by section; world-size checks that need the process group
    are in distributed.choose_ep_size."""
    _validate_data(cfg.data)
    _validate_model(cfg.model)
    _validate_training(cfg.train)
    _validate_pairings(cfg)
    _validate_paths(cfg, world_size)


def _validate_data(d: DataConfig) -> None:
    unknown = [x for x in d.modality_list if x not in MODALITIES]
    if unknown:
        raise ConfigError(f"--modalities: unknown {unknown}; choose among {','.join(MODALITIES)}")
    if d.alignment not in ("aligned", "unaligned"):
        raise ConfigError(f"--alignment must be 'aligned' or 'unaligned', got {d.alignment!r}")
    if not 0.0 <= d.emotion_join_tolerance <= 1.0:
        raise ConfigError(f"--emotion_join_tolerance must be in [0, 1], got {d.emotion_join_tolerance}")
    if d.dataset == "synthetic" and not 0 < d.synthetic_scale <= 1:
        raise ConfigError(f"--synthetic_scale must be in (0, 1], got {d.synthetic_scale}")


def _validate_model(m: ModelConfig) -> None:
    if m.num_experts < 1:
        raise ConfigError(f"--num_experts must be >= 1, got {m.num_experts}")
    if not 1 <= m.top_k <= m.num_experts:
        raise ConfigError(f"--top_k {m.top_k} must be between 1 and --num_experts {m.num_experts}")
    if m.temporal_steps < 0:
        raise ConfigError(f"--temporal_steps must be >= 0 (0: no pooling), got {m.temporal_steps}")
    for name in ("d_model", "blocks", "expert_rank"):
        if getattr(m, name) < 1:
            raise ConfigError(f"--{name} must be >= 1, got {getattr(m, name)}")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"--dropout must be in [0, 1), got {m.dropout}")
    for flag in ("capacity_factor", "eval_capacity_factor"):
        if getattr(m, flag) < 0:
            raise ConfigError(f"--{flag} must be >= 0 (0 = no dropping), got {getattr(m, flag)}")
    for flag, (value, allowed) in {"--model": (m.model, ("mmolre", "hard_sharing", "mmoe")),
                                   "--fusion": (m.fusion, ("adaptive", "concat")),
                                   "--balance": (m.balance, ("aux", "aux_free", "none")),
                                   "--balance_bias_update": (m.balance_bias_update, ("sign", "relative")),
                                   "--route_per": (m.route_per, ROUTE_PER)}.items():
        if value not in allowed:
            raise ConfigError(f"{flag} must be one of {', '.join(allowed)}; got {value!r}")
    if m.model == "mmolre" and not (m.shared_experts or m.task_experts):
        raise ConfigError("--shared_experts false and --task_experts false leave UniTSE without experts")
    if m.balance_bias_rate <= 0 or m.router_temperature <= 0:
        raise ConfigError("--balance_bias_rate, --router_temperature and --router_lr_scale must be > 0, "
                          "--router_z_loss >= 0")


def _validate_training(t: TrainConfig) -> None:
    if t.epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {t.epochs}")
    if t.max_steps < 0 or t.batch_size < 0 or t.grad_accum < 0 or t.patience < 0:
        raise ConfigError("--max_steps, --batch_size, --grad_accum and --patience must be >= 0")
    if t.lr <= 0:
        raise ConfigError(f"--lr must be > 0, got {t.lr}")
    for flag, (value, allowed) in {"--tasks": (t.tasks, ("both", "sentiment", "emotion")),
                                   "--emotion_pos_weight": (t.emotion_pos_weight, ("none", "prevalence"))}.items():
        if value not in allowed:
            raise ConfigError(f"{flag} must be one of {', '.join(allowed)}; got {value!r}")
    if t.router_lr_scale <= 0 or t.router_z_loss < 0:
        raise ConfigError("--balance_bias_rate, --router_temperature and --router_lr_scale must be > 0, "
                          "--router_z_loss >= 0")
    if t.text_lr <= 0 or not 0 <= t.text_warmup_ratio <= 1:
        raise ConfigError("--text_max_length must be >= 2, --text_lr > 0 and --text_warmup_ratio in [0, 1]")
    if t.expert_optimizer not in ("dense", "lazy"):
        raise ConfigError(f"--expert_optimizer must be 'dense' or 'lazy', got {t.expert_optimizer!r}")
    if t.on_nonfinite not in ("stop", "skip"):
        raise ConfigError(f"--on_nonfinite must be 'stop' or 'skip', got {t.on_nonfinite!r}")
    if t.reshard_only and not t.resume:
        raise ConfigError("--reshard_only needs --resume (it converts the latest checkpoint of --run_name)")
    if t.eval_batch_size < 0:
        raise ConfigError(f"--eval_batch_size must be >= 0 (0: {EVAL_BATCH_MULTIPLE} x the micro batch), got "
                          f"{t.eval_batch_size}")
    if t.save_every < 0 or t.keep_checkpoints < 1 or t.dist_timeout <= 0:
        raise ConfigError("--save_every must be >= 0, --keep_checkpoints >= 1 and --dist_timeout > 0")


def _validate_pairings(cfg: RunConfig) -> None:
    """Flags that are each valid but not together."""
    m, t, d = cfg.model, cfg.train, cfg.data
    if t.ep_size < 0 or (t.ep_size and m.num_experts % t.ep_size):
        raise ConfigError(f"--num_experts {m.num_experts} is not divisible by --ep_size {t.ep_size}")
    if m.balance == "aux_free" and m.dense_mixture:
        raise ConfigError("--balance aux_free needs routed experts: with --routers false or --model mmoe every "
                          "row visits every expert, so there is no choice to bias")
    if m.balance == "aux_free" and max(m.capacity_factor, m.eval_capacity_factor) > 0 and m.top_k >= 3:
        raise ConfigError("--balance aux_free with --capacity_factor or --eval_capacity_factor > 0 and --top_k >= 3: "
                          "DeepSpeed's top-k gating "
                          "gives an over-subscribed expert's slots to the rows of highest (here: biased) probability, "
                          "and the bias is per task, so one task would be favoured; use top-1/2 or no capacity")
    if t.expert_optimizer == "lazy" and not m.grouped_experts:
        raise ConfigError("--expert_optimizer lazy steps the experts held in banks (--grouped_experts true); with "
                          "--grouped_experts false DeepSpeed's optimizer steps every expert")
    if m.router_noise and m.capacity_factor > 0:
        raise ConfigError("--router_noise with --capacity_factor > 0: the second expert is sampled inside "
                          "DeepSpeed's top-2 gating, so for a route the capacity drops the sampled choice is "
                          "unknown and the per-task aux loss could not count it; use one or the other")
    if m.finetune_text != bool(m.text_encoder):
        raise ConfigError("--finetune_text and --text_encoder go together: the encoder trains inside the model on "
                          "the transcripts. For frozen features, run `mmolre featurize` and train on its output")
    if m.finetune_text and d.modality_list and "text" not in d.modality_list:
        raise ConfigError(f"--finetune_text: --modalities {d.modalities!r} leaves out the text")
    if m.finetune_text and "synthetic" in d.dataset.split("+"):
        raise ConfigError("--finetune_text: the synthetic dataset has no transcripts to tokenize; train it on an MMSA "
                          "pickle with raw_text or on `mmolre featurize TABLE OUT.pkl --transcripts_only`")
    if d.text_max_length < 2:
        raise ConfigError("--text_max_length must be >= 2, --text_lr > 0 and --text_warmup_ratio in [0, 1]")


def _validate_paths(cfg: RunConfig, world_size: Optional[int]) -> None:
    """Paths made absolute where they are recorded, and the world this run is meant for."""
    m, t = cfg.model, cfg.train
    if m.text_encoder and os.path.isdir(m.text_encoder):   # recorded so export/predict find it from anywhere
        m.text_encoder = os.path.abspath(m.text_encoder)
    world = world_size or int(os.environ.get("WORLD_SIZE") or 1)
    if t.ep_size and world % t.ep_size:
        raise ConfigError(f"--ep_size {t.ep_size} does not divide the world size {world}")
    if not os.path.isfile(t.ds_config):
        # a relative path such as the default also resolves against the repository, from any directory
        beside_code = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), t.ds_config)
        if os.path.isabs(t.ds_config) or not os.path.isfile(beside_code):
            raise ConfigError(f"--ds_config: no such file {t.ds_config!r}")
        t.ds_config = beside_code
