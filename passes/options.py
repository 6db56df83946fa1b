"""The options of every built-in pass, and the declaration that makes each known to recipes by name.

Torch-free, so ``bertpress validate`` and ``bertpress schema`` check a recipe without importing torch or any
pass's code: each pass module (``passes/<name>.py``) takes its name, Config and ordering from its declaration
here (``declaration = QUANTIZE_LINEAR``), and is imported only when a compile runs it. A field's description is
its documentation: ``bertpress schema`` prints it and docs/recipes.md is generated from it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from compiler.pass_config import PassConfig, PassDeclaration, PerLayerKeepConfig
from compiler.pass_registry import declare

EXCLUDABLE = ("embeddings", "attention", "ffn", "pooler")
INT4_DEFAULTS = {"block_size": 32, "method": "gptq", "symmetric": False, "clip_search": True, "compute": "int8",
                 "calibration_batches": 8, "damp": 0.01}
TABLES = ("word", "position", "token_type")


# quantize-linear

class QuantizeLinearConfig(PassConfig):
    dtype: Literal["int8", "int4", "fp16"] = Field(
        "int8", description="int8: per-channel weights + dynamic activations (CPU, fast). int4: block-wise 4-bit "
                            "weights (ONNX Runtime MatMulNBits; for size, about fp32 speed on x86). fp16: half precision (GPU targets).")
    # int4 options: None unless dtype is int4 (then the defaults in INT4_DEFAULTS fill in); giving one
    # with another dtype is an error rather than silently ignored.
    block_size: Literal[16, 32, 64, 128] | None = Field(None, description="int4 (default 32): inputs per scale; smaller is more faithful and larger.")
    method: Literal["gptq", "rtn"] | None = Field(None, description="int4 (default gptq): GPTQ rounding on calibration text, or round-to-nearest.")
    symmetric: bool | None = Field(None, description="int4 (default false): symmetric blocks (zero point 8); false adds a 4-bit "
                                   "zero point per block (an eighth of a byte per weight at block 32), more faithful on skewed blocks.")
    clip_search: bool | None = Field(None, description="int4 (default true): per block, try shrinking the range (1.0 to 0.75) "
                                     "and keep the least rounding error.")
    compute: Literal["int8", "fp32"] | None = Field(
        None, description="int4 (default int8): ONNX Runtime multiplies with int8 activations per block (accuracy level 4) or fp32 (exact).")
    calibration_batches: int | None = Field(None, ge=1, description="int4 + gptq (default 8): calibration batches for the input Hessians.")
    damp: float | None = Field(None, gt=0, le=1, description="int4 + gptq (default 0.01): Hessian dampening, a fraction of its mean diagonal.")
    exclude: list[str | int] = Field(
        default_factory=lambda: ["embeddings"],
        description=f"Parts kept in full precision: any of {list(EXCLUDABLE)} or layer indices.",
    )
    fallback: Literal["auto"] | None = Field(
        None, description="int8 only. auto: rank the linears by what quantizing each alone costs (the budget's metric on"
        " a few calibration batches, against the reference), then keep in fp32, costliest first, the fewest that bring"
        " the whole model back within the budget; the report lists them. Unset: every chosen linear is quantized.")

    @model_validator(mode="after")
    def _fallback_int8(self):
        if self.fallback is not None and self.dtype != "int8":
            raise ValueError(f"fallback applies to dtype int8 only, and this step has dtype {self.dtype}")
        return self

    @model_validator(mode="after")
    def _int4_options(self):
        given = [name for name in INT4_DEFAULTS if getattr(self, name) is not None]
        if self.dtype != "int4" and given:
            raise ValueError(f"{given[0]} applies to dtype int4 only, and this step has dtype {self.dtype}; "
                             "remove it or set dtype: int4")
        if self.dtype == "int4":
            for name, value in INT4_DEFAULTS.items():
                if getattr(self, name) is None:
                    object.__setattr__(self, name, value)  # frozen config: fill the defaults once, here
        return self

    @model_serializer(mode="wrap")
    def _without_unused_int4_options(self, handler):
        return {key: value for key, value in handler(self).items()
                if not ((key in INT4_DEFAULTS or key == "fallback") and value is None)}

    @field_validator("exclude")
    @classmethod
    def _known_parts(cls, value):
        for item in value:
            if isinstance(item, str) and item not in EXCLUDABLE:
                raise ValueError(f"unknown part {item!r}; use one of {list(EXCLUDABLE)} or a layer index")
            if isinstance(item, int) and item < 0:
                raise ValueError("layer indices are >= 0")
        return value


# quantize-embeddings

class QuantizeEmbeddingsConfig(PassConfig):
    dtype: Literal["fp16", "int8", "int4"] = Field(
        "fp16", description="fp16: half precision (safe default). int8: symmetric int8 with an fp32 scale per row "
                            "(opt-in). int4: symmetric 4-bit with a float16 scale per block_size columns (opt-in, for size).")
    tables: list[Literal["word", "position", "token_type"]] = Field(
        default_factory=lambda: list(TABLES), min_length=1, description="Which embedding tables to store in dtype.")
    block_size: Literal[16, 32, 64, 128] | None = Field(
        None, description="int4 only (default 32): columns of a row that share one scale; the table's width must be a "
                          "multiple of it.")

    @model_validator(mode="after")
    def _block_size_is_int4_only(self):
        if self.block_size is not None and self.dtype != "int4":
            raise ValueError(f"block_size applies to dtype int4 only, and this step has dtype {self.dtype}; "
                             "remove it or set dtype: int4")
        if self.dtype == "int4" and self.block_size is None:
            object.__setattr__(self, "block_size", 32)  # frozen config: fill the default once, here
        return self

    @model_serializer(mode="wrap")
    def _without_an_unused_block_size(self, handler):
        return {key: value for key, value in handler(self).items() if not (key == "block_size" and value is None)}


# prune-heads

class PruneHeadsConfig(PerLayerKeepConfig):
    keep: int | list[int] | None = Field(
        None, description="Heads kept per layer: one number for every layer, or a list with one entry per layer.")
    keep_fraction: float | None = Field(
        None, gt=0.0, le=1.0, description="Share of all heads kept, ranked globally across layers (with min_per_layer).")
    min_per_layer: int = Field(1, ge=1, description="Floor of heads kept in any layer when keep_fraction ranks globally.")
    importance: Literal["l1", "gradient", "entropy"] = Field(
        "gradient", description="l1: weight norm; gradient: fidelity-loss sensitivity to a head mask (Michel et al."
        " 2019) on calibration text; entropy: attention entropy on calibration text (diffuse heads go first).")
    compensate_bias: bool = Field(
        False, description="Fold each removed head's mean calibration output into the output projection's bias"
        " (off by default: it can lower fidelity on text of another domain than the calibration's).")
    reconstruct: bool = Field(
        False, description="Refit the attention output projection (weights and bias) by least squares on calibration"
        " activations so the kept heads reproduce the full layer's output as closely as they can. It fits the"
        " calibration domain (better on text like the calibration's, much worse on other domains): use it only with"
        " in-domain calibration text.")
    calibration_batches: int = Field(4, ge=1, le=64, description="Calibration batches used for scores and compensation.")


# prune-ffn

class PruneFfnConfig(PerLayerKeepConfig):
    keep: int | list[int] | None = Field(
        None, description="Neurons kept per layer: one number for every layer, or a list with one entry per layer.")
    keep_fraction: float | None = Field(None, gt=0.0, le=1.0, description="Share of each layer's neurons kept.")
    importance: Literal["l1", "activation"] = Field(
        "activation", description="l1: up-row + down-column weight norm; activation: mean |activation| on"
        " calibration text times the down column's norm.")
    compensate_bias: bool = Field(
        False, description="Fold each removed neuron's mean calibration output into the down projection's bias"
        " (helps with activation importance, hurts with l1).")
    reconstruct: bool = Field(
        False, description="Refit the down projection (weights and bias) by least squares on calibration activations so"
        " the kept neurons reproduce the full layer's output as closely as they can (replaces compensate_bias).")
    calibration_batches: int = Field(4, ge=1, le=64, description="Calibration batches used for scores and compensation.")


# layer-drop

class LayerDropConfig(PassConfig):
    layers: list[int] | None = Field(None, min_length=1, description="Indices of the blocks to remove (0 = lowest).")
    keep_every: int | None = Field(None, ge=2, description="Keep every k-th block counted from the top (2 keeps 1, 3, 5 of 0-5).")
    top: int | None = Field(None, ge=1, description="Remove the n topmost blocks.")
    count: int | None = Field(None, ge=1, description="Remove the n blocks whose removal costs least fidelity on calibration text (greedy).")

    @model_validator(mode="after")
    def _one_strategy(self):
        chosen = [name for name in ("layers", "keep_every", "top", "count") if getattr(self, name) is not None]
        if len(chosen) != 1:
            raise ValueError("give exactly one of layers, keep_every, top or count")
        if self.layers is not None:
            if any(i < 0 for i in self.layers):
                raise ValueError("layer indices are >= 0")
            if len(set(self.layers)) != len(self.layers):
                raise ValueError("layer indices must be unique")
        return self


# share-layers

class ShareLayersConfig(PassConfig):
    groups: list[list[int]] = Field(..., min_length=1,
                                    description="Groups of layer indices; each group shares one set of weights.")
    strategy: Literal["first", "mean"] = Field("first", description="first: the group's first layer's weights; mean: their average.")

    @field_validator("groups")
    @classmethod
    def _disjoint(cls, groups):
        flat = [i for group in groups for i in group]
        if any(len(group) < 2 for group in groups):
            raise ValueError("each group lists at least two layers")
        if any(i < 0 for i in flat) or len(set(flat)) != len(flat):
            raise ValueError("layer indices are >= 0 and appear in one group at most once")
        return groups


# low-rank

class LowRankConfig(PassConfig):
    rank: int | None = Field(None, ge=1, description="Rank kept in every targeted weight.")
    rank_fraction: float | None = Field(None, gt=0.0, le=1.0, description="Rank kept as a share of min(m, n).")
    energy: float | None = Field(None, gt=0.0, le=1.0,
                                 description="Smallest rank keeping this share of the squared singular values.")
    target: Literal["ffn", "attention", "all", "embeddings"] | list[str] = Field(
        "ffn", description="ffn, attention (q/k/v/output), all linears, embeddings (ALBERT word-table factorization),"
        " or an explicit list of weight names (get_attr targets, e.g. encoder.layer.0.output.dense.weight).")
    force: bool = Field(False, description="Apply a rank at or above the break-even r*(m+n) >= m*n anyway.")
    reason: str | None = Field(None, description="Why force is needed (required with force: true).")

    @model_validator(mode="after")
    def _one_rank(self):
        if sum(x is not None for x in (self.rank, self.rank_fraction, self.energy)) != 1:
            raise ValueError("give exactly one of rank, rank_fraction or energy")
        if self.force and not (self.reason or "").strip():
            raise ValueError("force: true needs a reason (it makes the layer larger and slower than before)")
        return self


# decouple-attention

class DecoupleAttentionConfig(PassConfig):
    layers: int | list[int] = Field(
        ..., description="How many of the lowest layers attend only within their segment (k), or their explicit"
        " indices, which must be 0..k-1 (only a lowest block can be cached and split off).")
    second_segment_position: int = Field(
        0, ge=0, le=4096, description="Position id of the first token of every segment after the first one in the"
        " decoupled layers (0 = restart at 0). Any constant keeps cached segment states independent of the first"
        " segment's length.")
    pair_texts: str = Field("builtin:wordnet-pairs", description="Two-segment corpus the pair fidelity in the"
                            " report is measured on (builtin:wordnet-pairs, builtin:python-docs-pairs).")
    pair_samples: int = Field(64, ge=0, le=10_000, description="How many pairs to measure (0: skip the measurement).")
    pair_max_length: int = Field(128, ge=8, le=512, description="Tokens per pair (longer pairs are truncated).")

    @field_validator("layers")
    @classmethod
    def _lowest_block(cls, value):
        if isinstance(value, list) and sorted(value) != list(range(len(value))):
            raise ValueError(f"decoupled layers must be the lowest ones, 0..k-1 without gaps; got {value}")
        if isinstance(value, int) and value < 0:
            raise ValueError("layers is a count >= 0")
        return value

    @property
    def count(self) -> int:
        return self.layers if isinstance(self.layers, int) else len(self.layers)


# prune-vocab

class PruneVocabConfig(PassConfig):
    texts: str | list[str] | None = Field(
        None, description="Domain corpus whose tokens are kept: builtin, builtin:wordnet, a .txt/.jsonl file or folder"
        " (relative to the recipe), or a list of such sources (all their texts, pooled). Default: the recipe's"
        " calibration texts. Held-out validation texts are always left out.")
    samples: int | None = Field(None, ge=1, description="Use at most this many texts of the corpus (seeded sample); default all.")
    min_count: int = Field(1, ge=1, description="Keep a corpus token only if it occurs at least this often.")
    keep_top: int = Field(0, ge=0, description="Also keep the N tokens most frequent in frequency_texts (common words the"
                          " domain corpus happened to miss); a few thousand recover most of the fidelity a small corpus loses.")
    frequency_texts: str = Field("builtin:wordnet", description="General corpus that ranks tokens for keep_top.")
    keep_characters: bool = Field(
        False, description="Also keep every single-character token and its '##' continuation, so an unseen word is"
        " spelled out in pieces instead of becoming [UNK].")
    keep_latin: bool = Field(
        False, description="Also keep every token written in the Latin alphabet, digits and punctuation (code points"
        " below U+0250), so only other scripts and the [unusedN] placeholders are dropped: English pieces the corpus"
        " happened to miss stay (on MiniLM, 27,734 of 30,522 rows).")


# prune-weights

class PruneWeightsConfig(PassConfig):
    sparsity: float = Field(..., ge=0.0, lt=1.0, description="Share of the targeted weights set to zero.")
    scope: Literal["global", "per_weight"] = Field(
        "global", description="global: one magnitude threshold across all targeted weights; per_weight: each weight"
        " matrix reaches the sparsity on its own.")
    target: Literal["ffn", "attention", "all"] = Field("all", description="Which linears: FFN, attention, or all (incl. pooler).")


# distill

class LossWeights(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    output: float = Field(1.0, ge=0.0, description="Weight of the pooled-embedding loss (see output_loss).")
    hidden: float = Field(1.0, ge=0.0, description="Weight of the per-layer hidden-state MSE (layer outputs, mapped by layer_map).")
    attention: float = Field(1.0, ge=0.0, description="Weight of the attention-distribution KL (teacher || student), mapped by layer_map.")
    logits: float = Field(1.0, ge=0.0, description="Task models only (a classifier, tagger, QA or reranker head): weight of"
                          " the head's output loss, temperature-scaled KL of the label distributions (MSE of a num_labels-1"
                          " score). Trains on unlabeled text: the teacher's logits are the targets.")
    similarity: float = Field(0.0, ge=0.0, description="Weight of the in-batch similarity loss: MSE between the teacher's and the"
                              " student's matrices of pairwise cosines of the pooled embeddings (relational KD, Park et al."
                              " 2019). It trains what nearest-neighbour search reads: which texts are close to which.")

    @model_validator(mode="after")
    def _something_to_learn(self):
        if not any(self.model_dump().values()):
            raise ValueError("every loss weight is 0, so distillation has nothing to train on; give at least one of"
                             f" {', '.join(type(self).model_fields)} a weight above 0")
        return self


class DistillConfig(PassConfig):
    steps: int = Field(300, ge=1, le=1_000_000, description="Optimizer steps.")
    batch_size: int = Field(16, ge=1, le=1024, description="Texts per step.")
    max_length: int = Field(64, ge=8, le=4096, description="Tokens per training text (longer ones are truncated).")
    lr: float = Field(5e-4, gt=0.0, le=1.0, description="Peak learning rate of AdamW.")
    schedule: Literal["linear", "cosine", "constant"] = Field("linear", description="Decay after warmup (to 0 for linear/cosine).")
    warmup: float = Field(0.1, ge=0.0, lt=1.0, description="Fraction of steps with linear warmup from 0 to lr.")
    weight_decay: float = Field(0.01, ge=0.0, le=1.0, description="AdamW weight decay on weight matrices (not biases or norms).")
    clip: float = Field(1.0, gt=0.0, description="Gradient-norm clipping.")
    seed: int | None = Field(None, ge=0, description="Seed of text sampling and shuffling (default: the calibration seed).")
    train: Literal["all", "no-embeddings"] = Field("all", description="Which parameters train; no-embeddings freezes the lookup tables and their layer norm.")
    losses: LossWeights = Field(LossWeights(), description="Weights of the output, hidden-state, attention and similarity losses.")
    output_loss: Literal["cosine", "mse"] = Field("cosine", description="Pooled-embedding loss: 1 - cosine, or MSE.")
    temperature: float = Field(1.0, gt=0.0, le=100.0, description="Softmax temperature of the logits loss (task models).")
    pooling: Literal["mean", "cls"] = Field("mean", description="How the sentence embedding is pooled (match the model's sentence-transformers config).")
    layer_map: Literal["uniform", "kept"] | list[int] = Field(
        "uniform",
        description="Teacher layer each student layer is compared with: 'uniform' (student j -> teacher floor((j+1)T/S)-1),"
        " 'kept' (the layer it was kept from when blocks were dropped) or explicit teacher indices, one per student layer.",
    )
    texts: str | list[str] | None = Field(
        None, description="Training text sources (each as calibration.texts: builtin, builtin:wordnet, a .txt/.jsonl file or"
        " folder; a list mixes them); default: the calibration texts. Held-out validation texts are always removed.")
    samples: int = Field(20_000, ge=8, le=10_000_000, description="How many texts to sample (seeded) from `texts`. When it"
                         " lists several sources and no `weights`, each gives up to samples / (number of sources) texts,"
                         " all of a smaller one (the report's source_texts says how many each gave).")
    weights: list[float] | None = Field(
        None, description="One weight per source in `texts` (a list): the share of the `samples` texts each gives, so"
        " source i gives round(samples * weights[i] / sum(weights)) texts; a source with fewer distinct texts than that"
        " repeats them (whole copies, then a seeded sample), so a small corpus can carry a large share of the training.")
    pack: bool = Field(False, description="Join consecutive short texts into sequences of about max_length tokens.")
    bucket: bool = Field(False, description="Batch texts of similar length together, so batches carry little padding"
                         " (more steps per hour on short texts, see bench/distill_throughput.py; same texts per epoch). Excludes pack.")
    qat: bool = Field(False, description="Train with int8-simulated linears (straight-through), for a quantize-linear that comes after distill.")
    monitor_every: int = Field(50, ge=1, description="Steps between fidelity measurements on a monitor slice of the training texts.")
    compile: bool = Field(False, description="Run the student's and the teacher's forward and backward through torch.compile"
                          " (Inductor, dynamic shapes; needs a C++ compiler): about 1.3x more steps per hour on a long run"
                          " (bench/distill_throughput.py --compare compile), after a compile of about a minute at the first steps.")

    @model_validator(mode="after")
    def _pack_or_bucket(self):
        if self.pack and self.bucket:
            raise ValueError("pack and bucket exclude each other: packed sequences all have about max_length tokens;"
                             " set one of them to false")
        return self

    @model_validator(mode="after")
    def _weights_match_texts(self):
        if self.weights is None:
            return self
        if not isinstance(self.texts, list):
            raise ValueError("weights needs texts to be a list of sources (one weight per source); give texts as a list"
                             " or remove weights")
        if len(self.weights) != len(self.texts):
            raise ValueError(f"weights has {len(self.weights)} entries but texts lists {len(self.texts)} sources; give"
                             " one weight per source, in the same order")
        if any(not 0 < w < float("inf") for w in self.weights):  # also refuses nan
            raise ValueError("every weight must be a finite number above 0 (leave a source out of texts instead of"
                             " weighting it 0)")
        return self

    @field_validator("layer_map")
    @classmethod
    def _indices(cls, value):
        if isinstance(value, list) and any(i < 0 for i in value):
            raise ValueError("teacher layer indices are >= 0")
        return value


# The declarations: what recipes see of each built-in pass before its module is imported.
QUANTIZE_LINEAR = declare(PassDeclaration(
    "quantize-linear", QuantizeLinearConfig, "passes.quantize_linear",
    "Quantize linear layers to int8, int4 or fp16, simulated (int4: rounded) in the graph and realized at lowering."))
QUANTIZE_EMBEDDINGS = declare(PassDeclaration(
    "quantize-embeddings", QuantizeEmbeddingsConfig, "passes.quantize_embeddings",
    "Store embedding tables in fp16, per-row int8 or block-wise int4 (simulated in the graph, realized at lowering).",
    must_run_after=("low-rank",)))
PRUNE_HEADS = declare(PassDeclaration(
    "prune-heads", PruneHeadsConfig, "passes.prune_heads",
    "Remove whole attention heads (q/k/v rows and output columns) by importance.",
    must_run_before=("low-rank", "share-layers")))
PRUNE_FFN = declare(PassDeclaration(
    "prune-ffn", PruneFfnConfig, "passes.prune_ffn",
    "Remove feed-forward neurons (up rows and down columns) by importance.",
    must_run_before=("low-rank", "share-layers")))
LAYER_DROP = declare(PassDeclaration(
    "layer-drop", LayerDropConfig, "passes.layer_drop", "Remove whole transformer blocks and their weights."))
SHARE_LAYERS = declare(PassDeclaration(
    "share-layers", ShareLayersConfig, "passes.share_layers",
    "Make groups of layers share one set of weights (storage drops, FLOPs do not).",
    must_run_before=("quantize-linear",), must_run_after=("prune-heads", "prune-ffn", "low-rank")))
LOW_RANK = declare(PassDeclaration(
    "low-rank", LowRankConfig, "passes.low_rank",
    "Factorize linear weights (or the word embeddings) by truncated SVD.",
    must_run_before=("quantize-linear", "share-layers"), must_run_after=("prune-heads", "prune-ffn")))
DECOUPLE_ATTENTION = declare(PassDeclaration(
    "decouple-attention", DecoupleAttentionConfig, "passes.decouple_attention",
    "Restrict the lower layers' attention to each segment and restart positions per segment."))
PRUNE_VOCAB = declare(PassDeclaration(
    "prune-vocab", PruneVocabConfig, "passes.prune_vocab",
    "Keep only the vocabulary a domain corpus uses; renumber ids and rewrite the tokenizer.",
    must_run_after=("layer-drop", "prune-heads", "prune-ffn", "distill")))
PRUNE_WEIGHTS = declare(PassDeclaration(
    "prune-weights", PruneWeightsConfig, "passes.prune_weights",
    "Zero the smallest-magnitude linear weights (stored sparse; FLOPs unchanged).",
    must_run_after=("prune-heads", "prune-ffn", "low-rank", "share-layers")))
DISTILL = declare(PassDeclaration(
    "distill", DistillConfig, "passes.distill",
    "Train the compressed graph to match the uncompressed reference (knowledge distillation)."))
