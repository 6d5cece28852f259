"""A pretrained vision-language captioner (Hugging Face `transformers`) as a yardstick.

Our CNN-RNN models are compared against a large pretrained image-to-text model
captioning the same test images with the same decoding settings (beam size,
maximum length). The LLM captions are cleaned like our references and nothing
else: no LLM touches our own captions.

Supported model families (detected from the model's `config.json`):

- BLIP (`model_type="blip"`): `BlipForConditionalGeneration` + `BlipProcessor`,
  e.g. `Salesforce/blip-image-captioning-base`.
- GIT (`model_type="git"`): `AutoModelForCausalLM` + `AutoProcessor`,
  e.g. `microsoft/git-base-coco`.
- Vision encoder-decoder (`model_type="vision-encoder-decoder"`, e.g. ViT-GPT2):
  `VisionEncoderDecoderModel` + image processor + tokenizer,
  e.g. `nlpconnect/vit-gpt2-image-captioning`.

Offline (no network, or `HF_HUB_OFFLINE=1`), a model that is neither a local
folder nor in the Hugging Face cache raises `LLMUnavailable` with a message
saying how to provide it; `llm_column` turns that into an "unavailable" entry so
the rest of a report is still written.

Example:

```python
captioner = LLMCaptioner.load("Salesforce/blip-image-captioning-base")
result = captioner.caption(["dog.jpg", "cat.png"], num_beams=3, max_length=15)
result.captions["dog.jpg"]
result.resources["throughput_images_per_s"]
```
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from caption_tf.data.images import BadImageError, open_rgb
from caption_tf.data.text import clean_caption
from caption_tf.evaluation.resources import PeakRSS

DEFAULT_LLM = "Salesforce/blip-image-captioning-base"

# Decoding defaults mirror caption_tf.config (EvalConfig.beam_size, TextConfig.max_length).
DEFAULT_NUM_BEAMS = 3
DEFAULT_MAX_LENGTH = 15
DEFAULT_BATCH_SIZE = 16

# A hub that does not answer within this time counts as unreachable: better a quick
# "unavailable" than transformers' own retries (about 25 s here without network).
NETWORK_PROBE_TIMEOUT_S = 3.0
BYTES_PER_MB = 1024.0 * 1024.0
LATENCY_PERCENTILE = 95

_TRUE_STRINGS = ("1", "true", "yes", "on")

# model_type -> how to load it; see module docstring.
KIND_BLIP = "blip"
KIND_GIT = "git"
KIND_VISION_ENCODER_DECODER = "vision-encoder-decoder"
SUPPORTED_KINDS = (KIND_BLIP, KIND_GIT, KIND_VISION_ENCODER_DECODER)
_ARCHITECTURE_KINDS = {
    "BlipForConditionalGeneration": KIND_BLIP,
    "GitForCausalLM": KIND_GIT,
    "VisionEncoderDecoderModel": KIND_VISION_ENCODER_DECODER,
}


class LLMUnavailable(RuntimeError):
    """The LLM captioner cannot run here; the message names the model and the fix."""


class UnsupportedLLM(LLMUnavailable):
    """The model exists but is not an image-to-text family this module knows."""


def how_to_provide(model: str) -> str:
    """The instructions appended to every "model not available" message.

    Example:

    >>> "hf download" in how_to_provide("Salesforce/blip-image-captioning-base")
    True
    """
    return (
        f"To use {model!r} without network: on a machine with internet run "
        f"`hf download {model}` (older huggingface_hub: `huggingface-cli download {model}`), "
        f"copy its Hugging Face cache (HF_HOME, by default ~/.cache/huggingface) here and set "
        f"HF_HOME to it; or save model and processor with "
        f"`.from_pretrained({model!r}).save_pretrained('/path/to/folder')` "
        f"and pass `--llm /path/to/folder`."
    )


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE_STRINGS


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set (read now, not at import).

    Example:

    ```python
    hub_offline()  # in a shell with `export HF_HUB_OFFLINE=1`
    ```
    """
    if _env_flag("HF_HUB_OFFLINE") or _env_flag("TRANSFORMERS_OFFLINE"):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def hub_endpoint() -> str:
    """The Hugging Face Hub address downloads go to (HF_ENDPOINT or huggingface.co)."""
    endpoint = os.environ.get("HF_ENDPOINT")
    if endpoint:
        return endpoint.rstrip("/")
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_unreachable_reason(timeout_s: float = NETWORK_PROBE_TIMEOUT_S) -> Optional[str]:
    """None when the Hub answers within `timeout_s`, else why not (one quick request).

    Uses huggingface_hub's own HTTP session, so proxies configured for it apply.

    Example:

    ```python
    hub_unreachable_reason() is None  # on a machine with internet
    ```
    """
    from huggingface_hub.utils import get_session

    endpoint = hub_endpoint()
    try:
        get_session().head(endpoint, timeout=timeout_s)
    except Exception as exc:  # any transport failure means "not reachable": report it, do not retry
        return f"cannot reach {endpoint} ({type(exc).__name__}: {exc})"
    return None


def _looks_like_path(model: str) -> bool:
    """Hub ids are "name" or "owner/name"; anything else is meant as a folder."""
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model


def _resolve_source(model: str) -> tuple[str, bool, str]:
    """(what to pass to from_pretrained, local_files_only, how it was found).

    A local folder is used as is. A hub id is loaded from the cache only when offline
    or when the hub is unreachable; then a missing cache entry becomes LLMUnavailable.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LLMUnavailable(
                f"LLM model folder {str(path)!r} has no config.json: it is not a saved "
                f"transformers model. {how_to_provide(DEFAULT_LLM)}"
            )
        return str(path), True, "local folder"
    if path.exists() or _looks_like_path(model):
        raise LLMUnavailable(
            f"LLM model folder {str(path)!r} not found (or not a folder). {how_to_provide(DEFAULT_LLM)}"
        )
    if hub_offline():
        return model, True, "offline mode (HF_HUB_OFFLINE set): Hugging Face cache only"
    reason = hub_unreachable_reason()
    if reason:
        return model, True, f"no network ({reason}): Hugging Face cache only"
    return model, False, "Hugging Face Hub"


def _unavailable(model: str, origin: str, exc: BaseException) -> LLMUnavailable:
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if origin.endswith("cache only"):
        what = f"LLM model {model!r} is not (fully) in the local Hugging Face cache; {origin}."
    else:
        what = f"LLM model {model!r} could not be loaded from the {origin}."
    return LLMUnavailable(f"{what} ({type(exc).__name__}: {detail}). {how_to_provide(model)}")


def detect_kind(config: Any) -> str:
    """The model family of a transformers config: 'blip', 'git' or 'vision-encoder-decoder'.

    Example:

    ```python
    detect_kind(transformers.BlipConfig())
    ```
    """
    model_type = getattr(config, "model_type", None)
    if model_type in SUPPORTED_KINDS:
        return model_type
    for arch in getattr(config, "architectures", None) or []:
        if arch in _ARCHITECTURE_KINDS:
            return _ARCHITECTURE_KINDS[arch]
    raise UnsupportedLLM(
        f"model_type {model_type!r} (architectures {getattr(config, 'architectures', None)}) is not a "
        f"supported image-to-text family; supported: {', '.join(SUPPORTED_KINDS)}."
    )


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LLMUnavailable(f"LLM device {device!r} requested but torch sees no CUDA GPU.")
    return device


def _torch_dtype(name: str) -> Any:
    import torch

    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise ValueError(f"LLM dtype {name!r} unknown; expected one of {sorted(dtypes)}")
    return dtypes[name]


@dataclass
class LLMSettings:
    """Decoding settings shared with our own decoders, plus the LLM's batch size.

    `max_length` counts tokens including start and end, like `TextConfig.max_length`;
    the LLM may therefore generate `max_length - 1` new (sub-word) tokens.

    Example:

    ```python
    LLMSettings.from_config(load_config("minimal")).num_beams
    ```
    """

    num_beams: int = DEFAULT_NUM_BEAMS
    max_length: int = DEFAULT_MAX_LENGTH
    batch_size: int = DEFAULT_BATCH_SIZE
    length_penalty: Optional[float] = None  # None: the model's own default

    @classmethod
    def from_config(cls, cfg: Any) -> "LLMSettings":
        """Read beam size, maximum length, length penalty and eval batch size from a Config."""
        return cls(
            num_beams=cfg.eval.beam_size,
            max_length=cfg.text.max_length,
            batch_size=cfg.eval.eval_batch_size,
            length_penalty=cfg.eval.length_penalty,
        )

    @classmethod
    def coerce(cls, settings: Any) -> "LLMSettings":
        """Accept LLMSettings, a Config, a mapping of LLMSettings fields, or None."""
        if settings is None:
            return cls()
        if isinstance(settings, cls):
            return settings
        if isinstance(settings, Mapping):
            unknown = set(settings) - set(cls.__dataclass_fields__)
            if unknown:
                raise ValueError(f"Unknown LLM settings {sorted(unknown)}; expected {sorted(cls.__dataclass_fields__)}")
            return cls(**settings)
        if hasattr(settings, "eval") and hasattr(settings, "text"):
            return cls.from_config(settings)
        raise TypeError(f"LLM settings must be LLMSettings, a Config or a dict, got {type(settings).__name__}")


@dataclass
class LLMResult:
    """Captions of one `LLMCaptioner.caption` call, keyed by image path (input order).

    `captions` are cleaned like our references; `raw_captions` are the model's text;
    `skipped` lists unreadable images with the reason; `resources` holds latency,
    throughput, peak memory and parameter count.
    """

    captions: dict[str, str] = field(default_factory=dict)
    raw_captions: dict[str, str] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)
    resources: dict[str, Any] = field(default_factory=dict)


class LLMCaptioner:
    """A pretrained image-to-text model behind one `caption(paths)` call.

    Example:

    ```python
    captioner = LLMCaptioner.load("/models/blip-base", device="cpu")
    captioner.caption(["a.jpg"], num_beams=1).captions
    ```
    """

    def __init__(self, model_name: str, kind: str, model: Any, image_processor: Any, tokenizer: Any,
                 device: str, dtype: Any, load_info: dict[str, Any]):
        self.model_name = model_name
        self.kind = kind
        self.model = model
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.load_info = load_info
        self.num_parameters = model.num_parameters()

    @classmethod
    def load(cls, model: str = DEFAULT_LLM, device: str = "auto", dtype: str = "float32",
             cache_dir: Optional[str] = None) -> "LLMCaptioner":
        """Load a hub id or a local folder; raises LLMUnavailable when it cannot be had.

        `device="auto"` picks CUDA when torch sees a GPU, else CPU. `cache_dir`
        overrides the Hugging Face cache (default: HF_HOME / HF_HUB_CACHE).
        """
        try:
            import torch
            import transformers
        except ImportError as exc:
            raise LLMUnavailable(
                f"LLM model {model!r} needs PyTorch and transformers: pip install torch transformers ({exc})"
            ) from None
        source, local_only, origin = _resolve_source(model)
        resolved_device = _resolve_device(device)
        torch_dtype = _torch_dtype(dtype)
        kwargs = {"local_files_only": local_only, "cache_dir": cache_dir}
        rss_before = _current_rss()
        start = time.perf_counter()
        try:
            config = transformers.AutoConfig.from_pretrained(source, **kwargs)
            kind = detect_kind(config)
            loaded, image_processor, tokenizer = _load_parts(transformers, kind, source, torch_dtype, kwargs)
        except UnsupportedLLM as exc:
            raise UnsupportedLLM(f"LLM model {model!r}: {exc}") from None
        except (OSError, ValueError, KeyError) as exc:  # missing files, bad ids, unknown configs
            raise _unavailable(model, origin, exc) from exc
        loaded.to(resolved_device)
        loaded.eval()
        load_info = {
            "source": origin,
            "load_seconds": round(time.perf_counter() - start, 3),
            "load_rss_delta_mb": round((_current_rss() - rss_before) / BYTES_PER_MB, 1),
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
        }
        return cls(model, kind, loaded, image_processor, tokenizer, resolved_device, torch_dtype, load_info)

    def _generate(self, images: list, num_beams: int, max_length: int, length_penalty: Optional[float]) -> list[str]:
        import torch

        pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        pixel_values = pixel_values.to(self.device, dtype=self.dtype)
        generate_kwargs: dict[str, Any] = {
            "num_beams": num_beams,
            "do_sample": False,
            # Our max_length counts the start token, which the LLM does not generate.
            "max_new_tokens": max(1, max_length - 1),
        }
        if num_beams > 1:
            generate_kwargs["early_stopping"] = True
            if length_penalty is not None:
                generate_kwargs["length_penalty"] = length_penalty
        if self.kind == KIND_VISION_ENCODER_DECODER and self.model.generation_config.pad_token_id is None:
            # GPT-2 decoders have no pad token; batched generation needs one. (BLIP passes
            # its own pad_token_id to generate, so adding one there would clash.)
            generate_kwargs["pad_token_id"] = self.tokenizer.pad_token_id or self.tokenizer.eos_token_id
        with torch.inference_mode():
            token_ids = self.model.generate(pixel_values=pixel_values, **generate_kwargs)
        return self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)

    def caption(self, images: Sequence[str | Path], batch_size: int = DEFAULT_BATCH_SIZE,
                num_beams: int = DEFAULT_NUM_BEAMS, max_length: int = DEFAULT_MAX_LENGTH,
                length_penalty: Optional[float] = None) -> LLMResult:
        """Caption image files in batches; unreadable files are skipped with a reason.

        `num_beams=1` is greedy decoding. Latency is per image (batch time divided by
        the images in the batch, image reading included); throughput is images per
        second over the whole call, first-batch warm-up included.
        """
        if batch_size < 1 or num_beams < 1 or max_length < 2:
            raise ValueError(
                f"LLM caption settings need batch_size >= 1, num_beams >= 1, max_length >= 2; got "
                f"batch_size={batch_size}, num_beams={num_beams}, max_length={max_length}"
            )
        result = LLMResult()
        latencies_ms: list[float] = []
        paths = [str(p) for p in images]
        gpu = self.device.startswith("cuda")
        gpu_before = self._reset_gpu_peak() if gpu else 0
        start = time.perf_counter()
        with PeakRSS() as rss:
            for first in range(0, len(paths), batch_size):
                batch_start = time.perf_counter()
                batch_paths, pil_images = self._read_batch(paths[first:first + batch_size], result.skipped)
                if not pil_images:
                    continue
                texts = self._generate(pil_images, num_beams, max_length, length_penalty)
                per_image_ms = (time.perf_counter() - batch_start) * 1000.0 / len(pil_images)
                latencies_ms.extend([per_image_ms] * len(pil_images))
                for path, text in zip(batch_paths, texts):
                    result.raw_captions[path] = text
                    result.captions[path] = clean_caption(text)  # as the references; content left alone ("arafed" stays)
        total_s = time.perf_counter() - start
        result.resources = self._resources(
            latencies_ms, total_s, rss, gpu_before if gpu else None,
            {"batch_size": batch_size, "num_beams": num_beams, "max_length": max_length,
             "length_penalty": length_penalty},
        )
        result.resources["images_skipped"] = len(result.skipped)
        return result

    @staticmethod
    def _read_batch(paths: list[str], skipped: list[dict]) -> tuple[list[str], list]:
        kept, pil_images = [], []
        for path in paths:
            try:
                image, _ = open_rgb(path)
            except BadImageError as exc:
                skipped.append({"path": path, "reason": str(exc)})
                continue
            kept.append(path)
            pil_images.append(image)
        return kept, pil_images

    def _reset_gpu_peak(self) -> int:
        import torch

        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return torch.cuda.memory_allocated(self.device)

    def _resources(self, latencies_ms: list[float], total_s: float, rss: PeakRSS,
                   gpu_before: Optional[int], settings: dict[str, Any]) -> dict[str, Any]:
        import torch

        images = len(latencies_ms)
        resources: dict[str, Any] = {
            "model": self.model_name,
            "kind": self.kind,
            "device": self.device,
            "dtype": str(self.dtype).replace("torch.", ""),
            "parameters": self.num_parameters,
            "images": images,
            **settings,
            "total_seconds": round(total_s, 3),
            "latency_ms_mean": round(float(np.mean(latencies_ms)), 2) if images else None,
            "latency_ms_p50": round(float(np.percentile(latencies_ms, 50)), 2) if images else None,
            "latency_ms_p95": round(float(np.percentile(latencies_ms, LATENCY_PERCENTILE)), 2) if images else None,
            "throughput_images_per_s": round(images / total_s, 3) if images and total_s > 0 else None,
            "cpu_threads": torch.get_num_threads(),
            **self.load_info,
        }
        if gpu_before is not None:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            resources.update({
                "memory_measure": "torch.cuda.max_memory_allocated",
                "peak_memory_mb": round(peak / BYTES_PER_MB, 1),
                "memory_delta_mb": round((peak - gpu_before) / BYTES_PER_MB, 1),
                "gpu_name": torch.cuda.get_device_name(self.device),
            })
        else:
            resources.update({
                "memory_measure": "process RSS (psutil, sampled)",
                "peak_memory_mb": round(rss.peak / BYTES_PER_MB, 1),
                "memory_delta_mb": round((rss.peak - rss.start) / BYTES_PER_MB, 1),
            })
        return resources


def _load_parts(transformers: Any, kind: str, source: str, torch_dtype: Any,
                kwargs: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(model, image processor, tokenizer) of one supported family."""
    if kind == KIND_BLIP:
        model = transformers.BlipForConditionalGeneration.from_pretrained(source, dtype=torch_dtype, **kwargs)
        processor = transformers.BlipProcessor.from_pretrained(source, **kwargs)
        return model, processor.image_processor, processor.tokenizer
    if kind == KIND_GIT:
        model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
        processor = transformers.AutoProcessor.from_pretrained(source, **kwargs)
        return model, processor.image_processor, processor.tokenizer
    model = transformers.VisionEncoderDecoderModel.from_pretrained(source, dtype=torch_dtype, **kwargs)
    image_processor = transformers.AutoImageProcessor.from_pretrained(source, **kwargs)
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, **kwargs)
    return model, image_processor, tokenizer


def _current_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _out_of_memory_errors() -> tuple[type[BaseException], ...]:
    try:
        import torch
    except ImportError:
        return (MemoryError,)
    return (MemoryError, torch.cuda.OutOfMemoryError)


def llm_column(model: Optional[str], image_paths: Mapping[str, str | Path] | Sequence[str | Path],
               settings: Any = None, device: str = "auto", dtype: str = "float32") -> dict[str, Any]:
    """Caption the report's images with an LLM, or say why it could not.

    `image_paths` is {image_id: path} (captions keyed by image id) or a list of paths
    (keyed by path). `settings` is LLMSettings, a Config (beam size, max length,
    length penalty and eval batch size are read from it) or a dict. `model=None`
    uses DEFAULT_LLM. Returns
    `{"available": True, "model", "captions", "raw_captions", "skipped", "resources"}`
    or `{"available": False, "model", "reason"}`.

    Example:

    ```python
    column = llm_column("/models/blip", {"img1": "img1.jpg"}, cfg)
    column["captions"]["img1"] if column["available"] else column["reason"]
    ```
    """
    model = model or DEFAULT_LLM
    decoding = LLMSettings.coerce(settings)
    ids_by_path: dict[str, list[str]] = {}
    if isinstance(image_paths, Mapping):
        for image_id, path in image_paths.items():
            ids_by_path.setdefault(str(path), []).append(str(image_id))
    else:
        for path in image_paths:
            ids_by_path.setdefault(str(path), []).append(str(path))
    try:
        captioner = LLMCaptioner.load(model, device=device, dtype=dtype)
        result = captioner.caption(list(ids_by_path), **asdict(decoding))
    except LLMUnavailable as exc:
        return {"available": False, "model": model, "reason": str(exc)}
    except _out_of_memory_errors() as exc:
        # Too big for this machine is a property of the comparison, not a report crash.
        reason = f"LLM model {model!r} ran out of memory on {device!r} ({type(exc).__name__}: {exc})"
        return {"available": False, "model": model, "reason": reason}
    captions = {i: text for path, text in result.captions.items() for i in ids_by_path[path]}
    raw = {i: text for path, text in result.raw_captions.items() for i in ids_by_path[path]}
    return {
        "available": True,
        "model": model,
        "captions": captions,
        "raw_captions": raw,
        "skipped": result.skipped,
        "resources": result.resources,
    }
