"""Will vLLM / SGLang load this AWQ checkpoint, and at which tensor-parallel sizes?

``validate_checkpoint(folder)`` reads ``config.json`` and the safetensors *headers* only
(no tensor data) and checks them against the rules that vLLM's AWQ reader applies: the current
release's ``AutoAWQConfig`` (``auto_awq.py``), plus the rules of older releases (``awq.py`` /
``awq_marlin.py``) that still bite, labelled as such.  Every rule lives in :data:`RULES`, once,
with the upstream file and the releases it comes from; the checks below refer to rules by id and
never restate them.

Run it from a shell::

    python -m awqlib.compat path/to/checkpoint [--tp 1 2 4 8]

Nothing here imports vLLM: the rules were read from its source (see ``docs/ECOSYSTEM.md``),
and vLLM itself was not run (it needs a CUDA GPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .safetensors_io import DTYPES, read_json_object, read_safetensors_header, weight_files

VLLM = "vllm-project/vllm"
SGLANG = "sgl-project/sglang"
AUTOAWQ = "casper-hansen/AutoAWQ"
GPTQMODEL = "ModelCloud/GPTQModel"

# vLLM's current AWQ reader: one AutoAWQConfig for --quantization awq / awq_marlin / auto_awq / marlin
# (read at vllm-project/vllm@0043d6b52fdafbbed46c819125a2d582a148e121).
_AUTO_AWQ_PY = "vllm/model_executor/layers/quantization/auto_awq.py"
_MARLIN_UTILS = "vllm/model_executor/layers/quantization/utils/marlin_utils.py"
_LINEAR_PY = "vllm/model_executor/layers/linear.py"
# Older releases, still deployed: AWQConfig (plain kernel) and AWQMarlinConfig in two files.
_AWQ_PY = "vllm/model_executor/layers/quantization/awq.py"
_MARLIN_PY = "vllm/model_executor/layers/quantization/awq_marlin.py"
CURRENT = "current vLLM (auto_awq.py)"
LEGACY = "older vLLM releases (awq.py / awq_marlin.py, before auto_awq.py)"
EVERY = "every vLLM release"


@dataclass(frozen=True)
class Rule:
    id: str
    severity: str          # "error": vLLM refuses or mis-loads the checkpoint; "warning": loads, with a caveat
    description: str
    repo: str
    path: str
    where: str             # function / class in that file
    versions: str = EVERY  # the releases the rule applies to

    @property
    def source(self) -> str:
        return f"{self.repo}: {self.path} ({self.where}; {self.versions})"


RULES_LIST: tuple[Rule, ...] = (
    Rule("config", "error",
         "The quantization settings are read from config.json's `quantization_config` (or, failing that, "
         "from quantize_config.json / quant_config.json beside it).",
         VLLM, _AUTO_AWQ_PY, "AutoAWQConfig.get_config_filenames"),
    Rule("quant_method", "error",
         "quantization_config.quant_method must be 'awq': vLLM picks the reader from this key; with 'awq', "
         "--quantization unset, awq, awq_marlin, auto_awq or marlin all select AutoAWQConfig (on CUDA; the "
         "CPU backend has its own reader).",
         VLLM, _AUTO_AWQ_PY, "AutoAWQConfig.override_quantization_method"),
    Rule("config_keys", "error",
         "quantization_config must give the bit width ('bits' or AutoAWQ's 'w_bit'), the group size "
         "('group_size' or 'q_group_size') and 'zero_point'; a missing key raises ValueError.",
         VLLM, _AUTO_AWQ_PY, "AutoAWQConfig.from_config"),
    Rule("bits", "error",
         "Only 4-bit AWQ is supported (TYPE_MAP {4: uint4}; pack factor 32 // 4 = 8 codes per int32).",
         VLLM, _AUTO_AWQ_PY, "AutoAWQConfig.__init__"),
    Rule("version_gemm", "error",
         "vLLM reads only AutoAWQ's GEMM layout: from_config never reads 'version' and create_weights "
         "allocates GEMM shapes, so GEMV / GEMV-fast checkpoints fail in the weight loader (or load "
         "transposed garbage where shapes happen to coincide); the AutoAWQ maintainer confirms GEMV is not "
         "implemented in vLLM (casper-hansen/AutoAWQ issues #217, #452).",
         VLLM, _AUTO_AWQ_PY, "AutoAWQConfig.from_config / BaseAWQLinearMethod.create_weights"),
    Rule("tensors", "error",
         "Every quantized linear has three tensors named <module>.qweight, <module>.qzeros, <module>.scales.",
         VLLM, _AUTO_AWQ_PY, "BaseAWQLinearMethod / AutoAWQMarlinLinearMethod.create_weights (register_parameter)"),
    Rule("dtypes", "error",
         "qweight and qzeros are int32; scales are float16 in AutoAWQ's format. vLLM copies the stored "
         "tensors into parameters it allocates itself (scales in the activation dtype), so another dtype is "
         "not a conforming AWQ checkpoint: it is silently cast (bf16/fp32 scales) or reinterpreted, i.e. vLLM "
         "would not serve the weights that were validated.",
         VLLM, _AUTO_AWQ_PY, "BaseAWQLinearMethod.create_weights"),
    Rule("shapes", "error",
         "For in_features K, out_features N, group g: qweight [K, N/8], qzeros [K/g, N/8], scales [K/g, N] "
         "(g = -1 means g = K). The weight loader asserts these shapes.",
         VLLM, _AUTO_AWQ_PY, "BaseAWQLinearMethod.create_weights"),
    Rule("unquantized_head", "error",
         "AutoAWQConfig quantizes LinearBase / fused-MoE layers; embeddings and the lm_head are loaded as "
         "plain `.weight` (the lm_head is quantized only when quantization_config has 'lm_head': true).",
         VLLM, _AUTO_AWQ_PY, "AutoAWQConfig.get_quant_method / from_config"),
    Rule("skipped_layers", "warning",
         "Linears kept in fp16 must be listed in modules_to_not_convert (substring match). vLLM infers "
         "unlisted ones from the safetensors dtypes only when modules_to_not_convert is empty "
         "(maybe_update_config); a non-empty list that misses one, or an older release, fails with a "
         "missing qweight.",
         VLLM, _AUTO_AWQ_PY, "AutoAWQConfig.maybe_update_config"),
    Rule("act_dtype", "warning",
         "Older releases: the plain AWQ kernel (awq.py) runs fp16 only, so with --quantization awq a "
         "config.json torch_dtype of bfloat16/float32 stops with 'torch.bfloat16 is not supported for "
         "quantization method awq' unless --dtype float16 is given. The current AutoAWQConfig accepts fp16 "
         "and bf16 on every kernel.",
         VLLM, _AWQ_PY + "; " + _AUTO_AWQ_PY,
         "AWQConfig.get_supported_act_dtypes; AutoAWQConfig.get_supported_act_dtypes", LEGACY),
    Rule("parallel_style", "error",
         "Tensor parallelism splits column-parallel linears (q/k/v/qkv, gate/up/gate_up, fc1, w1/w3, ...) "
         "along out_features and row-parallel linears (o_proj, down_proj, out_proj, fc2, w2, "
         "dense_4h_to_h, ...) along in_features: see ROW_PARALLEL / COLUMN_PARALLEL below, as the model "
         "files build them (e.g. LlamaAttention, LlamaMLP in vllm/model_executor/models/llama.py).",
         VLLM, _LINEAR_PY, "ColumnParallelLinear / RowParallelLinear / QKVParallelLinear"),
    Rule("tp_group", "error",
         "Per TP shard, input_size_per_partition % group_size == 0 ('The input size is not aligned with the "
         "quantized weight shape. This can be caused by too large tensor parallel size.'); with "
         "group_size -1 the group is the full input size, so a row-parallel layer cannot be split. The "
         "Marlin path does not help: a group straddling two shards fails check_marlin_supports_layer and "
         "falls back to the plain kernel, which raises.",
         VLLM, _AUTO_AWQ_PY + "; " + _MARLIN_UTILS,
         "BaseAWQLinearMethod.create_weights; check_marlin_supports_layer"),
    Rule("tp_pack", "error",
         "Per TP shard, output_size_per_partition % pack_factor (8) == 0 ('The output size is not aligned "
         "with the quantized weight shape'); fused qkv / gate_up shards are packed part by part, so each "
         "part must be a multiple of 8 too.",
         VLLM, _AUTO_AWQ_PY, "BaseAWQLinearMethod.create_weights; PackedvLLMParameter shard offsets"),
    Rule("tp_heads", "error",
         "num_attention_heads % tensor_parallel_size == 0 ('Total number of attention heads (..) must be "
         "divisible by tensor parallel size (..)'); KV heads are split when num_key_value_heads > tp "
         "(divide(num_kv_heads, tp)) and replicated otherwise (divide(tp, num_kv_heads)): one must divide "
         "the other.",
         VLLM, "vllm/config/model.py; " + _LINEAR_PY,
         "ModelConfig.verify_with_parallel_config; QKVParallelLinear.__init__"),
    Rule("marlin", "warning",
         "The fast Marlin kernel is chosen on CUDA when check_marlin_supported(uint4, group_size, zero_point) "
         "holds: zero_point true and group_size in [-1, 32, 64, 128] (either key spelling; any of "
         "--quantization awq / awq_marlin / auto_awq / marlin). Tile-misaligned layers (output per shard not "
         "a multiple of 64, input not a multiple of 128) are zero-padded at weight preparation, not sent to "
         "the plain kernel. VLLM_BATCH_INVARIANT=1 disables Marlin.",
         VLLM, _AUTO_AWQ_PY + "; " + _MARLIN_UTILS,
         "AutoAWQConfig.get_quant_method; check_marlin_supported / check_marlin_supports_layer "
         "(allow_tile_padding=True), MARLIN_SUPPORTED_GROUP_SIZES", CURRENT),
    Rule("marlin_legacy", "warning",
         "Older releases choose awq_marlin only on CUDA sm >= 80 when the config spells 'bits', "
         "'group_size', 'zero_point' (HF names) and a layer has output_size_per_partition % 64 == 0 and "
         "input_size_per_partition % 128 == 0 (else that layer runs the plain AWQ kernel); passing "
         "--quantization awq explicitly forces the plain, fp16-only kernel.",
         VLLM, _MARLIN_PY + "; " + _MARLIN_UTILS,
         "AWQMarlinConfig.is_awq_marlin_compatible / override_quantization_method; "
         "verify_marlin_supports_shape (MIN_THREAD_N=64, MIN_THREAD_K=128)", LEGACY),
    Rule("group_size", "warning",
         "group_size -1 (per-channel) crashes SGLang's plain AWQ reader (x % -1 == 0, negative group "
         "count); in vLLM a row-parallel layer cannot be split at TP > 1 (plain kernel: the tp_group error; "
         "the Marlin path allocates input_size_per_partition // input_size = 0 scale rows). 32/64/128 are "
         "the sizes every AWQ kernel supports.",
         SGLANG, "python/sglang/srt/layers/quantization/awq.py", "AWQLinearMethod.create_weights"),
    Rule("transformers_cpu", "warning",
         "group_size -1 can fail in transformers' CPU path: gptqmodel's aten kernel (TorchAtenAwqLinear, "
         "torch's _weight_int4pack_mm_cpu) accepts group sizes 32..256 only, and where gptqmodel selects it "
         "the checkpoint does not load (gptqmodel 7.7.0 on an AVX-512 CPU selected TorchFusedAwqLinear "
         "instead and loaded it).",
         GPTQMODEL, "gptqmodel/nn_modules/qlinear/torch_aten_kernel.py", "TorchAtenLinear.SUPPORTS_GROUP_SIZE",
         "transformers 5 + gptqmodel on the CPU"),
    Rule("router", "warning",
         "MoE routers (mlp.gate) are built unquantized (ReplicatedLinear with quant_config=None) in many "
         "vLLM MoE models; a quantized router then has no qweight parameter to load into.",
         VLLM, "vllm/model_executor/models/*moe*.py", "<Model>MoE.__init__ (self.gate = ReplicatedLinear)"),
    Rule("files", "error",
         "Weights must be safetensors (model.safetensors, or shards listed in model.safetensors.index.json).",
         VLLM, "vllm/model_executor/model_loader/default_loader.py", "DefaultModelLoader._prepare_weights"),
)
RULES: dict[str, Rule] = {r.id: r for r in RULES_LIST}

# How vLLM's model files shard each linear under tensor parallelism (rule "parallel_style").
ROW_PARALLEL = frozenset({"o_proj", "down_proj", "out_proj", "fc2", "w2", "dense_4h_to_h", "dense", "c_proj",
                          "wo"})
COLUMN_PARALLEL = frozenset({"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "fc1", "w1", "w3",
                             "c_fc", "dense_h_to_4h", "c_attn"})
QKV_FUSED = frozenset({"qkv_proj", "query_key_value", "W_pack", "Wqkv", "wqkv"})
GATE_UP_FUSED = frozenset({"gate_up_proj", "w13"})
KV = frozenset({"k_proj", "v_proj"})

MARLIN_GROUP_SIZES = (-1, 32, 64, 128)
MARLIN_MIN_THREAD_N = 64
MARLIN_MIN_THREAD_K = 128
TORCH_ATEN_GROUP_SIZES = (32, 64, 128, 256)  # gptqmodel TorchAtenLinear.SUPPORTS_GROUP_SIZE (rule transformers_cpu)



@dataclass
class Finding:
    rule: str
    severity: str
    message: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.message} (rule source: {RULES[self.rule].source})"


@dataclass
class Linear:
    name: str
    kind: str              # "row" | "column" | "qkv" | "gate_up" | "unknown"
    in_features: int
    out_features: int


@dataclass
class ValidationReport:
    folder: Path
    errors: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    valid_tp: list[int] = field(default_factory=list)
    marlin_tp: list[int] = field(default_factory=list)          # current vLLM: Marlin on every linear
    legacy_marlin_tp: list[int] = field(default_factory=list)   # older releases: awq_marlin on every linear
    tp_problems: dict[int, list[str]] = field(default_factory=dict)
    quant_config: dict[str, Any] = field(default_factory=dict)
    n_quantized: int = 0

    @property
    def ok(self) -> bool:
        return not self.errors

    def add(self, rule: str, message: str, severity: str | None = None) -> None:
        f = Finding(rule, severity or RULES[rule].severity, message)
        (self.errors if f.severity == "error" else self.warnings).append(f)

    def format_report(self) -> str:
        return format_report(self)


# ---------------------------------------------------------------------------------------------- reading

def _weight_files(folder: Path, report: ValidationReport) -> list[Path]:
    """The weight files by the loader's own rule (:func:`awqlib.safetensors_io.weight_files`)."""
    try:
        return weight_files(folder)
    except (OSError, ValueError) as e:
        report.add("files", str(e))
        return []


def _load_quant_config(folder: Path, report: ValidationReport) -> tuple[dict, dict | None]:
    cfg: dict = {}
    try:
        cfg = read_json_object(folder, "config.json")
    except FileNotFoundError:
        report.add("config", f"{folder} has no config.json")
    except (OSError, ValueError) as e:
        report.add("config", str(e))
        return {}, None
    qc = cfg.get("quantization_config")
    if qc is None:
        for name in ("quant_config.json", "quantize_config.json"):
            try:
                qc = read_json_object(folder, name)
                break
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as e:
                report.add("config", str(e))
                return cfg, None
    if qc is None:
        report.add("config", "no quantization_config in config.json and no quant_config.json / "
                             "quantize_config.json: vLLM would load this as an unquantized model")
    elif not isinstance(qc, dict):
        report.add("config", f"config.json: quantization_config is {qc!r} ({type(qc).__name__}); it must be an "
                             "object such as {\"quant_method\": \"awq\", \"bits\": 4, \"group_size\": 128, ...}")
        return cfg, None
    return cfg, qc


def _head_count(cfg: dict, key: str, report: ValidationReport) -> int | None:
    """config.json's ``key`` (a head count) as a positive int; anything else a "config" finding."""
    v = cfg.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        report.add("config", f"config.json: {key}={v!r} ({type(v).__name__}) must be a positive integer")
        return None
    return v


def _get(qc: dict, *keys: str) -> Any:
    for k in keys:
        if k in qc:
            return qc[k]
    return None


def _parallel_kind(name: str) -> str:
    leaf = name.rsplit(".", 1)[-1]
    if leaf in QKV_FUSED:
        return "qkv"
    if leaf in GATE_UP_FUSED:
        return "gate_up"
    if leaf in ROW_PARALLEL:
        return "row"
    if leaf in COLUMN_PARALLEL:
        return "column"
    return "unknown"


def _divides(a: int, b: int) -> bool:
    return b != 0 and a % b == 0


# ---------------------------------------------------------------------------------------------- TP math

def _column_parts(lin: Linear, tp: int, heads: int | None, kv_heads: int | None) -> list[int] | str:
    """Per-shard output sizes of the parts of a column-parallel linear, or why it cannot be split."""
    leaf = lin.name.rsplit(".", 1)[-1]
    n = lin.out_features
    if lin.kind == "qkv" and heads and kv_heads:
        hd, r = divmod(n, heads + 2 * kv_heads)
        if r:
            return f"{lin.name}: out_features {n} is not (heads + 2*kv_heads) * head_dim"
        kv_local = _kv_local(kv_heads, tp)
        if isinstance(kv_local, str):
            return kv_local
        if not _divides(heads, tp):
            return f"num_attention_heads {heads} not divisible by TP {tp}"
        return [heads // tp * hd, kv_local * hd, kv_local * hd]
    if leaf in KV and kv_heads:
        if not _divides(n, kv_heads):
            return f"{lin.name}: out_features {n} not a multiple of num_key_value_heads {kv_heads}"
        kv_local = _kv_local(kv_heads, tp)
        return kv_local if isinstance(kv_local, str) else [kv_local * (n // kv_heads)]
    if lin.kind == "gate_up":
        if n % (2 * tp):
            return f"{lin.name}: out_features {n} cannot be split into 2 x {tp} shards"
        return [n // 2 // tp, n // 2 // tp]
    if n % tp:
        return f"{lin.name}: out_features {n} not divisible by TP {tp}"
    return [n // tp]


def _kv_local(kv_heads: int, tp: int) -> int | str:
    if tp >= kv_heads:
        return 1 if _divides(tp, kv_heads) else f"TP {tp} is not a multiple of num_key_value_heads {kv_heads}"
    return kv_heads // tp if _divides(kv_heads, tp) else f"num_key_value_heads {kv_heads} not divisible by TP {tp}"


def _shard_problems(lin: Linear, tp: int, group: int, pack: int, heads, kv_heads) -> tuple[list[str], bool]:
    """(problems for the plain AWQ kernel, whether the shards meet Marlin's thread tiles unpadded) at
    this TP.  Current vLLM pads misaligned tiles; older releases sent such layers to the plain kernel."""
    problems: list[str] = []
    kinds = ("row", "column") if lin.kind == "unknown" else (lin.kind,)
    tiles = True
    for kind in kinds:
        if kind == "row":
            if lin.in_features % tp:
                problems.append(f"{lin.name}: in_features {lin.in_features} not divisible by TP {tp}")
                return problems, False
            k_local, n_parts = lin.in_features // tp, [lin.out_features]
        else:
            parts = _column_parts(lin, tp, heads, kv_heads)
            if isinstance(parts, str):
                problems.append(parts)
                return problems, False
            k_local, n_parts = lin.in_features, parts
        g = lin.in_features if group == -1 else group
        if k_local % g:
            problems.append(f"{lin.name} ({kind}-parallel): input per shard {k_local} is not a multiple of "
                            f"group_size {g} [tp_group]")
        bad = [p for p in n_parts if p % pack]
        if bad or sum(n_parts) % pack:
            problems.append(f"{lin.name} ({kind}-parallel): output per shard {n_parts} not a multiple of the "
                            f"pack factor {pack} [tp_pack]")
        if sum(n_parts) % MARLIN_MIN_THREAD_N or k_local % MARLIN_MIN_THREAD_K:
            tiles = False
    return problems, tiles and not problems


# ---------------------------------------------------------------------------------------------- validate

def validate_checkpoint(folder: str | Path, tp_sizes: Iterable[int] = (1, 2, 4, 8)) -> ValidationReport:
    """Check an AWQ checkpoint folder against vLLM's AWQ loading rules (:data:`RULES`)."""
    folder = Path(folder)
    report = ValidationReport(folder)
    tp_sizes = sorted(set(int(t) for t in tp_sizes))
    if any(t < 1 for t in tp_sizes):
        raise ValueError(f"tensor-parallel sizes must be at least 1, got {tp_sizes}")
    if not folder.is_dir():
        report.add("files", f"{folder} is not a folder")
        return report
    cfg, qc = _load_quant_config(folder, report)
    files = _weight_files(folder, report)
    if qc is None:
        return report
    report.quant_config = dict(qc)

    method = str(qc.get("quant_method", "")).lower()
    if method != "awq":
        report.add("quant_method", f"quant_method is {qc.get('quant_method')!r}, not 'awq': vLLM's AWQ reader "
                                   "does not apply (re-quantize with awqlib, or serve it with the method that "
                                   "wrote it)")
        return report
    bits = _get(qc, "w_bit", "bits")
    group = _get(qc, "q_group_size", "group_size")
    zero_point = _get(qc, "zero_point")
    missing = [k for k, v in (("bits/w_bit", bits), ("group_size/q_group_size", group),
                              ("zero_point", zero_point)) if v is None]
    if missing:
        report.add("config_keys", f"quantization_config lacks {missing}")
        return report
    if bits != 4:
        report.add("bits", f"bits={bits}: vLLM's AWQ reader accepts only 4-bit weights")
        return report
    version = str(qc.get("version") or "gemm").lower()
    if version != "gemm":
        report.add("version_gemm",
                   f"quantization_config.version is {version!r}: vLLM (and SGLang) cannot read the {version.upper()} "
                   "layout, only GEMM. Fix: load it with awqlib, which converts GEMV to GEMM at load time, and "
                   "re-save: `from awqlib import AutoAWQ; AutoAWQ.from_quantized(path).save_quantized(out)` "
                   "writes version 'gemm'")
        return report
    pack = 32 // bits
    if not isinstance(group, int) or (group != -1 and group <= 0):
        report.add("shapes", f"group_size={group!r} is not a positive integer or -1")
        return report
    if group not in (32, 64, 128):
        report.add("group_size", f"group_size={group}: not one of 32/64/128" +
                   ("; per-channel scales" if group == -1 else ""))
    if group not in TORCH_ATEN_GROUP_SIZES:
        report.add("transformers_cpu", f"group_size={group}: transformers + gptqmodel on the CPU may fail to load "
                                       "it (gptqmodel's aten CPU kernel takes group sizes 32..256 only); "
                                       "quantize with group size 32/64/128 for that reader")

    # --- tensors
    tensors: dict[str, dict[str, Any]] = {}
    for f in files:
        try:
            tensors.update(read_safetensors_header(f))
        except (OSError, ValueError, KeyError) as e:
            report.add("files", f"{f.name}: unreadable safetensors header ({e})")
    skip = qc.get("modules_to_not_convert") or []
    if not isinstance(skip, list) or not all(isinstance(m, str) for m in skip):
        report.add("config", f"quantization_config.modules_to_not_convert must be a list of module names, got "
                             f"{skip!r} (a bare string would be read character by character)")
        skip = [skip] if isinstance(skip, str) else []
    linears = _check_tensors(tensors, group, pack, skip, report)
    report.n_quantized = len(linears)
    if not linears and not report.errors:
        report.add("tensors", "no <module>.qweight tensors found: nothing in this checkpoint is AWQ-quantized")

    # --- dtype of activations
    dtype = cfg.get("torch_dtype") or cfg.get("dtype")
    if dtype not in (None, "float16"):
        report.add("act_dtype", f"config.json torch_dtype is {dtype!r}: current vLLM serves AWQ in fp16 or bf16; "
                                "older releases (awq.py) need `--dtype float16` with --quantization awq")

    # --- marlin eligibility of the config
    marlin_cfg = bool(zero_point) and group in MARLIN_GROUP_SIZES
    hf_names = all(k in qc for k in ("bits", "group_size", "zero_point"))
    if not marlin_cfg:
        why = ([] if zero_point else ["zero_point is false"]) + (
            [] if group in MARLIN_GROUP_SIZES else [f"group_size {group} not in {list(MARLIN_GROUP_SIZES)}"])
        report.add("marlin", "the fast Marlin kernel will not be used: " + "; ".join(why))
    elif not hf_names:
        report.add("marlin_legacy", "the config spells AutoAWQ's 'w_bit'/'q_group_size': current vLLM reads "
                                    "them, but older releases then skip awq_marlin and run the plain, fp16-only "
                                    "AWQ kernel (write 'bits', 'group_size', 'zero_point')")

    # --- tensor parallelism
    heads = _head_count(cfg, "num_attention_heads", report)
    kv_heads = _head_count(cfg, "num_key_value_heads", report) or heads
    for tp in tp_sizes:
        problems: list[str] = []
        if heads and not _divides(heads, tp):
            problems.append(f"num_attention_heads {heads} not divisible by TP {tp} [tp_heads]")
        if kv_heads and isinstance(_kv_local(kv_heads, tp), str):
            problems.append(f"{_kv_local(kv_heads, tp)} [tp_heads]")
        tiles_all = True
        for lin in linears:
            p, tiles = _shard_problems(lin, tp, group, pack, heads, kv_heads)
            problems += p
            tiles_all = tiles_all and tiles
        if problems:
            report.tp_problems[tp] = problems
        elif not report.errors:
            report.valid_tp.append(tp)
            if marlin_cfg:
                report.marlin_tp.append(tp)
                if hf_names and tiles_all:
                    report.legacy_marlin_tp.append(tp)
    if 1 in report.tp_problems and not report.errors:
        report.add("tp_group", "the checkpoint does not load even without tensor parallelism: "
                   + "; ".join(report.tp_problems[1][:3]))
        report.valid_tp, report.marlin_tp, report.legacy_marlin_tp = [], [], []
    if group == -1 and any(lin.kind in ("row", "unknown") for lin in linears):
        report.add("group_size", "with group_size -1 a row-parallel layer cannot be split at TP > 1 (current "
                                 "vLLM's Marlin path would get 0 scale rows per shard; older releases split it "
                                 "only through awq_marlin): valid_tp counts TP 1 only")
    unknown = sorted({lin.name.rsplit(".", 1)[-1] for lin in linears if lin.kind == "unknown"})
    if unknown:
        report.add("parallel_style", f"linears named {unknown} are not in the row/column tables; they were "
                                     "checked both ways", severity="warning")
    return report


def _check_tensors(tensors: dict[str, dict[str, Any]], group: int, pack: int, skip: list[str],
                   report: ValidationReport) -> list[Linear]:
    linears: list[Linear] = []
    prefixes = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith((".qweight", ".qzeros", ".scales"))})
    bad_dtype, bad_shape = [], []
    for p in prefixes:
        t = {s: tensors.get(f"{p}.{s}") for s in ("qweight", "qzeros", "scales")}
        absent = [s for s, v in t.items() if v is None]
        if absent:
            report.add("tensors", f"{p} lacks {absent}")
            continue
        leaf = p.rsplit(".", 1)[-1]
        if leaf in ("lm_head", "embed_tokens", "wte", "embed_in", "embed_out") or p.endswith("lm_head"):
            report.add("unquantized_head", f"{p} is quantized; vLLM's AWQ reader expects {p}.weight in fp16")
            continue
        if p.endswith("mlp.gate") or leaf == "router":
            report.add("router", f"{p} (MoE router) is quantized")
        for s, want in (("qweight", "I32"), ("qzeros", "I32"), ("scales", "F16")):
            if t[s]["dtype"] != want:
                bad_dtype.append(f"{p}.{s} is {DTYPES.get(t[s]['dtype'], (t[s]['dtype'],))[0]}, "
                                 f"expected {DTYPES[want][0]}")
        qw, qz, sc = (t[s]["shape"] for s in ("qweight", "qzeros", "scales"))
        if len(qw) != 2 or len(qz) != 2 or len(sc) != 2:
            bad_shape.append(f"{p}: expected 2-D tensors, got qweight {qw}, qzeros {qz}, scales {sc}")
            continue
        k, n = qw[0], qw[1] * pack
        g = k if group == -1 else group
        want = {"qweight": [k, n // pack], "qzeros": [k // g if g else 0, n // pack], "scales": [k // g if g else 0, n]}
        got = {"qweight": qw, "qzeros": qz, "scales": sc}
        if not k or k % g or any(got[s] != want[s] for s in want):
            bad_shape.append(f"{p}: qweight {qw}, qzeros {qz}, scales {sc}; for in_features {k}, "
                             f"out_features {n}, group {g} expected qweight {want['qweight']}, "
                             f"qzeros {want['qzeros']}, scales {want['scales']}")
            continue
        linears.append(Linear(p, _parallel_kind(p), k, n))
    for msg in bad_dtype[:8]:
        report.add("dtypes", msg)
    if len(bad_dtype) > 8:
        report.add("dtypes", f"... and {len(bad_dtype) - 8} more tensors with the wrong dtype")
    for msg in bad_shape[:8]:
        report.add("shapes", msg)
    if len(bad_shape) > 8:
        report.add("shapes", f"... and {len(bad_shape) - 8} more linears with wrong shapes")

    # fp16 linears inside the decoder that modules_to_not_convert does not name
    known = ROW_PARALLEL | COLUMN_PARALLEL | QKV_FUSED | GATE_UP_FUSED
    plain = sorted(k[: -len(".weight")] for k, v in tensors.items()
                   if k.endswith(".weight") and len(v["shape"]) == 2 and ".layers." in k
                   and k[: -len(".weight")].rsplit(".", 1)[-1] in known)
    unlisted = [m for m in plain if not any(s in m for s in skip)]
    if unlisted and prefixes:
        report.add("skipped_layers", f"{len(unlisted)} linear(s) are stored unquantized but not named in "
                                     f"modules_to_not_convert, e.g. {unlisted[:3]}")
    return linears


# ---------------------------------------------------------------------------------------------- output

def format_report(report: ValidationReport) -> str:
    qc = report.quant_config
    lines = [f"AWQ checkpoint: {report.folder}"]
    if qc:
        lines.append("quantization_config: " + ", ".join(f"{k}={v}" for k, v in qc.items()))
    lines.append(f"quantized linears: {report.n_quantized}")
    verdict = "OK for vLLM / SGLang" if report.ok else "NOT loadable by vLLM / SGLang"
    lines.append(f"verdict: {verdict}")
    if report.ok:
        lines.append(f"valid --tensor-parallel-size: {report.valid_tp or 'none of those checked'}")
        lines.append(f"  of which every linear runs Marlin (current vLLM, CUDA): {report.marlin_tp or 'none'}")
        lines.append(f"  and without tile padding (older vLLM's awq_marlin, sm >= 80): "
                     f"{report.legacy_marlin_tp or 'none'}")
        for tp, probs in sorted(report.tp_problems.items()):
            lines.append(f"  TP {tp} rejected: {probs[0]}" + (f" (+{len(probs) - 1} more)" if len(probs) > 1 else ""))
    for title, items in (("errors", report.errors), ("warnings", report.warnings)):
        if items:
            lines.append(f"{title}:")
            lines += [f"  - {f}" for f in items]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m awqlib.compat",
                                 description="Check an AWQ checkpoint against vLLM's loading rules")
    ap.add_argument("folder")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4, 8], help="TP degrees to check")
    ap.add_argument("--rules", action="store_true", help="print the rules with their sources and exit")
    a = ap.parse_args(argv)
    if any(t < 1 for t in a.tp):
        ap.error(f"--tp: every size must be at least 1, got {a.tp}")
    if a.rules:
        for r in RULES_LIST:
            print(f"{r.id} ({r.severity}): {r.description}\n    source: {r.source}")
        return 0
    rep = validate_checkpoint(a.folder, a.tp)
    print(format_report(rep))
    return 0 if rep.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
