"""The files of a Hugging Face model directory: safetensors weights (one file, or shards with an
index), config.json, generation_config.json and the tokenizer, written and read without
transformers itself (only `safetensors` and `tokenizers`).

Shards follow transformers' names: `model.safetensors`, or `model-00001-of-0000N.safetensors` plus
`model.safetensors.index.json` (`{"metadata": {"total_size": bytes}, "weight_map": {name: file}}`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import tokenizers
import torch
from tokenizers import decoders, models, pre_tokenizers

from train.checkpoint.files import follow_umask
from train.data.tokenizer import EOT_TOKEN, Tokenizer

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' usual shard size


# --- weights ----------------------------------------------------------------------------------


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as err:
        raise ValueError("the Hugging Face tools need the safetensors package: pip install -e '.[hf]' (make setup installs it)") from err
    return safetensors


def write_weights(tensors: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int) -> list[str]:
    """Write `tensors` as one safetensors file, or as shards of at most `max_shard_bytes` (a single
    larger tensor gets a shard of its own) with the index. Returns the file names written."""
    save_file = _safetensors().torch.save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        names = [WEIGHTS]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for shard, name in zip(shards, names):
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        follow_umask(out_dir / name)  # safetensors writes 0600 files
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
            "weight_map": {k: name for shard, name in zip(shards, names) for k in shard},
        }
        write_json(out_dir / INDEX, index)
        names.append(INDEX)
    return names


class SafetensorsWeights:
    """The tensors of a directory's safetensors file(s), read one at a time when asked for: names and
    shapes come from the file headers, so a rank reads only the tensors it keeps (an expert-parallel
    rank importing Mixtral-8x7B does not hold the whole model). A missing, truncated or corrupt file
    is one ValueError naming it. `bytes_read` counts the tensor bytes read so far."""

    def __init__(self, hf_dir: Path):
        safe_open = _safetensors().safe_open
        if (hf_dir / INDEX).is_file():
            weight_map = read_json(hf_dir / INDEX).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{hf_dir / INDEX}: no weight_map")
            files = sorted(set(weight_map.values()))
        elif (hf_dir / WEIGHTS).is_file():
            files, weight_map = [WEIGHTS], None
        else:
            found = sorted(p.name for p in hf_dir.glob("*.bin")) or "none"
            raise ValueError(f"{hf_dir}: no {WEIGHTS} or {INDEX} (Switchyard reads safetensors only; other weight files: {found})")
        self.file_of: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.bytes_read = 0
        for name in files:
            path = hf_dir / name
            if not path.is_file():
                raise ValueError(f"{hf_dir / INDEX} names {name}, which does not exist")
            try:
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():
                        self.file_of[key] = path
                        self.shapes[key] = tuple(f.get_slice(key).get_shape())
            except Exception as err:  # SafetensorError: truncated header, not safetensors at all, ...
                raise ValueError(f"{path}: not a complete safetensors file ({err})") from err
        if weight_map is not None and set(weight_map) != set(self.file_of):
            odd = sorted(set(weight_map) ^ set(self.file_of))[0]
            raise ValueError(f"{hf_dir / INDEX}: its weight_map and the shards disagree about {odd}")

    def names(self) -> set[str]:
        return set(self.file_of)

    def tensor(self, name: str) -> torch.Tensor:
        path = self.file_of[name]
        try:
            with _safetensors().safe_open(str(path), framework="pt") as f:
                t = f.get_tensor(name)
        except Exception as err:  # data shorter than the header says
            raise ValueError(f"{path}: not a complete safetensors file ({err})") from err
        self.bytes_read += t.numel() * t.element_size()
        return t


class TensorsInMemory:
    """The same interface over tensors already in memory (tests, and transformers models' state dicts)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors
        self.shapes = {k: tuple(v.shape) for k, v in tensors.items()}

    def names(self) -> set[str]:
        return set(self.tensors)

    def tensor(self, name: str) -> torch.Tensor:
        return self.tensors[name]


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise ValueError(f"{path} does not exist") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def fsync_tree(directory: Path) -> None:
    for path in [*directory.iterdir(), directory]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --- tokenizer --------------------------------------------------------------------------------


def _byte_to_char() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the others are shifted
    to code points from 256 on (what `pre_tokenizers.ByteLevel` emits)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, shifted = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + shifted)
            shifted += 1
    return chars


def byte_tokenizer_backend() -> tokenizers.Tokenizer:
    """Switchyard's bytes tokenizer (id = byte value, 256 = end-of-text) as a `tokenizers` file: a
    byte-level BPE without merges, so every byte is one token with its own value as id."""
    vocab = {char: b for b, char in _byte_to_char().items()}
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([EOT_TOKEN])  # id 256
    assert backend.token_to_id(EOT_TOKEN) == 256
    return backend


def tokenizer_backend(tokenizer: Tokenizer) -> tokenizers.Tokenizer:
    return byte_tokenizer_backend() if tokenizer.backend is None else tokenizer.backend


def same_vocabulary(a: Tokenizer, b: Tokenizer) -> bool:
    va, vb = tokenizer_backend(a), tokenizer_backend(b)
    return va.get_vocab(with_added_tokens=True) == vb.get_vocab(with_added_tokens=True) and a.eot_id == b.eot_id


def write_tokenizer(tokenizer: Tokenizer, out_dir: Path, max_seq_len: int) -> list[str]:
    """tokenizer.json + tokenizer_config.json that `AutoTokenizer.from_pretrained` loads as a fast
    tokenizer encoding text exactly as Switchyard does (no BOS; special tokens written in the text
    are plain text, as in `Tokenizer`)."""
    backend = tokenizer_backend(tokenizer)
    backend.save(str(out_dir / "tokenizer.json"))
    eot = backend.id_to_token(tokenizer.eot_id)
    write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eot,
        "pad_token": eot,
        "bos_token": None,
        "unk_token": None,
        "model_max_length": max_seq_len,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,
    })
    return ["tokenizer.json", "tokenizer_config.json"]


def read_tokenizer(hf_dir: Path) -> Tokenizer:
    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"{hf_dir}: no tokenizer.json (Switchyard needs the fast-tokenizer file)")
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as err:
        raise ValueError(f"{path}: not a tokenizers JSON file ({err})") from err
    from train.data.tokenizer import with_eot

    return Tokenizer(with_eot(backend))
