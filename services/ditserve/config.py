"""Typed configuration: one YAML file → one PipelineConfig, shared by every service.

The same file drives the local launcher (`ditserve up --config`) and the Kubernetes
ConfigMap. Flags override the file; environment variables are read here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from ditserve.common.status import UserError

# The spellings of a choice, shared by the config, the codec, the samplers, the
# coordinator's request spec and the command-line flags.
WireDtype = Literal["bf16", "fp16", "fp32"]
"""Activation dtype between stages."""
SamplerName = Literal["ddpm", "ddim", "dpm-solver++"]
"""A sampler of sampling/registry.py."""
GuidanceChannels = Literal["first3", "all"]
"""The eps channels guidance applies to: the reference's first 3, or all."""
PreviewMode = Literal["none", "approximate", "decoded"]
"""Previews during denoising: none, the linear latent→RGB map, or the VAE."""
GenerationMode = Literal["exact", "async"]
"""How a request uses the chain: exact steps, or AsyncDiff-style pipelining
(docs/ARCHITECTURE.md §4, "Modes")."""

WIRE_DTYPES: tuple[WireDtype, ...] = get_args(WireDtype)
Transport = Literal["auto", "grpc", "shm"]
TRANSPORTS: tuple[Transport, ...] = get_args(Transport)


class ConfigError(UserError, ValueError):
    """A configuration value that is missing or wrong, with its dotted name (a ValueError
    too, as before, for callers that catch that)."""


@dataclass
class ModelConfig:
    """Which DiT to serve."""

    checkpoint: str = ""
    """DiT weights: an official .pt, a diffusers folder or a ditserve .safetensors file.
    Empty means the embedded demo model."""
    name: str | None = None
    """Config name such as "DiT-XL/2", needed only when the file cannot tell (official .pt
    files of non-standard shapes)."""
    class_names: str = ""
    """Optional file of class names, one per line. Empty: the checkpoint's own
    (`class_names.txt` beside the file, as the demo model ships them), else the ImageNet
    names for 1000-class models, else "class N"."""


@dataclass
class StageConfig:
    """One pipeline stage."""

    address: str
    """host:port that the previous stage (or the coordinator) dials."""
    listen: str = ""
    """host:port to bind; empty means the address's port on all interfaces."""
    blocks: str = ""
    """Explicit block range "START:END"; empty means an equal share."""
    device: str = "cpu"
    """Compute device: "cpu", "cuda" or "cuda:N"."""
    cuda_graphs: bool = True
    """On a CUDA device, replay the forward as CUDA graphs, one per padded batch size
    (1, 2, 4, 8, then every 8); false runs every forward eagerly. Ignored on a CPU."""

    def listen_address(self) -> str:
        return self.listen or f"[::]:{self.address.rsplit(':', 1)[-1]}"


@dataclass
class CoordinatorConfig:
    """The denoising loop's service and its limits."""

    address: str = "127.0.0.1:50050"
    """host:port that clients dial."""
    listen: str = ""
    """host:port to bind; empty means the address's port on all interfaces."""
    max_queued_requests: int = 64
    """Requests admitted but not finished; beyond it Generate fails RESOURCE_EXHAUSTED."""
    max_resumed_requests: int = 16
    """Reserve beyond max_queued_requests for requests a client sends again after its
    stream broke (GenerateRequest.resumed: this coordinator restarted), so that a full
    queue of fresh requests does not refuse work that was accepted once; 0: no reserve."""
    max_rows_per_microbatch: int = 32
    """Most rows (images, times 2 with guidance) in one microbatch; at most the stages'
    max_batch_size. A guided request of max_images_per_request images must fit."""
    microbatches_in_flight: int = 0
    """Microbatches kept in flight along the chain; 0 means the number of stages."""
    max_images_per_request: int = 16
    """Most class labels one request may ask for."""
    default_sampler: SamplerName = "ddpm"
    """Sampler of requests that name none: "ddpm", "ddim" or "dpm-solver++"."""
    default_guidance_scale: float = 4.0
    """Guidance scale of requests that give none (1 disables guidance)."""
    unavailable_grace_seconds: float = 120.0
    """How long a request without a deadline of its own waits for the chain or the
    decoder to come back (UNAVAILABLE, or RESOURCE_EXHAUSTED from an overloaded stage):
    its microbatch (or its decode) is resent with exponential backoff capped at 2 s, each
    wait logged as a warning, until then. A request with a deadline waits until its
    deadline. Long enough for a crashed stage to be restarted and load its weights."""
    microbatch_timeout_seconds: float = 5.0
    """Least time a microbatch may take on the chain before it is deemed lost (a frozen
    stage) and resent: the limit is max(this, 10x the p99 of recent round trips), and
    12x this until the first round trips are measured."""
    max_receive_bytes: int = 64 * 1024
    """Largest message the public port accepts: a GenerateRequest is a few hundred bytes,
    so a larger one is refused RESOURCE_EXHAUSTED before it costs memory."""
    stage_health_interval_seconds: float = 10.0
    """How often the coordinator describes the chain on its own (DescribeChain) to keep
    each stage's `serving` in GetModelInfo and `dit_coordinator_stage_serving` current
    when nobody asks; 0 turns it off."""
    default_async_warmup_steps: int = 5
    """Exact steps an async request runs before pipelining starts, when it gives none
    (capped at its step count). 5 keeps the demo model's judge accuracy at exact's level
    (BENCHMARKS.md, "Latency of one request")."""
    async_x0_trend: float = 0.5
    """Async mode: how far a stale output's x0 prediction is moved on by its change over
    the step before, per step of staleness (sampling/stale.py), 0..1: 0 keeps the x0 of
    the older latents; 1 extrapolates a full step (overshoots on fast solvers)."""

    def listen_address(self) -> str:
        return self.listen or f"[::]:{self.address.rsplit(':', 1)[-1]}"


@dataclass
class DecoderConfig:
    """The VAE decoder service."""

    address: str = ""
    """host:port of the decoder; empty means no decoder (latents only)."""
    listen: str = ""
    """host:port to bind; empty means the address's port on all interfaces."""
    vae: str = ""
    """A diffusers AutoencoderKL folder; empty means the embedded demo VAE."""
    device: str = "cpu"
    """Compute device of the VAE."""
    max_batch_size: int = 8
    """Most latents decoded in one VAE call."""

    def listen_address(self) -> str:
        return self.listen or f"[::]:{self.address.rsplit(':', 1)[-1]}"


@dataclass
class SecurityConfig:
    """TLS on every port, mTLS between services, bearer tokens on the public API (one
    section for the whole pipeline; docs/ in security/__init__.py)."""

    tls: bool = False
    """Serve TLS on every gRPC port and dial every internal hop (coordinator → stage 0,
    stage K → stage K+1, coordinator → decoder) with mTLS, `cert` as client certificate.
    Stages and the decoder then accept only peers with a certificate from `ca`."""
    ca: str = ""
    """PEM file of the pipeline's CA: verifies the peers' certificates."""
    cert: str = ""
    """PEM certificate chain of this service. "{service}" is replaced by the service's
    name (coordinator, decoder, stage-K), so that one file can describe a local pipeline."""
    key: str = ""
    """PEM private key of `cert` ("{service}" likewise)."""
    tokens: str = ""
    """File of the bearer tokens admitted on the coordinator's public API, as sha256 hashes
    ("sha256:HEX [name]" per line; `ditserve token`). Empty: no token is asked for."""
    verify_peer_identity: bool = True
    """With tls: each service accepts calls only from the one before it in the chain
    (stage K from stage K-1, stage 0 and the decoder from the coordinator), named by the
    URI SAN spiffe://TRUST_DOMAIN/NAME of its certificate. Off: any certificate of `ca`."""
    trust_domain: str = "ditserve.local"
    """Trust domain of those identity URIs."""
    health_listen: str = ""
    """host:port of a plaintext server that answers grpc.health.v1 only, for probes that
    cannot speak TLS (Kubernetes' native gRPC probes). Empty: none."""
    allow_plaintext_off_loopback: bool = False
    """Serve plaintext on a non-loopback address (logged as a warning). Without it such a
    server refuses to start: plaintext is never the silent default off loopback."""

    def validate(self) -> SecurityConfig:
        for f in dataclasses.fields(self):  # a quoted "false" must not turn TLS on
            kind = bool if f.type in ("bool", bool) else str
            if not isinstance(getattr(self, f.name), kind):
                raise ConfigError(f"security.{f.name} must be a {kind.__name__}, got "
                                  f"{getattr(self, f.name)!r}")
        if self.tls:
            missing = [n for n in ("ca", "cert", "key") if not getattr(self, n)]
            if missing:
                raise ConfigError(f"security.tls needs security.{missing[0]} (a PEM file)")
        if not self.trust_domain or "/" in self.trust_domain:
            raise ConfigError(f"security.trust_domain must be a name without '/', got "
                              f"{self.trust_domain!r}")
        host, _, port = self.health_listen.rpartition(":")
        if self.health_listen and not (host and port.isdigit()):
            raise ConfigError(f"security.health_listen must be host:port, got "
                              f"{self.health_listen!r}")
        return self


@dataclass
class PipelineConfig:
    """One whole pipeline: the model, its stages in chain order, coordinator and decoder."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The DiT served."""
    stages: list[StageConfig] = field(default_factory=list)
    """Stages in chain order; their block ranges must tile the model."""
    wire_dtype: WireDtype = "bf16"
    """Activation dtype between stages: "bf16", "fp16" or "fp32"."""
    max_batch_size: int = 32
    """Most rows a stage accepts in one microbatch."""
    transport: Transport = "auto"
    """How activations travel from a stage to the next: "auto" (through shared memory when
    the two share a host and an IPC namespace, which a probe proves when the stream
    opens; CUDA IPC when both compute on CUDA; else bytes over gRPC), "grpc" (always bytes
    over gRPC) or "shm" (shared memory or CUDA IPC required: microbatches fail
    FAILED_PRECONDITION when the probe fails). The coordinator's hop to stage 0 takes
    shared memory where the probe passes under auto and shm, else gRPC bytes; under grpc,
    bytes."""
    coordinator: CoordinatorConfig = field(default_factory=CoordinatorConfig)
    """The coordinator."""
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    """The decoder."""
    security: SecurityConfig = field(default_factory=SecurityConfig)
    """TLS, mTLS and tokens; the default serves plaintext on loopback only."""

    def validate(self) -> PipelineConfig:
        self.security.validate()
        _check_types(self, "")
        if not self.stages:
            raise ConfigError("stages: at least one stage is needed")
        explicit = [bool(s.blocks) for s in self.stages]
        if any(explicit) and not all(explicit):
            raise ConfigError("stages: give blocks for every stage or for none")
        for i, stage in enumerate(self.stages):
            if ":" not in stage.address:
                raise ConfigError(f"stages[{i}].address must be host:port, got {stage.address!r}")
        if self.max_batch_size < 1:
            raise ConfigError("max_batch_size must be positive")
        coordinator = self.coordinator
        if coordinator.unavailable_grace_seconds < 0 or coordinator.microbatch_timeout_seconds <= 0:
            raise ConfigError("coordinator.unavailable_grace_seconds must be >= 0 and "
                              "coordinator.microbatch_timeout_seconds > 0")
        if coordinator.max_resumed_requests < 0:
            raise ConfigError(f"coordinator.max_resumed_requests must be >= 0, got "
                              f"{coordinator.max_resumed_requests}")
        if coordinator.max_receive_bytes < 1024:
            raise ConfigError(f"coordinator.max_receive_bytes must be at least 1024, got "
                              f"{coordinator.max_receive_bytes}")
        if not 0.0 <= coordinator.async_x0_trend <= 1.0:
            raise ConfigError(f"coordinator.async_x0_trend must be in 0..1, got "
                              f"{coordinator.async_x0_trend}")
        if coordinator.default_async_warmup_steps < 0:
            raise ConfigError(f"coordinator.default_async_warmup_steps must be >= 0, got "
                              f"{coordinator.default_async_warmup_steps}")
        if self.coordinator.max_rows_per_microbatch > self.max_batch_size:
            raise ConfigError(f"coordinator.max_rows_per_microbatch "
                              f"({self.coordinator.max_rows_per_microbatch}) exceeds the stages' "
                              f"max_batch_size ({self.max_batch_size})")
        return self


def _build(cls: type, data: Any, where: str) -> Any:
    """A dataclass from a YAML mapping, rejecting unknown keys by their dotted name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key {where + '.' if where else ''}{unknown[0]}")
    values = {}
    for name, value in data.items():
        values[name] = _value(fields[name], value, f"{where}.{name}" if where else name)
    try:
        return cls(**values)
    except TypeError as error:
        raise ConfigError(f"{where or 'config'}: {error}") from None


def _check_types(config: Any, where: str) -> None:
    """Every field of a config dataclass (and of those nested in it) against its type
    hint: a Literal's choices, int, float, str, bool, or None where the hint allows it."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value, name = getattr(config, f.name), f"{where}.{f.name}" if where else f.name
        if dataclasses.is_dataclass(value):
            _check_types(value, name)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                _check_types(item, f"{name}[{i}]")
        elif not _fits(value, hints[f.name]):
            raise ConfigError(f"{name} must be {_describe(hints[f.name])}, got {value!r}")


def _fits(value: Any, hint: Any) -> bool:
    if typing.get_origin(hint) is Literal:
        return value in get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_fits(value, option) for option in get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(choice) for choice in get_args(hint))
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(option) for option in get_args(hint))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            type(None): "null"}.get(hint, str(hint))


def _value(f: dataclasses.Field, value: Any, where: str) -> Any:
    nested = {"model": ModelConfig, "coordinator": CoordinatorConfig, "decoder": DecoderConfig,
              "security": SecurityConfig}
    if f.name in nested and f.type in (nested[f.name].__name__, nested[f.name]):
        return _build(nested[f.name], value, where)
    if f.name == "stages":
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list")
        return [_build(StageConfig, v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def config_from_dict(data: dict[str, Any]) -> PipelineConfig:
    return _build(PipelineConfig, data, "").validate()


def load_config(path: str | Path) -> PipelineConfig:
    """Reads and validates one YAML config file."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read config {path}: {error}") from None
    return config_from_dict(data)


def local_config(num_stages: int, base_port: int, checkpoint: str = "",
                 wire_dtype: WireDtype = "bf16", vae: str = "") -> PipelineConfig:
    """A loopback pipeline: coordinator at base_port, decoder +1, stages +2, +3, ..."""
    stages = [StageConfig(address=f"127.0.0.1:{base_port + 2 + i}") for i in range(num_stages)]
    return PipelineConfig(
        model=ModelConfig(checkpoint=checkpoint), stages=stages, wire_dtype=wire_dtype,
        coordinator=CoordinatorConfig(address=f"127.0.0.1:{base_port}"),
        decoder=DecoderConfig(address=f"127.0.0.1:{base_port + 1}", vae=vae)).validate()


@dataclass(frozen=True)
class Environment:
    """The environment variables ditserve reads (Kubernetes sets them per pod)."""

    config: str = ""
    """DITSERVE_CONFIG: path of the pipeline YAML."""
    stage_index: int | None = None
    """DITSERVE_STAGE_INDEX: which stage of the config this process serves."""
    log_level: str = "INFO"
    """DITSERVE_LOG_LEVEL."""

    @classmethod
    def read(cls) -> Environment:
        index = os.environ.get("DITSERVE_STAGE_INDEX", "")
        if index and not index.isdigit():
            raise ConfigError(f"DITSERVE_STAGE_INDEX must be an integer, got {index!r}")
        return cls(config=os.environ.get("DITSERVE_CONFIG", ""),
                   stage_index=int(index) if index else None,
                   log_level=os.environ.get("DITSERVE_LOG_LEVEL", "INFO"))
