"""Engine configuration: frozen dataclasses with vLLM's flag names, one argparse registration, one factory.

Every node role and the offline LLM build an EngineConfig through `EngineConfig.create(**kwargs)` (Python) or
`EngineConfig.from_cli_args(args)` after `add_engine_args(parser)` (CLI), so defaults and validation live here
once.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field, fields

from pdserve.wire.errors import ConfigError
from pdserve.wire.model_source import resolve_model
from pdserve.wire.serving_flags import json_object_flag

KV_CONNECTORS = ("tcp", "cuda_ipc", "nixl")  # the data planes kvconnector.transport implements

DTYPES = ("auto", "float32", "float16", "bfloat16", "half", "float")
DTYPE_ALIASES = {"half": "float16", "float": "float32"}  # vLLM's spellings


@dataclass(frozen=True)
class ModelConfig:
    model: str
    dtype: str = "auto"  # auto: the checkpoint's dtype on GPU (float32 ones in bfloat16), float32 on CPU
    max_model_len: int | None = None  # None: the checkpoint's max_position_embeddings
    seed: int = 0
    load_format: str = "auto"  # auto: the safetensors; dummy: random weights from config.json (benchmarks)


LOAD_FORMATS = ("auto", "dummy")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    kv_cache_memory: int | None = None  # bytes; on CPU the default is 256 MiB


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1  # ranks per node, one process and device each (engine/tensor_parallel.py)


# Keys read from kv_connector_extra_config (connector-specific); at the top level they are refused with a
# pointer there.
EXTRA_CONFIG_KEYS = ("copy", "block_words", "coalesce_bytes", "kv_secret", "kv_timeout")


@dataclass(frozen=True)
class KVTransferConfig:
    """--kv-transfer-config, vLLM's JSON. pdserve's own connector keys live in `kv_connector_extra_config`
    (here `extra`), as in vLLM: {"copy", "block_words", "coalesce_bytes"} for cuda_ipc, "kv_secret",
    "kv_timeout". kv_rank / kv_parallel_size / kv_buffer_size are accepted for vLLM configs and checked, but
    pdserve pairs nodes per request (no fixed ranks) and writes straight into the KV cache (no separate
    buffer)."""

    kv_connector: str = "tcp"  # tcp | cuda_ipc | nixl (kvconnector.transport)
    kv_role: str = "kv_both"  # kv_producer | kv_consumer | kv_both
    kv_ip: str = "127.0.0.1"
    kv_port: int = 0
    engine_id: str | None = None  # the connector's id in handshakes (default: random)
    kv_rank: int | None = None
    kv_parallel_size: int = 1
    kv_buffer_size: float = 1e9
    kv_buffer_device: str = "cuda"
    extra: dict = field(default_factory=dict)  # kv_connector_extra_config

    @classmethod
    def from_json(cls, text: str | None) -> "KVTransferConfig":
        return cls.from_dict(json_object_flag(text, "--kv-transfer-config"))

    @classmethod
    def from_dict(cls, raw: dict) -> "KVTransferConfig":
        raw = dict(raw)
        extra = raw.pop("kv_connector_extra_config", None) or {}
        if not isinstance(extra, dict):
            raise ConfigError("--kv-transfer-config: kv_connector_extra_config must be a JSON object")
        moved = sorted(k for k in raw if k in EXTRA_CONFIG_KEYS)
        if moved:
            raise ConfigError(
                f"--kv-transfer-config: {', '.join(moved)} belong(s) in kv_connector_extra_config now, e.g. "
                f'{{"kv_connector": "...", "kv_connector_extra_config": {{"{moved[0]}": ...}}}}'
            )
        if raw.pop("kv_connector_module_path", None):
            raise ConfigError("--kv-transfer-config: kv_connector_module_path is not supported (no plugins)")
        known = {f.name for f in fields(cls)} - {"extra"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(
                f"--kv-transfer-config: unknown key(s) {', '.join(unknown)} "
                f"(known: {', '.join(sorted(known))}, kv_connector_extra_config)"
            )
        try:
            cfg = cls(**raw, extra=extra)
        except TypeError as exc:
            raise ConfigError(f"--kv-transfer-config: {exc}") from None
        cfg._check()
        return cfg

    def _check(self) -> None:
        if self.kv_connector not in KV_CONNECTORS:
            raise ConfigError(
                f"kv_connector must be one of {', '.join(KV_CONNECTORS)}, got {self.kv_connector!r}"
            )
        if self.kv_role not in ("kv_producer", "kv_consumer", "kv_both"):
            raise ConfigError(f"kv_role must be kv_producer, kv_consumer or kv_both, got {self.kv_role!r}")
        ints = {"kv_port": self.kv_port, "kv_parallel_size": self.kv_parallel_size}
        if self.kv_rank is not None:
            ints["kv_rank"] = self.kv_rank
        for name, value in ints.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(
                    f"--kv-transfer-config: {name} must be a non-negative integer, got {value!r}"
                )
        if not 0 <= self.kv_port <= 65535 or self.kv_parallel_size < 1:
            raise ConfigError("--kv-transfer-config: kv_port must be 0..65535 and kv_parallel_size >= 1")
        if not isinstance(self.kv_buffer_size, (int, float)) or self.kv_buffer_size <= 0:
            raise ConfigError(
                f"--kv-transfer-config: kv_buffer_size must be positive, got {self.kv_buffer_size!r}"
            )
        if self.kv_buffer_device not in ("cuda", "cpu", "xpu"):
            raise ConfigError(
                f"--kv-transfer-config: kv_buffer_device must be cuda or cpu, got {self.kv_buffer_device!r}"
            )
        if self.engine_id is not None and (
            not isinstance(self.engine_id, str) or not 0 < len(self.engine_id) <= 64
        ):
            raise ConfigError("--kv-transfer-config: engine_id must be a string of 1..64 characters")
        copy = self.extra.get("copy")
        if copy is not None and copy not in ("triton", "torch"):
            raise ConfigError(f"kv_connector_extra_config.copy must be triton or torch, got {copy!r}")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    kv_transfer: KVTransferConfig = KVTransferConfig()
    parallel: ParallelConfig = ParallelConfig()
    device: str = "auto"  # auto | cpu | cuda | cuda:N (rank 0's under tensor parallelism; rank r takes N + r)
    enforce_eager: bool = False

    @classmethod
    def create(cls, model: str, **kwargs) -> "EngineConfig":
        """Flat keyword arguments (vLLM's names, underscores) -> nested config, validated. `model` is a folder
        or a Hugging Face hub id in the local cache (resolved to its snapshot folder here)."""
        model = resolve_model(model, "model")
        groups = {
            "model": ModelConfig,
            "cache": CacheConfig,
            "scheduler": SchedulerConfig,
            "parallel": ParallelConfig,
        }
        parts: dict[str, dict] = {name: {} for name in groups}
        top: dict = {}
        for key, value in kwargs.items():
            owner = next((g for g, c in groups.items() if key in {f.name for f in fields(c)}), None)
            if owner is not None:
                parts[owner][key] = value
            elif key in ("device", "enforce_eager"):
                top[key] = value
            elif key == "kv_transfer_config":
                top["kv_transfer"] = _kv_transfer_config(value)
            else:
                raise ConfigError(f"unknown engine argument {key!r}")
        config = cls(
            model=ModelConfig(model=model, **parts["model"]),
            cache=CacheConfig(**parts["cache"]),
            scheduler=SchedulerConfig(**parts["scheduler"]),
            parallel=ParallelConfig(**parts["parallel"]),
            **top,
        )
        config.validate()
        return config

    def validate(self) -> None:
        c, s, m = self.cache, self.scheduler, self.model
        if c.block_size <= 0 or c.block_size & (c.block_size - 1):
            raise ConfigError(f"--block-size must be a positive power of two, got {c.block_size}")
        if not 0.0 < c.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"--gpu-memory-utilization must be in (0, 1], got {c.gpu_memory_utilization}")
        if c.num_gpu_blocks_override is not None and c.num_gpu_blocks_override < 1:
            raise ConfigError("--num-gpu-blocks-override must be at least 1")
        if s.max_num_seqs < 1:
            raise ConfigError("--max-num-seqs must be at least 1")
        if s.max_num_batched_tokens < 1:
            raise ConfigError("--max-num-batched-tokens must be at least 1")
        if m.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {m.dtype!r}")
        if m.max_model_len is not None and m.max_model_len < 1:
            raise ConfigError("--max-model-len must be at least 1")
        tp = self.parallel.tensor_parallel_size
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
            raise ConfigError(f"--tensor-parallel-size must be a positive integer, got {tp!r}")
        if m.load_format not in LOAD_FORMATS:
            raise ConfigError(
                f"--load-format must be one of {', '.join(LOAD_FORMATS)}, got {m.load_format!r}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


def _kv_transfer_config(value) -> KVTransferConfig:
    if value is None or isinstance(value, KVTransferConfig):
        return value or KVTransferConfig()
    return KVTransferConfig.from_json(value if isinstance(value, str) else json.dumps(value))


def add_engine_args(parser: argparse.ArgumentParser, model_required: bool = True) -> None:
    """The node flags, named as vLLM names them."""
    g = parser.add_argument_group("engine")
    g.add_argument(
        "--model",
        required=model_required,
        help="the checkpoint: a folder or a Hugging Face hub id in the local cache (org/name; offline)",
    )
    g.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help="auto: the checkpoint's dtype on GPU (a float32 checkpoint runs in bfloat16), float32 on CPU; "
        "half = float16, float = float32",
    )
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--load-format",
        default="auto",
        choices=LOAD_FORMATS,
        help="auto: the checkpoint's safetensors; dummy: random weights (seeded by --seed) from config.json "
        "alone, for benchmarks of shapes too big to write out",
    )
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--num-gpu-blocks-override", type=int, default=None)
    g.add_argument("--kv-cache-memory", type=int, default=None, help="KV cache bytes (CPU default 256 MiB)")
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        default=1,
        help="ranks (processes, GPUs) this node's model is split over: NCCL on GPUs, gloo on CPU",
    )
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    g.add_argument(
        "--kv-transfer-config", default=None, help='JSON, e.g. {"kv_connector":"tcp","kv_role":"kv_both"}'
    )


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig.create(
        model=args.model,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        seed=args.seed,
        load_format=args.load_format,
        block_size=args.block_size,
        enable_prefix_caching=args.enable_prefix_caching,
        gpu_memory_utilization=args.gpu_memory_utilization,
        num_gpu_blocks_override=args.num_gpu_blocks_override,
        kv_cache_memory=args.kv_cache_memory,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        device=args.device,
        tensor_parallel_size=args.tensor_parallel_size,
        enforce_eager=args.enforce_eager,
        kv_transfer_config=args.kv_transfer_config,
    )
