"""Reading DiT weights in every format users hold, and writing ditserve's own.

- official: `DiT-XL-2-256x256.pt` (a raw state dict, or `{"ema": ...}` as training
  checkpoints hold), read with `weights_only=True`;
- diffusers: a pipeline folder or its `transformer/` (config.json + safetensors or .bin);
  the keys are mapped back, the embedders taken from block 0, q/k/v joined;
- ditserve: one safetensors file under the official keys whose metadata records the
  model config and the weight hash, so that the file describes itself.

A reader yields tensors under the official keys, one at a time, so a stage reads only the
tensors of its own blocks from a safetensors file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ditserve.common.status import UserError

from .configs import DIT_CONFIGS, DiTConfig, dit_config, heads_for
from .dit import DiT

DITSERVE_FORMAT = "ditserve.dit.v1"
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read as a DiT, with what is wrong (a ValueError too, as
    before, for callers that catch that)."""


class CheckpointReader:
    """Tensors of a DiT checkpoint under the official state-dict keys."""

    config: DiTConfig
    path: Path

    def keys(self) -> list[str]:
        raise NotImplementedError

    def __iter__(self):
        return iter(self.keys())

    def __contains__(self, key: object) -> bool:
        return key in set(self.keys())

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def nbytes(self, key: str) -> int:
        return self.get(key).nbytes

    def weight_hash(self) -> str:
        """sha256 of every tensor's key, dtype, shape and bytes, in key order.

        The fixed position embedding is left out: it is derived from the config (diffusers
        does not store it), so the same weights hash the same in every format."""
        digest = hashlib.sha256()
        for key in sorted(set(self.keys()) - {"pos_embed"}):
            tensor = self.get(key).contiguous()
            digest.update(f"{key}:{tensor.dtype}:{list(tensor.shape)};".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        return digest.hexdigest()[:16]


class _DictReader(CheckpointReader):
    """An in-memory state dict under official keys (official .pt files)."""

    def __init__(self, path: Path, state: dict[str, torch.Tensor], model: str | None):
        self.path, self._state = path, state
        self.config = infer_config(state, model)

    def keys(self) -> list[str]:
        return list(self._state)

    def get(self, key: str) -> torch.Tensor:
        return self._state[key]


class DitserveReader(CheckpointReader):
    """A safetensors file read lazily: ditserve's own (config in the metadata), or any
    file of official keys (config inferred from the tensor shapes)."""

    def __init__(self, path: Path, model: str | None = None):
        self.path = path
        try:
            self._file = safe_open(str(path), framework="pt")
        except Exception as error:  # safetensors raises its own SafetensorError
            raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None
        metadata = self._file.metadata() or {}
        self._hash = metadata.get("weight_hash")
        if metadata.get("format") == DITSERVE_FORMAT and "dit_config" in metadata:
            self.config = DiTConfig.from_json(metadata["dit_config"])
        else:
            shapes = {k: torch.empty(self._file.get_slice(k).get_shape(), device="meta")
                      for k in self._file.keys()}  # noqa: SIM118
            self.config = infer_config(shapes, model)

    def keys(self) -> list[str]:
        return list(self._file.keys())

    def get(self, key: str) -> torch.Tensor:
        return self._file.get_tensor(key)

    def nbytes(self, key: str) -> int:
        sliced = self._file.get_slice(key)
        shape = sliced.get_shape()
        itemsize = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}.get(sliced.get_dtype(), 4)
        return itemsize * int(torch.Size(shape).numel())

    def weight_hash(self) -> str:
        return self._hash or super().weight_hash()


class DiffusersReader(CheckpointReader):
    """A diffusers DiT transformer folder, mapped back to the official keys."""

    def __init__(self, folder: Path):
        self.path = folder
        cfg = json.loads((folder / "config.json").read_text())
        self._tensors = _read_diffusers_weights(folder)
        self.config = _config_from_diffusers(cfg, self._tensors)
        self._official = _official_from_diffusers(self._tensors, self.config.depth)

    def keys(self) -> list[str]:
        return list(self._official)

    def get(self, key: str) -> torch.Tensor:
        return self._official[key]()


def _read_diffusers_weights(folder: Path) -> dict[str, torch.Tensor]:
    safetensors_file = folder / "diffusion_pytorch_model.safetensors"
    bin_file = folder / "diffusion_pytorch_model.bin"
    if safetensors_file.exists():
        with safe_open(str(safetensors_file), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
    if bin_file.exists():
        return torch.load(bin_file, map_location="cpu", weights_only=True)
    raise CheckpointError(f"{folder}: no diffusion_pytorch_model.safetensors or .bin")


def _config_from_diffusers(cfg: dict, tensors: dict[str, torch.Tensor]) -> DiTConfig:
    if cfg.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
        raise CheckpointError(f"diffusers transformer norm_type {cfg.get('norm_type')!r} is "
                              "not DiT's ada_norm_zero")
    heads, head_dim = int(cfg["num_attention_heads"]), int(cfg["attention_head_dim"])
    in_channels = int(cfg.get("in_channels", 4))
    out_channels = int(cfg.get("out_channels") or in_channels)
    num_classes = int(cfg["num_embeds_ada_norm"])
    rows = tensors["transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"].shape[0]
    patch = int(cfg["patch_size"])
    depth = int(cfg["num_layers"])
    named = heads_for(depth, heads * head_dim, patch)
    return DiTConfig(input_size=int(cfg["sample_size"]), patch_size=patch,
                     in_channels=in_channels, hidden_size=heads * head_dim, depth=depth,
                     num_heads=heads, num_classes=num_classes,
                     class_dropout_prob=0.1 if rows > num_classes else 0.0,
                     learn_sigma=out_channels == 2 * in_channels,
                     name=named[0] if named else "")


def diffusers_key_map(depth: int) -> dict[str, str]:
    """Official key → diffusers DiTTransformer2DModel key (scripts/convert_dit_to_diffusers
    .py), for every tensor but q/k/v (split in diffusers) and pos_embed (recomputed there).
    The embedders map to block 0's copy; diffusers repeats them in every block."""
    emb = "transformer_blocks.0.norm1.emb."
    mapping = {"x_embedder.proj.weight": "pos_embed.proj.weight",
               "x_embedder.proj.bias": "pos_embed.proj.bias",
               "t_embedder.mlp.0.weight": emb + "timestep_embedder.linear_1.weight",
               "t_embedder.mlp.0.bias": emb + "timestep_embedder.linear_1.bias",
               "t_embedder.mlp.2.weight": emb + "timestep_embedder.linear_2.weight",
               "t_embedder.mlp.2.bias": emb + "timestep_embedder.linear_2.bias",
               "y_embedder.embedding_table.weight": emb + "class_embedder.embedding_table.weight",
               "final_layer.adaLN_modulation.1.weight": "proj_out_1.weight",
               "final_layer.adaLN_modulation.1.bias": "proj_out_1.bias",
               "final_layer.linear.weight": "proj_out_2.weight",
               "final_layer.linear.bias": "proj_out_2.bias"}
    for i in range(depth):
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        for part in ("weight", "bias"):
            mapping[f"{dst}adaLN_modulation.1.{part}"] = f"{src}norm1.linear.{part}"
            mapping[f"{dst}attn.proj.{part}"] = f"{src}attn1.to_out.0.{part}"
            mapping[f"{dst}mlp.fc1.{part}"] = f"{src}ff.net.0.proj.{part}"
            mapping[f"{dst}mlp.fc2.{part}"] = f"{src}ff.net.2.{part}"
    return mapping


_EMBEDDER_PREFIX = "transformer_blocks.0.norm1.emb."


def to_diffusers(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Official state dict → DiTTransformer2DModel's: the embedders copied into every block,
    q/k/v split (the inverse of DiffusersReader)."""
    out = {}
    for official, key in diffusers_key_map(depth).items():
        for i in range(depth if key.startswith(_EMBEDDER_PREFIX) else 1):
            out[key.replace("transformer_blocks.0.", f"transformer_blocks.{i}.", 1)] = state[official]
    for i in range(depth):
        for part in ("weight", "bias"):
            q, k, v = state[f"blocks.{i}.attn.qkv.{part}"].chunk(3)
            for name, tensor in zip("qkv", (q, k, v), strict=True):
                out[f"transformer_blocks.{i}.attn1.to_{name}.{part}"] = tensor
    return out


def _official_from_diffusers(t: dict[str, torch.Tensor], depth: int) -> dict:
    """Official key → a thunk reading it from the diffusers tensors. Thunks keep memory to
    one mapped tensor at a time."""
    mapping = diffusers_key_map(depth)
    missing = [v for v in mapping.values() if v not in t]
    if missing:
        raise CheckpointError(f"diffusers checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}")
    thunks = {k: (lambda v=v: t[v]) for k, v in mapping.items()}
    for i in range(depth):
        for part in ("weight", "bias"):
            names = [f"transformer_blocks.{i}.attn1.to_{p}.{part}" for p in "qkv"]
            thunks[f"blocks.{i}.attn.qkv.{part}"] = lambda names=names: torch.cat(
                [t[n] for n in names], dim=0)
    return thunks


def infer_config(state: dict[str, torch.Tensor], model: str | None) -> DiTConfig:
    """A config from tensor shapes; the head count needs `model` or a named config."""
    try:
        hidden, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
        tokens = state["pos_embed"].shape[1]
        rows = state["y_embedder.embedding_table.weight"].shape[0]
        out_features = state["final_layer.linear.weight"].shape[0]
        fc1_rows = state["blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as missing:
        raise CheckpointError(f"not a DiT state dict: no tensor {missing}") from None
    depth = 1 + max(int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k)))
    fields = dict(input_size=round(tokens ** 0.5) * patch, patch_size=patch,
                  in_channels=in_channels, hidden_size=hidden, depth=depth,
                  mlp_ratio=fc1_rows / hidden,
                  learn_sigma=out_features == patch * patch * in_channels * 2)
    if model is not None:
        if model not in DIT_CONFIGS:
            raise CheckpointError(f"unknown model config {model!r}; known: "
                                  f"{', '.join(DIT_CONFIGS)}")
        base = dit_config(model)
        if (base.depth, base.hidden_size, base.patch_size) != (depth, hidden, patch):
            raise CheckpointError(f"checkpoint has depth {depth}, hidden {hidden}, patch {patch}; "
                                  f"{model} has {base.depth}, {base.hidden_size}, {base.patch_size}")
        heads, name = base.num_heads, model
    elif (named := heads_for(depth, hidden, patch)) is not None:
        name, heads = named
    else:
        raise CheckpointError(f"cannot tell the number of heads of a depth-{depth}, "
                              f"width-{hidden} DiT: pass the config name (--model)")
    # 1000 ImageNet classes plus the null row is the official case; a table with one
    # row per class means no null class (no guidance).
    num_classes = rows - 1 if rows > 1 else rows
    return DiTConfig(**fields, num_heads=heads, num_classes=num_classes,
                     class_dropout_prob=0.1 if rows > 1 else 0.0, name=name)


def _torch_load(path: Path) -> object:
    """weights_only loading; training checkpoints also hold train.py's argparse Namespace."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # not the zip format, which mmap needs
                return torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise CheckpointError(f"{path}: not a loadable torch checkpoint ({first_line})") from None


def _load_official(path: Path, model: str | None) -> CheckpointReader:
    state = _torch_load(path)
    if isinstance(state, dict) and "ema" in state:
        state = state["ema"]
    elif isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a DiT state dict (nor one under 'ema')")
    return _DictReader(path, state, model)


def open_checkpoint(path: str | Path, model: str | None = None) -> CheckpointReader:
    """A reader for any supported format, chosen by what `path` is."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        folder = path / "transformer" if (path / "transformer").is_dir() else path
        if not (folder / "config.json").exists():
            raise CheckpointError(f"{path}: not a diffusers DiT folder (no config.json)")
        return DiffusersReader(folder)
    if path.suffix == ".safetensors":
        return DitserveReader(path, model)
    with path.open("rb") as file:
        magic = file.read(4)
    # torch.save writes a zip (PK\3\4), or before torch 1.6 a pickle (protocol 2+: 0x80).
    if not (magic == b"PK\x03\x04" or magic[:1] == b"\x80"):
        raise CheckpointError(f"{path}: not a loadable torch checkpoint (nor another DiT "
                              "format); accepted: an official .pt/.pth (a state dict or "
                              "{'ema': ...}), a diffusers DiT folder, or a .safetensors file")
    return _load_official(path, model)


CLASS_NAMES_FILE = "class_names.txt"
"""The class names a checkpoint ships with, one per line, beside the file (or inside the
folder): how the demo model carries them."""


def read_class_names(path: str | Path) -> list[str] | None:
    """The class names shipped with the checkpoint at `path`; None when it has none."""
    path = Path(path)
    names_file = (path if path.is_dir() else path.parent) / CLASS_NAMES_FILE
    if not names_file.is_file():
        return None
    return [line.strip() for line in names_file.read_text("utf-8").splitlines() if line.strip()]


def stage_keys(reader: CheckpointReader, model: DiT) -> list[str]:
    """The checkpoint keys that this (possibly partial) model holds."""
    wanted = set(model.state_dict().keys())
    return [k for k in reader if k in wanted]


def build(reader: CheckpointReader, blocks: tuple[int, int] | None = None,
          embedders: bool = True, final_layer: bool = True,
          device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> DiT:
    """The model (or a slice of it) with weights read from `reader`, in eval mode."""
    with torch.device("meta"):
        model = DiT(reader.config, blocks, embedders, final_layer)
    expected = model.state_dict().keys()
    state = {k: reader.get(k).to(device=device, dtype=dtype) for k in stage_keys(reader, model)}
    missing = sorted(set(expected) - set(state) - {"pos_embed"})
    if missing:
        raise CheckpointError(f"{reader.path}: missing {len(missing)} tensors, e.g. {missing[0]}")
    if "pos_embed" in expected and "pos_embed" not in state:  # diffusers computes it
        state["pos_embed"] = DiT(reader.config, (0, 0), True, False).pos_embed.data.to(device, dtype)
    _check_shapes(model, state, reader.path)
    model.load_state_dict(state, assign=True)
    model.pos_embed.requires_grad_(False) if model.has_embedders else None
    return model.eval().requires_grad_(False)


def _check_shapes(model: DiT, state: dict[str, torch.Tensor], path: Path) -> None:
    for key, param in model.state_dict().items():
        if tuple(state[key].shape) != tuple(param.shape):
            raise CheckpointError(f"{path}: tensor {key} has shape {tuple(state[key].shape)}, "
                                  f"the config needs {tuple(param.shape)}")


def load_stage(checkpoint: str | Path | CheckpointReader, blocks: tuple[int, int],
               model: str | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> DiT:
    """The slice of the model holding blocks [start, end): with the embedders when it starts
    at block 0 and the final layer when it ends at the last. From a safetensors file it
    reads only its own tensors. Given an open reader, the file is not opened again (one
    process building several stages, or a stage that also needs the weight hash)."""
    reader = (checkpoint if isinstance(checkpoint, CheckpointReader)
              else open_checkpoint(checkpoint, model))
    start, end = blocks
    if not 0 <= start < end <= reader.config.depth:
        raise CheckpointError(f"block range {start}:{end} is outside the model's "
                              f"{reader.config.depth} blocks")
    return build(reader, blocks, start == 0, end == reader.config.depth, device, dtype)


def load_dit(path: str | Path, model: str | None = None, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> DiT:
    """The whole model from any supported checkpoint, in eval mode."""
    return build(open_checkpoint(path, model), device=device, dtype=dtype)


def save_ditserve(tensors: Iterable[tuple[str, torch.Tensor]], config: DiTConfig,
                  path: str | Path, weight_hash: str | None = None) -> None:
    """Writes ditserve's self-describing safetensors file."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in tensors}
    metadata = {"format": DITSERVE_FORMAT, "dit_config": config.to_json()}
    metadata["weight_hash"] = weight_hash or _DictHash(state).weight_hash()
    save_file(state, str(path), metadata=metadata)


class _DictHash(CheckpointReader):
    def __init__(self, state: dict[str, torch.Tensor]):
        self._state = state

    def keys(self) -> list[str]:
        return list(self._state)

    def get(self, key: str) -> torch.Tensor:
        return self._state[key]


def convert(src: str | Path, out: str | Path, model: str | None = None) -> DiTConfig:
    """Any supported checkpoint → ditserve's file; returns the config recorded."""
    reader = open_checkpoint(src, model)
    tensors = [(k, reader.get(k)) for k in reader]
    if "pos_embed" not in reader:
        tensors.append(("pos_embed", DiT(reader.config, (0, 0), True, False).pos_embed.data))
    save_ditserve(tensors, reader.config, out)
    return reader.config
