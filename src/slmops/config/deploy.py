"""Typed configuration of `slmops optimize` (alias `auto-opt`), `generate-adapter` and
`convert-adapters`. Flag names follow Olive's commands; which precision runs on which
execution provider is checked here, before anything is loaded."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from slmops.config.base import Section, log_level_field, named_log_level, split_csv
from slmops.errors import suggest

PROVIDERS = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda", "DmlExecutionProvider": "dml",
             "WebGpuExecutionProvider": "webgpu"}
DEVICE_OF = {"cpu": "cpu", "cuda": "gpu", "dml": "gpu", "webgpu": "gpu"}
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")
# (precision, builder execution provider) pairs ONNX Runtime GenAI's model builder supports.
VALID_PAIRS = {("fp32", "cpu"), ("fp32", "cuda"), ("fp16", "cuda"), ("fp16", "dml"), ("bf16", "cuda"), ("int8", "cpu"),
               ("int8", "cuda"), ("int4", "cpu"), ("int4", "cuda"), ("int4", "dml"), ("int4", "webgpu")}
# MatMulNBits accuracy levels, by Olive's --act_precision (the activations' type in int4/int8 products)
ACCURACY_OF_ACT_PRECISION = {"fp32": 1, "fp16": 2, "bf16": 3, "int8": 4}


class ExportOptions(Section):
    """What every export shares (auto-opt / optimize, and generate-adapter from a PyTorch base)."""

    precision: str = Field("fp32", description="fp32, fp16, bf16, int8 or int4 (block-wise weight-only).")
    act_precision: Literal["fp32", "fp16", "bf16", "int8"] | None = Field(
        None, description="Activation type of the int4/int8 products (Olive's flag): int8 is fastest on CPU, fp32 closest to fp32. "
        "Sets --accuracy_level (int8 = 4, fp32 = 1).")
    device: Literal["cpu", "gpu"] | None = Field(None, description="Target device (must match --provider).")
    provider: str = Field("CPUExecutionProvider", description="CPUExecutionProvider, CUDAExecutionProvider, DmlExecutionProvider or "
                          "WebGpuExecutionProvider.")
    exporter: Literal["model_builder"] = Field("model_builder", description="Exporter (Olive's flag): ONNX Runtime GenAI's model builder.")
    modality: Literal["text"] = Field("text", description="Model modality (Olive's flag): text.")
    task: Literal["text-generation", "text-generation-with-past"] = Field(
        "text-generation", description="Task (Olive's -t): text generation.", json_schema_extra={"cli": ["-t"]})
    block_size: int = Field(32, description="int4/int8 quantization block size: 16, 32, 64, 128 or 256.",
                            json_schema_extra={"cli": ["--int4_block_size"]})
    accuracy_level: int | None = Field(
        None, ge=0, le=4, description="MatMulNBits accuracy level: 4 = int8 activations (fastest on CPU), 1 = fp32 activations "
        "(closest to fp32). Default: from --act_precision, else 4.", json_schema_extra={"cli": ["--int4_accuracy_level"]})
    quant_algo: Literal["k_quant", "rtn", "default"] = Field(
        "k_quant", description="int4/int8 weight rounding: k_quant (kept more greedy tokens than rtn on SmolLM2), rtn, or default.")
    int8_layers: Literal["sensitive", "head", "none"] = Field(
        "sensitive", description="int4 only: the layers kept at int8. sensitive: the output head and the quantization-sensitive "
        "projections (ONNX Runtime GenAI's mixed strategy, after llama.cpp's Q4_K_M: the first and last eighth of the layers and "
        "every third layer's q/v/down projections), ~20% larger than all-int4, measured to keep a TweetEval classifier's "
        "macro-F1 where all-int4 lost 6.8 points; head: the output head alone; none: everything int4 (smallest).")
    lora_slots: Literal["auto", "all"] = Field(
        "auto", description="auto: LoRA slots on the layers the given adapters target; all: on every q/k/v/o/gate/up/down "
        "projection, so adapters trained later on other layers plug in too.")
    adapter_names: list[str] | None = Field(None, description="Names of the adapters in the bundle, comma-separated. Default: folder names.")
    threads: int | None = Field(None, gt=0, description="Intra-op threads written to genai_config.json. Default: the CPUs available.")
    parity_prompts: str | None = Field(None, description="Text file, one prompt per line, for the PyTorch-vs-ONNX check.")
    no_parity: bool = Field(False, description="Skip the PyTorch-vs-ONNX greedy agreement check.")
    use_ort_genai: bool = Field(False, description="Accepted for Olive compatibility: the output is always an ORT GenAI bundle.")
    use_model_builder: bool = Field(False, description="Accepted for Olive compatibility: the ORT GenAI model builder is always used.")
    trust_remote_code: bool = Field(False, description="Allow model code from the model folder to run.")
    log_level: int = log_level_field(1)

    _csv = field_validator("adapter_names", mode="before")(split_csv)
    _level = field_validator("log_level", mode="before")(named_log_level)

    @field_validator("precision", mode="before")
    @classmethod
    def _precision(cls, value: Any) -> Any:
        if isinstance(value, str) and value.lower() in PRECISIONS:
            return value.lower()
        if isinstance(value, str):
            raise ValueError(f"unknown precision {value!r}; choose one of {', '.join(PRECISIONS)}.{suggest(value.lower(), PRECISIONS)}")
        return value

    @field_validator("provider")
    @classmethod
    def _provider(cls, value: str) -> str:
        if value not in PROVIDERS:
            raise ValueError(f"unknown provider {value!r}; choose one of {', '.join(PROVIDERS)}.{suggest(value, PROVIDERS)}")
        return value

    @field_validator("block_size")
    @classmethod
    def _block(cls, value: int) -> int:
        if value not in (16, 32, 64, 128, 256):
            raise ValueError("int4 block size must be one of 16, 32, 64, 128, 256")
        return value

    @model_validator(mode="after")
    def _combination(self) -> "ExportOptions":
        ep = PROVIDERS[self.provider]
        if self.device is not None and self.device != DEVICE_OF[ep]:
            raise ValueError(f"--device {self.device} does not go with --provider {self.provider} (a {DEVICE_OF[ep]} provider)")
        if (self.precision, ep) not in VALID_PAIRS:
            pairs = ", ".join(f"{p} on {next(k for k, v in PROVIDERS.items() if v == e)}" for p, e in sorted(VALID_PAIRS) if e == ep)
            raise ValueError(f"--precision {self.precision} is not supported with {self.provider}; supported there: {pairs}")
        if self.act_precision is not None and self.accuracy_level is not None \
                and ACCURACY_OF_ACT_PRECISION[self.act_precision] != self.accuracy_level:
            raise ValueError(f"--act_precision {self.act_precision} means --accuracy_level {ACCURACY_OF_ACT_PRECISION[self.act_precision]}, "
                             f"not {self.accuracy_level}; give one of them")
        return self

    @property
    def execution_provider(self) -> str:
        """The model builder's name for the provider: cpu, cuda, dml, webgpu."""
        return PROVIDERS[self.provider]

    def weight_quantization(self) -> dict:
        """The settings that decide the exported weights (not how they are multiplied): what a
        quantization-aware adapter is trained over and what an export is compared with."""
        settings: dict = {"precision": self.precision}
        if self.precision in ("int4", "int8"):
            settings.update(block_size=self.block_size, algorithm=self.quant_algo)
        if self.precision == "int4":
            settings["int8_layers"] = self.int8_layers
        return settings

    @property
    def resolved_accuracy_level(self) -> int:
        if self.accuracy_level is not None:
            return self.accuracy_level
        return ACCURACY_OF_ACT_PRECISION[self.act_precision] if self.act_precision else 4


class ExportConfig(ExportOptions):
    """`slmops optimize` / `slmops auto-opt`: a Hugging Face model (and LoRA adapters) -> an
    ONNX Runtime GenAI bundle whose adapters are switchable `.onnx_adapter` files.

    model_name_or_path: models/tone/ft
    precision: int4
    output_path: models/tone/onnx-int4
    """

    model_name_or_path: str = Field(description="Hugging Face folder, built-in name, Hub id, or an slmops finetune output (its "
                                    "adapter is used).", json_schema_extra={"cli": ["-m"]})
    adapter_path: list[str] | None = Field(None, description="PEFT LoRA adapter folder(s), comma-separated.", json_schema_extra={"cli": ["-a"]})
    output_path: str = Field(description="Folder for the bundle (must be new or empty).", json_schema_extra={"cli": ["-o"]})

    _adapters = field_validator("adapter_path", mode="before")(split_csv)


class GenerateAdapterConfig(ExportOptions):
    """`slmops generate-adapter`: one base bundle plus one `.onnx_adapter` per adapter."""

    base_model_path: str = Field(description="The base: a Hugging Face model / built-in / slmops output (exported once), or an "
                                 "existing bundle (its files are shared).", json_schema_extra={"cli": ["-m", "--model_name_or_path"]})
    adapter_paths: list[str] = Field(description="PEFT LoRA adapter folders trained on that base, comma-separated.",
                                     json_schema_extra={"cli": ["--adapter_path"]})
    output_path: str = Field(description="Folder for the new bundle (must be new or empty).", json_schema_extra={"cli": ["-o"]})

    _adapters = field_validator("adapter_paths", mode="before")(split_csv)


class ConvertAdaptersConfig(Section):
    """`slmops convert-adapters`: a PEFT LoRA adapter -> an `.onnx_adapter` file."""

    adapter_path: str = Field(description="PEFT LoRA adapter folder.")
    output_path: str = Field(description="The .onnx_adapter file to write.", json_schema_extra={"cli": ["-o"]})
    base_bundle: str | None = Field(
        None, description="Bundle the adapter will run on: every LoRA slot it has is filled (zeros where the adapter does not "
        "reach). Without it, only the adapter's own layers are written, which fits a bundle exported with this adapter's targets.")
    adapter_format: Literal["onnx_adapter"] = Field("onnx_adapter", description="Output format.")
    dtype: Literal["float32", "float16"] = Field("float32", description="Weight type; match the bundle's activations.")
    log_level: int = log_level_field(1)

    _level = field_validator("log_level", mode="before")(named_log_level)

    @field_validator("output_path")
    @classmethod
    def _suffix(cls, value: str) -> str:
        if not value.endswith(".onnx_adapter"):
            raise ValueError(f"{value!r} should end in .onnx_adapter")
        return value


GGUF_QUANTIZATIONS = ("f32", "f16", "q8_0", "q4_0")  # what the gguf package itself can write


class ModelExportConfig(Section):
    """`slmops export`: the tuned model for the tools users run it with: `merged` (the adapter
    merged into the base, a Hugging Face folder that from_pretrained loads) or `gguf` (one
    file for llama.cpp and Ollama, with a Modelfile), each checked against PyTorch.

    model_name_or_path: models/tone/ft      # an slmops finetune output: its adapter is merged
    format: gguf
    quantization: q8_0
    output_path: models/tone/gguf
    """

    model_name_or_path: str = Field(description="An slmops finetune output (its adapter is merged), a Hugging Face folder, a "
                                    "built-in name or a Hub id.", json_schema_extra={"cli": ["-m"]})
    adapter_path: str | None = Field(None, description="A PEFT LoRA adapter to merge (default: the finetune output's own).",
                                     json_schema_extra={"cli": ["-a"]})
    format: Literal["merged", "gguf", "gguf_lora"] = Field(
        "merged", description="merged: a Hugging Face folder; gguf: one GGUF file for llama.cpp / Ollama (llama-architecture "
        "models: SmolLM2, Llama 3.x); gguf_lora: the base as GGUF plus the adapter as a GGUF LoRA (llama.cpp --lora, Ollama ADAPTER).")
    quantization: str = Field("q8_0", description="GGUF weight type: f32, f16, q8_0 or q4_0 (the norms stay f32). K-quants "
                              "(q4_k_m...): write f16, then llama.cpp's llama-quantize.")
    output_path: str = Field(description="Folder to write (must be new or empty).", json_schema_extra={"cli": ["-o"]})
    check_prompts: int = Field(3, ge=0, description="Prompts the export is checked on against PyTorch (greedy tokens, logits); 0 skips.")
    trust_remote_code: bool = Field(False, description="Allow model code from the model's folder (only for models you trust).")
    log_level: int = log_level_field(1)

    _level = field_validator("log_level", mode="before")(named_log_level)

    @field_validator("quantization")
    @classmethod
    def _known(cls, value: str) -> str:
        value = value.lower()
        if value not in GGUF_QUANTIZATIONS:
            tip = (" K-quants are made by llama.cpp's quantizer: export f16, then `llama-quantize model-f16.gguf "
                   f"model-{value}.gguf {value.upper()}`" if "_k" in value else "")
            raise ValueError(f"{value!r} is not one of {', '.join(GGUF_QUANTIZATIONS)}.{tip}")
        return value
